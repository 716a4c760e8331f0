"""The epoch's training metrics, summed on the device and read at log intervals."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

from .. import distributed
from ..losses import hard_labels


class EpochMeter:
    """Sums of the epoch's metrics kept on device; read (one host sync) at log intervals.

    A step whose loss was not finite under fp16 (``out.finite`` False: the GradScaler skips
    it and lowers its scale) is counted in ``skipped`` and left out of the loss means.
    With teachers it also sums the logit weight that went to (sample, teacher) pairs whose
    teacher's top-1 misses the sample's label: ``w_logit_wrong`` in :meth:`weight_stats`.
    """

    LOSSES = ("loss", "ce", "kd", "feat")

    def __init__(self, device: torch.device, num_teachers: int):
        zero = lambda *shape: torch.zeros(shape, device=device, dtype=torch.float64)  # noqa: E731
        self.sums = {k: zero() for k in (*self.LOSSES, "correct", "finite_images", "skipped", "w_wrong", "wrong")}
        self.w_sum = zero(2, num_teachers)
        self.w_sq = zero(2, num_teachers)
        self.count = 0
        self.scaled = False  # saw fp16 (GradScaler) steps: report `skipped`

    def update(self, out, y: Tensor) -> None:
        """Add one step's :class:`~distill.distiller.StepOutput` (batch targets ``y``)."""
        b = out.per_sample.shape[0]
        values = {"loss": out.loss.detach(), **out.parts}
        if out.finite is not None:  # fp16: a skipped step adds nothing to the loss means
            values = {k: torch.where(out.finite, v, 0.0) for k, v in values.items()}
            self.sums["finite_images"] += out.finite.double() * b
            self.sums["skipped"] += 1 - out.finite.double()
            self.scaled = True
        else:
            self.sums["finite_images"] += b
        for k, v in values.items():
            self.sums[k] += v * b
        labels = hard_labels(y)
        self.sums["correct"] += out.logits.detach().argmax(1).eq(labels).sum()
        if out.weights is not None:
            w = torch.stack([out.weights.logit, out.weights.feat]).double()  # (2, B, M)
            self.w_sum += w.sum(1)
            self.w_sq += w.pow(2).sum(1)
            if out.teachers is not None:
                wrong = out.teachers.logits.argmax(-1).ne(labels).t()  # (B, M): teacher m misses sample b
                self.sums["w_wrong"] += (w[0] * wrong).sum()
                self.sums["wrong"] += wrong.sum()
        self.count += b

    def reduced(self) -> "EpochMeter":
        """Return a copy whose sums cover every rank (itself when not distributed)."""
        if not distributed.is_distributed():
            return self
        out = EpochMeter.__new__(EpochMeter)
        keys = list(self.sums)
        flat = torch.cat([torch.stack([self.sums[k] for k in keys]), self.w_sum.flatten(), self.w_sq.flatten(),
                          torch.tensor([float(self.count)], dtype=torch.float64, device=self.w_sum.device)])
        distributed.all_reduce_sum([flat])
        out.sums = {k: flat[i] for i, k in enumerate(keys)}
        n, size = len(keys), self.w_sum.numel()
        out.w_sum = flat[n:n + size].view_as(self.w_sum)
        out.w_sq = flat[n + size:n + 2 * size].view_as(self.w_sq)
        out.count = int(flat[-1].item())
        out.scaled = self.scaled
        return out

    def read(self) -> Dict[str, float]:
        """Return the epoch-to-date means ``loss, ce, kd, feat`` (finite steps), ``top1`` (%) and
        the number of ``skipped`` (non-finite fp16) steps."""
        values = {k: v.item() for k, v in self.sums.items()}
        images = values["finite_images"]
        if images == 0 and self.count:  # every step so far skipped: no finite loss to report
            out = {k: float("nan") for k in self.LOSSES}
        else:
            out = {k: values[k] / max(images, 1.0) for k in self.LOSSES}
        out["top1"] = 100.0 * values["correct"] / max(self.count, 1)
        if self.scaled:
            out["skipped"] = values["skipped"]
        return out

    def weight_stats(self, names: List[str]) -> Dict[str, float]:
        """Return per teacher the epoch's mean and std of the logit and feature weights
        (``w_logit_mean/<name>`` ...) and ``w_logit_wrong``: the mean logit weight on a teacher
        that misclassifies the sample, times M (1.0: no less than uniform; 0: never; NaN: no
        teacher missed, or ``optim.accum_steps > 1``: an accumulated step keeps no teacher outputs)."""
        n = max(self.count, 1)
        mean = (self.w_sum / n).cpu()
        std = (self.w_sq / n - mean.to(self.w_sq.device).pow(2)).clamp_min(0).sqrt().cpu()
        stats = {}
        for level, label in enumerate(("logit", "feat")):
            for m, name in enumerate(names):
                stats[f"w_{label}_mean/{name}"] = mean[level, m].item()
                stats[f"w_{label}_std/{name}"] = std[level, m].item()
        wrong = self.sums["wrong"].item()
        stats["w_logit_wrong"] = self.sums["w_wrong"].item() / wrong * len(names) if wrong else float("nan")
        return stats
