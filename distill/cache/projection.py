"""The size a recipe's teacher cache will have, before it is built (``distill-cache info RECIPE``).

Per image and view: the view record (``PARAMS`` int64). Per image, view and teacher: ``k``
fp16 logits and ``k`` class ids; with ``k < C`` the tail (fp32), the label (a class id)
and the label's logit (fp32) (:mod:`distill.cache.topk`), and with a rank-``r`` sketch ``r``
fp16 coefficients (plus, once per teacher, its fp32 mean ``(C,)`` and basis ``(C, r)``,
:mod:`distill.cache.sketch`); the tapped feature (fp16, its
shape measured by running each teacher once on one blank input) and, where the tap is a
map, its pooled embedding (fp16). ``last_map`` keeps whole feature maps, which is most of
such a cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from ..teachers import TeacherPool
from .topk import class_id_dtype
from ..data import PARAMS


@dataclass
class CacheSize:
    """Projected bytes of a cache: ``records``, ``logits`` (top-k + tails), ``features`` per teacher,
    ``sketch`` (the per-row coefficients and the bases; 0 without a sketch of rank ``rank``)."""

    images: int
    views: int
    records: int
    logits: int
    features: List[Tuple[str, Tuple[int, ...], int]]  # (teacher, stored feature shapes, bytes)
    sketch: int = 0
    rank: int = 0
    tail: bool = True  # top-k < C: each row also keeps its tail, label and label logit

    @property
    def total(self) -> int:
        """Return the projected size of every tensor, in bytes."""
        return self.records + self.logits + self.sketch + sum(b for _, _, b in self.features)


def feature_shapes(pool: TeacherPool, input_size: Tuple[int, int, int], device: torch.device) -> List[List[Tuple[int, ...]]]:
    """Return, per teacher, the shapes of one row's stored feature (and embedding, where the tap is a map)."""
    x = torch.zeros(1, *input_size, device=device)
    out = pool(x)
    shapes = []
    for feature, embedding in zip(out.features, out.embeddings):
        rows = [tuple(feature.shape[1:])]
        if embedding is not feature:
            rows.append(tuple(embedding.shape[1:]))
        shapes.append(rows)
    return shapes


def project(images: int, views: int, top_k: int, num_classes: int, names: List[str],
            shapes: List[List[Tuple[int, ...]]], sketch: int = 0) -> CacheSize:
    """Return the :class:`CacheSize` of ``images x views`` rows of the teachers ``names`` (feature ``shapes``),
    with a rank-``sketch`` sketch of the tails (0: none)."""
    rows = images * views
    id_bytes = torch.empty(0, dtype=class_id_dtype(num_classes)).element_size()
    per_teacher = top_k * (2 + id_bytes) + (4 + id_bytes + 4 if top_k < num_classes else 0)
    features = []
    for name, tensors in zip(names, shapes):
        elements = sum(int(torch.Size(shape).numel()) for shape in tensors)
        features.append((name, tuple(tensors[0]), rows * elements * 2))
    rank = sketch if top_k < num_classes else 0
    sketch_bytes = len(names) * (rows * rank * 2 + num_classes * (rank + 1) * 4) if rank else 0
    return CacheSize(images, views, rows * PARAMS * 8, rows * len(names) * per_teacher, features, sketch_bytes, rank,
                     top_k < num_classes)


def describe_projection(size: CacheSize, tap: str) -> List[str]:
    """Return the lines ``distill-cache info RECIPE`` prints for a projected size."""
    mib = 2**20
    rows = size.images * size.views
    lines = [f"projected  {size.total / 2**30:.2f} GiB for {size.images} images x {size.views} views x "
             f"{len(size.features)} teachers (tap {tap})",
             f"  records  {size.records / mib:.1f} MiB ({PARAMS * 8} bytes per view)",
             f"  logits   {size.logits / mib:.1f} MiB ({size.logits // max(rows * len(size.features), 1)} bytes "
             f"per view and teacher: top-k fp16 logits and ids{', tail, label and its logit' if size.tail else ''})"]
    if size.sketch:
        lines.append(f"  sketch   {size.sketch / mib:.1f} MiB ({2 * size.rank} bytes per view and teacher: "
                     f"rank-{size.rank} fp16 coefficients; and each teacher's fp32 mean and basis)")
    for name, shape, nbytes in size.features:
        lines.append(f"  feature  {nbytes / mib:.1f} MiB for {name} ({'x'.join(map(str, shape))} fp16, "
                     f"{nbytes // max(rows, 1)} bytes per view)")
    if tap == "last_map":
        lines.append("  (last_map stores whole feature maps; distill.features=pre_logits stores pooled vectors)")
    return lines
