"""A low-rank sketch of each teacher's logits: the shape of the tail that top-k drops.

A classifier's logits are ``z = W h + b``; over a dataset they lie near a low-dimensional
affine subspace. Per teacher the cache keeps, once, the mean ``mu (C,)`` and an orthonormal
basis ``U (C, r)`` of that subspace (a PCA of the teacher's logits on the first rows the
build computes, :func:`fit_sketch`), and per row the ``r`` coefficients
``a = U^T (z - mu)`` (fp16, :func:`sketch_coefficients`). :func:`sketch_logits` gives back
``mu + U a``, the projection of ``z`` on the subspace: it orders and spaces the tail classes
(:func:`distill.cache.topk.reconstruct_logits` then moves them so that their mass at the KD
temperature is exactly the stored one). What remains approximate is the residual of ``z``
outside the rank-``r`` subspace.

On disk: ``sketch.safetensors`` in the cache folder, ``mean`` fp32 ``(M, C)`` and ``basis``
fp32 ``(M, C, r)`` for the M teachers (:func:`write_sketch`, :func:`read_sketch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import DistillError
from ..fileio import atomic_write, require_finite

SKETCH_FILE = "sketch.safetensors"
DEFAULT_RANK = 32
FIT_ROWS = 2048  # rows (image views) of the build's first images the basis is fitted on


@dataclass
class Sketch:
    """Per teacher: ``mean`` fp32 ``(..., C)`` and orthonormal ``basis`` fp32 ``(..., C, r)`` (leading dims: teachers)."""

    mean: Tensor
    basis: Tensor

    @property
    def rank(self) -> int:
        """Return r, the number of coefficients per row."""
        return self.basis.shape[-1]

    def to(self, device: torch.device) -> "Sketch":
        """Return the sketch on ``device``."""
        return Sketch(self.mean.to(device), self.basis.to(device))


def default_rank(top_k: int, num_classes: int) -> int:
    """Return the sketch rank used when the recipe sets none: ``DEFAULT_RANK`` when the tail
    (``C - k`` classes) is larger than it, else 0 (no sketch: a tail that small is better kept whole by top-k)."""
    return DEFAULT_RANK if num_classes - top_k > DEFAULT_RANK else 0


def fit_sketch(logits: Tensor, rank: int) -> Sketch:
    """Return the rank-``rank`` PCA :class:`Sketch` of ``logits (n, ..., C)`` (rows first): mean fp32
    ``(..., C)`` and basis fp32 ``(..., C, r)``.

    Computed in float64 on the CPU; each basis vector's sign is fixed (its largest entry
    positive), not left to the SVD, so refitting equal logits gives the same basis (a build's
    ranks all read the one basis rank 0 wrote in any case).
    """
    z = logits.detach().to("cpu", torch.float64).movedim(0, -2)  # (..., n, C)
    if z.shape[-2] < rank or z.shape[-1] < rank:
        raise DistillError(f"run.teacher_cache_sketch: a rank-{rank} sketch needs at least {rank} rows and "
                           f"classes, got {z.shape[-2]} rows of {z.shape[-1]} classes")
    mean = z.mean(-2)
    _, _, vh = torch.linalg.svd(z - mean.unsqueeze(-2), full_matrices=False)  # vh (..., min(n, C), C)
    basis = vh[..., :rank, :].transpose(-1, -2)  # (..., C, r)
    peak = basis.abs().argmax(-2, keepdim=True)
    basis = basis * basis.gather(-2, peak).sign()
    return Sketch(mean.float().contiguous(), basis.float().contiguous())


def sketch_coefficients(logits: Tensor, sketch: Sketch) -> Tensor:
    """Return the coefficients ``U^T (z - mu)`` fp32 ``(..., r)`` of ``logits (..., C)``
    (their trailing teacher dims aligned with the sketch's)."""
    centred = logits.float() - sketch.mean
    return (centred.unsqueeze(-2) @ sketch.basis).squeeze(-2)


def sketch_logits(coefficients: Tensor, sketch: Sketch) -> Tensor:
    """Return ``mu + U a`` fp32 ``(..., C)`` of coefficients ``a (..., r)``: the logits' projection on the subspace."""
    return sketch.mean + (sketch.basis @ coefficients.float().unsqueeze(-1)).squeeze(-1)


def write_sketch(path: Path, sketch: Sketch) -> None:
    """Write ``sketch`` to ``path`` (safetensors ``mean``, ``basis``; through a temporary file and a rename)."""
    tensors = {"mean": sketch.mean.contiguous(), "basis": sketch.basis.contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def read_sketch(path: Path) -> Sketch:
    """Return the :class:`Sketch` stored at ``path``; a missing, unreadable or non-finite file is
    refused (:class:`DistillError`, one line naming it)."""
    if not path.is_file():
        raise DistillError(f"{path}: teacher-cache sketch basis is missing; rebuild the cache with distill-cache build")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on a damaged file
        raise DistillError(f"{path}: unreadable teacher-cache sketch basis ({exc})") from None
    if set(tensors) != {"mean", "basis"} or tensors["basis"].shape[:-1] != tensors["mean"].shape:
        raise DistillError(f"{path}: teacher-cache sketch basis holds {sorted(tensors)}, expected mean (M, C) "
                           "and basis (M, C, r)")
    require_finite(tensors, path)
    return Sketch(tensors["mean"].float(), tensors["basis"].float())
