"""How close KD from cached top-k soft labels is to KD from the full logits (distill.cache.topk).

Teacher logits are synthetic (no real C = 1000 model is available offline), two teachers:

- ``structured``: rank 32 by construction, which flatters a rank-32 sketch. ``C`` class
  embeddings ``e_c ~ N(0, I_32)``; an item of label ``y`` has ``h = e_y + N(0, I_32)`` and
  logits ``z = 1.2 h.e_c / sqrt(32) + 0.5 t_3 + 3 [c = y]`` (``t_3``: Student-t noise with 3
  degrees of freedom, per class).
- ``spectral``: a slowly decaying spectrum, as a real ``z = W h + b`` over a 512-wide
  feature: ``e_c ~ N(0, I_512)``, ``h = 0.4 e_y + N(0, I_512)``, logits
  ``z = 1.5 sum_i s_i h_i e_ci / |s| + 0.5 t_3`` with per-dimension scales ``s_i = i^-0.5``
  (the logits' variance along the i-th direction falls like 1/i; a rank-32 basis explains
  about half of it, the heavy-tailed noise is full rank).

Two students: ``random`` (``s ~ N(0, 1.5^2)``, the start of training) and ``near``
(``s = 0.8 z + N(0, 1)``, a student that has learnt the teacher's tail order, where a lost
tail shape costs most).

For each teacher, temperature ``T`` and ``k`` the table gives, cached vs full logits: the
batch KD's relative error, the cosine of the KD gradient wrt the student logits (whole
batch; and the median per-sample cosine), and the teacher CE's mean / largest absolute
error in nats (all rows, and the mean over the rows whose label is outside the top-k).
Reconstructions: ``format 1`` (the first format: every tail class at ``rest - log(C - k)``),
``uniform`` (the tail's mass at ``T`` exact, spread uniformly: ``run.teacher_cache_sketch=0``)
and ``sketch r`` (the same exact mass, shaped by a rank-``r`` sketch,
:mod:`distill.cache.sketch`, whose basis is fitted on 2,048 other items of the same teacher,
as a cache build fits it on its first rows). Last, per teacher, the same bytes spent on a
larger ``k`` instead of a sketch (``r`` fp16 coefficients cost as much as ``r / 2`` more
top-k logits and ids).
Run: ``python benchmarks/cache_tails.py`` (a few minutes on one core).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.cache.sketch import Sketch, fit_sketch
from distill.cache.topk import reconstruct_logits, topk_soft_labels
from distill.losses import cross_entropy, kd_loss


def _structured_rows(gen: torch.Generator, classes: Tensor, batch: int) -> Tuple[Tensor, Tensor]:
    """Return ``(logits (B, C), labels (B,))`` of ``batch`` items of the ``structured`` teacher (classes ``(C, 32)``)."""
    num_classes, dim = classes.shape
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    h = classes[labels] + torch.randn(batch, dim, generator=gen)
    chi = torch.randn(batch, num_classes, 3, generator=gen).square().sum(-1)
    t3 = torch.randn(batch, num_classes, generator=gen) / (chi / 3).sqrt()
    logits = 1.2 * h @ classes.T / math.sqrt(dim) + 0.5 * t3 + 3.0 * F.one_hot(labels, num_classes)
    return logits, labels


def _spectral_rows(gen: torch.Generator, classes: Tensor, batch: int) -> Tuple[Tensor, Tensor]:
    """Return ``(logits (B, C), labels (B,))`` of ``batch`` items of the ``spectral`` teacher (classes ``(C, 512)``)."""
    num_classes, dim = classes.shape
    scales = torch.arange(1, dim + 1, dtype=torch.float32).pow(-0.5)  # per-dimension scale i^-0.5
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    h = 0.4 * classes[labels] + torch.randn(batch, dim, generator=gen)
    chi = torch.randn(batch, num_classes, 3, generator=gen).square().sum(-1)
    t3 = torch.randn(batch, num_classes, generator=gen) / (chi / 3).sqrt()
    return 1.5 * h @ (classes * scales).T / scales.square().sum().sqrt() + 0.5 * t3, labels


TEACHERS = {"structured": (32, _structured_rows), "spectral": (512, _spectral_rows)}


def teacher_rows(kind: str = "structured", batch: int = 2048, fit_rows: int = 0, num_classes: int = 1000,
                 seed: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Return ``(logits (B, C), labels (B,), fit logits (fit_rows, C))`` of teacher ``kind`` (module docstring).

    The fit rows are other items of the same teacher (what a sketch's basis is fitted on).
    """
    gen = torch.Generator().manual_seed(seed)
    dim, rows = TEACHERS[kind]
    classes = torch.randn(num_classes, dim, generator=gen)
    logits, labels = rows(gen, classes, batch)
    fit = rows(gen, classes, fit_rows)[0] if fit_rows else torch.empty(0, num_classes)
    return logits, labels, fit


def synthetic_teacher(batch: int = 2048, num_classes: int = 1000, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Return ``(logits (B, C), labels (B,))`` of the ``structured`` teacher described in the module docstring."""
    logits, labels, _ = teacher_rows("structured", batch, 0, num_classes, seed)
    return logits, labels


def student_logits(teacher: Tensor, kind: str, seed: int = 1) -> Tensor:
    """Return student logits ``(B, C)``: ``random`` or ``near`` the teacher (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(teacher.shape, generator=gen)
    return noise * 1.5 if kind == "random" else 0.8 * teacher + noise


def format1_logits(logits: Tensor, k: int) -> Tensor:
    """Return the previous format's reconstruction ``(B, C)``: every tail class at ``rest - log(C - k)``."""
    values, ids = logits.topk(k, dim=-1)
    rest = logits.scatter(-1, ids, float("-inf")).logsumexp(-1)
    fill = rest - math.log(logits.shape[-1] - k)
    return fill.unsqueeze(-1).expand_as(logits).clone().scatter_(-1, ids, values.half().float())


def cached_logits(logits: Tensor, labels: Tensor, k: int, temperature: float,
                  sketch: Optional[Sketch] = None) -> Tensor:
    """Return the logits ``(B, C)`` the cache gives back for top-``k`` at ``temperature`` (with ``sketch``: its shape)."""
    soft = topk_soft_labels(logits, k, temperature, labels, sketch)
    return reconstruct_logits(soft, logits.shape[-1], temperature, sketch)


def explained(logits: Tensor, sketch: Sketch) -> float:
    """Return the fraction of the centred variance of ``logits (B, C)`` that ``sketch``'s subspace holds."""
    centred = logits - logits.mean(0)
    return float((centred @ sketch.basis).square().sum() / centred.square().sum())


def compare(student: Tensor, teacher: Tensor, approx: Tensor, labels: Tensor, temperature: float,
            k: int) -> Dict[str, float]:
    """Return KD relative error, gradient cosines and teacher-CE errors of ``approx`` vs ``teacher`` (B, C) (top-``k``)."""
    def value_and_grad(target: Tensor) -> Tuple[Tensor, Tensor]:
        s = student.clone().requires_grad_(True)
        value = kd_loss(s, target, temperature)
        value.sum().backward()
        return value.detach(), s.grad

    exact, grad = value_and_grad(teacher)
    value, approx_grad = value_and_grad(approx)
    ce_error = (cross_entropy(approx, labels) - cross_entropy(teacher, labels)).abs()
    outside = (teacher > teacher.gather(-1, labels.unsqueeze(-1))).sum(-1) >= k
    return {"kd_rel": float(value.sum() / exact.sum() - 1),
            "cos": float(F.cosine_similarity(approx_grad.flatten(), grad.flatten(), dim=0)),
            "cos_median": float(F.cosine_similarity(approx_grad, grad, dim=-1).median()),
            "ce_mean": float(ce_error.mean()), "ce_max": float(ce_error.max()),
            "ce_outside": float(ce_error[outside].mean()), "outside": int(outside.sum())}


RANKS = (16, 32, 64)


def table() -> str:
    """Return the markdown tables of the module docstring (C = 1000, k = 5, 10, 20, T = 1, 2, 4, both teachers)."""
    lines: List[str] = []
    for teacher_kind in TEACHERS:
        teacher, labels, fit = teacher_rows(teacher_kind, fit_rows=2048)
        sketches = {r: fit_sketch(fit, r) for r in RANKS}
        p = teacher.softmax(-1)
        lines += [f"{teacher_kind} teacher: top-1 accuracy {(teacher.argmax(-1) == labels).float().mean():.2f}, "
                  f"mean top-1 probability {p.max(-1).values.mean():.2f}, mean entropy "
                  f"{-torch.xlogy(p, p).sum(-1).mean():.2f} nats; variance of the logits in the sketch's subspace: "
                  + ", ".join(f"r = {r} {explained(teacher, sketches[r]):.2f}" for r in RANKS), "",
                  "| teacher | student | T | k | reconstruction | KD rel. error | grad cos (batch) "
                  "| grad cos (median sample) | teacher CE error mean / max (nats) "
                  "| CE error, label outside top-k (rows) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        students = {kind: student_logits(teacher, kind) for kind in ("random", "near")}
        rows: Dict[str, List[str]] = {kind: [] for kind in students}
        for temperature in (1.0, 2.0, 4.0):
            for k in (5, 10, 20):
                fills = [("format 1", format1_logits(teacher, k)),
                         ("uniform", cached_logits(teacher, labels, k, temperature))]
                fills += [(f"sketch {r}", cached_logits(teacher, labels, k, temperature, sketches[r])) for r in RANKS]
                for kind, student in students.items():
                    for name, approx in fills:
                        m = compare(student, teacher, approx, labels, temperature, k)
                        rows[kind].append(
                            f"| {teacher_kind} | {kind} | {temperature:g} | {k} | {name} | {m['kd_rel']:+.3f} "
                            f"| {m['cos']:.3f} | {m['cos_median']:.3f} | {m['ce_mean']:.3f} / {m['ce_max']:.3f} "
                            f"| {m['ce_outside']:.3f} ({m['outside']}) |")
        lines += rows["random"] + rows["near"] + [""]
        equal = [compare(students["random"], teacher, cached_logits(teacher, labels, 10 + r // 2, 4.0), labels, 4.0,
                         10 + r // 2) for r in RANKS]  # r fp16 coefficients take the bytes of r / 2 more top-k entries
        lines += [f"{teacher_kind} teacher, random student, T = 4, the same bytes spent on a larger k instead of a "
                  "sketch on top-10 (uniform fill): " + "; ".join(
                      f"k = {10 + r // 2} (as top-10 + sketch {r}): KD {m['kd_rel']:+.3f}, grad cos {m['cos']:.3f}"
                      for r, m in zip(RANKS, equal)), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(table())
