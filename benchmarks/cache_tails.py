"""How close KD from cached top-k soft labels is to KD from the full logits (distill.cache.topk).

Teacher logits are synthetic, heavy-tailed and class-structured (no real C = 1000 model is
available offline): ``C`` class embeddings ``e_c ~ N(0, I_32)``; an item of label ``y`` has
``h = e_y + N(0, I_32)`` and logits ``z = 1.2 h.e_c / sqrt(32) + 0.5 t_3 + 3 [c = y]``
(``t_3``: Student-t noise with 3 degrees of freedom, per class). Two students: ``random``
(``s ~ N(0, 1.5^2)``, the start of training) and ``near`` (``s = 0.8 z + N(0, 1)``, a student
that has learnt the teacher's tail order, where a lost tail shape costs most).

For each temperature ``T`` and ``k`` the table gives, cached vs full logits: the batch KD's
relative error, the cosine of the KD gradient wrt the student logits (whole batch; and the
median per-sample cosine), and the teacher CE's mean / largest absolute error in nats (all rows, and the mean over the rows
whose label is outside the top-k); the
``format 1`` rows are the previous reconstruction (every tail class at ``rest - log(C - k)``).
Run: ``python benchmarks/cache_tails.py`` (a few seconds on one core).
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.cache.topk import reconstruct_logits, topk_soft_labels
from distill.losses import cross_entropy, kd_loss


def synthetic_teacher(batch: int = 2048, num_classes: int = 1000, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Return ``(logits (B, C), labels (B,))`` of the synthetic teacher described in the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    dim = 32
    classes = torch.randn(num_classes, dim, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    h = classes[labels] + torch.randn(batch, dim, generator=gen)
    chi = torch.randn(batch, num_classes, 3, generator=gen).square().sum(-1)
    t3 = torch.randn(batch, num_classes, generator=gen) / (chi / 3).sqrt()
    logits = 1.2 * h @ classes.T / math.sqrt(dim) + 0.5 * t3 + 3.0 * F.one_hot(labels, num_classes)
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


def cached_logits(logits: Tensor, labels: Tensor, k: int, temperature: float) -> Tensor:
    """Return the logits ``(B, C)`` the cache gives back for top-``k`` at ``temperature``."""
    soft = topk_soft_labels(logits, k, temperature, labels)
    return reconstruct_logits(soft, logits.shape[-1], temperature)


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


def table() -> str:
    """Return the markdown table of the module docstring (C = 1000, k = 5, 10, 20, T = 1, 2, 4)."""
    teacher, labels = synthetic_teacher()
    p = teacher.softmax(-1)
    lines = [f"synthetic teacher: top-1 accuracy {(teacher.argmax(-1) == labels).float().mean():.2f}, "
             f"mean top-1 probability {p.max(-1).values.mean():.2f}, mean entropy {-(p * p.log()).sum(-1).mean():.2f} "
             "nats", "",
             "| student | T | k | reconstruction | KD rel. error | grad cos (batch) | grad cos (median sample) "
             "| teacher CE error mean / max (nats) | CE error, label outside top-k (rows) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("random", "near"):
        student = student_logits(teacher, kind)
        for temperature in (1.0, 2.0, 4.0):
            for k in (5, 10, 20):
                for name, approx in (("format 1", format1_logits(teacher, k)),
                                     ("exact tail mass", cached_logits(teacher, labels, k, temperature))):
                    r = compare(student, teacher, approx, labels, temperature, k)
                    lines.append(f"| {kind} | {temperature:g} | {k} | {name} | {r['kd_rel']:+.3f} | {r['cos']:.3f} "
                                 f"| {r['cos_median']:.3f} | {r['ce_mean']:.3f} / {r['ce_max']:.3f} "
                                 f"| {r['ce_outside']:.3f} ({r['outside']}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(table())
