"""The held-out CE gradient for ``reward: heldout`` (learning to reweight, Ren et al. 2018).

Does a step on teacher m's term of sample i lower the student's CE on samples it is *not*
being trained on at that moment? To first order, an SGD step of size eta on ``term_m[i]``
changes the held-out CE by ``-eta <grad_theta term_m[i], grad_theta CE_H>``; the reward is
that inner product (the held-out CE decrease per unit learning rate), taken in the space
``theta = (W, b)`` of the student's linear classifier ``z = W h + b``.

There per-sample gradients are outer products: ``grad_W term_m[i] = g_mi h_i^T`` and
``grad_b term_m[i] = g_mi`` with ``g_mi = d term_m[i] / d z_i`` ``(C,)`` and ``h_i`` the
classifier's input ``(d,)``. With the held-out gradient ``G_W = mean_k e_k h_k^T``,
``G_b = mean_k e_k`` (``e_k = p_k - y_k``, soft targets in place of ``y_k`` under mixup)::

    u[i, m] = <g_mi h_i^T, G_W> + <g_mi, G_b> = g_mi . (G_W h_i + G_b)

one ``(B, d) x (d, C)`` product per step: no per-sample backward, no extra pass through the
student.

The held-out batch is the previous training (micro-)batch: its ``e_k`` and ``h_k`` come
from its own forward, so ``G`` is its CE gradient at the classifier one optimiser step ago
(first order either way). Inside a torch.distributed job ``G`` is averaged over ranks (the
global previous batch, as one process would see it). The first step of a run has no held-out
batch yet: every reward is 0 there (no preference). ``G`` is checkpointed.

Why the classifier's space: a teacher whose soft labels put mass on the classes similar to
the label moves the classifier rows of those classes towards ``h_i``, which lowers the CE of
held-out samples *of those classes* (their features resemble ``h_i``); the same-sample
cosine (``reward: align``) sees only that the mass goes against sample i's own label and
penalises it. The feature terms do not reach the classifier's parameters, so the feature
level keeps the same-sample cosine of ``align`` (exact per sample).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ...distributed import is_distributed


def ce_logit_gradient(logits: Tensor, target: Tensor) -> Tensor:
    """Return ``d CE[i] / d z_i = softmax(z_i) - y_i`` per sample, shape ``(B, C)``, for labels
    ``(B,)`` or soft targets ``(B, C)``."""
    p = logits.detach().float().softmax(-1)
    if target.dtype in (torch.int64, torch.int32):
        return p - F.one_hot(target.long(), p.shape[-1]).float()
    return p - target.detach().float()


def heldout_alignment(logit_grads: Tensor, embedding: Tensor, weight_grad: Tensor,
                      bias_grad: Optional[Tensor]) -> Tensor:
    """Return ``u[i, m] = <grad_theta term_m[i], G>`` in the classifier's parameter space,
    shape ``(B, M)``: ``logit_grads (M, B, C)`` the per-sample gradients of each teacher's term
    on the logits, ``embedding (B, d)`` the classifier's input, ``weight_grad (C, d)`` and
    ``bias_grad (C,)`` (None: a classifier without bias) the held-out gradient."""
    v = embedding.detach().float() @ weight_grad.t()  # (B, C): G_W h_i
    if bias_grad is not None:
        v = v + bias_grad
    return torch.einsum("mbc,bc->bm", logit_grads.float(), v)


class HeldoutGradient:
    """The CE gradient of the previous (micro-)batch w.r.t. the student's linear classifier."""

    def __init__(self) -> None:
        self.weight: Optional[Tensor] = None  # (C, d)
        self.bias: Optional[Tensor] = None  # (C,), None without a bias

    def rewards(self, logit_grads: Tensor, embedding: Tensor) -> Tensor:
        """Return :func:`heldout_alignment` against the held gradient, ``(B, M)``; zeros before
        the first :meth:`update`."""
        if self.weight is None:
            return logit_grads.new_zeros(logit_grads.shape[1], logit_grads.shape[0]).float()
        return heldout_alignment(logit_grads, embedding, self.weight, self.bias)

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor, embedding: Tensor, bias: bool) -> None:
        """Hold this batch's CE gradient (``logits (B, C)``, labels or soft targets,
        classifier input ``embedding (B, d)``) for the next step's rewards."""
        e = ce_logit_gradient(logits, target)
        grads = [e.t() @ embedding.detach().float() / e.shape[0]] + ([e.mean(0)] if bias else [])
        if is_distributed():
            world = dist.get_world_size()
            for g in grads:
                dist.all_reduce(g)
                g.div_(world)
        self.weight, self.bias = grads[0], (grads[1] if bias else None)

    def state(self) -> Optional[Dict[str, Any]]:
        """Return the held gradient on the host for a checkpoint (None before the first update)."""
        if self.weight is None:
            return None
        return {"weight": self.weight.cpu(), "bias": None if self.bias is None else self.bias.cpu()}

    def load(self, state: Optional[Dict[str, Any]], device: torch.device) -> None:
        """Restore :meth:`state`'s output on ``device``."""
        if state is None:
            self.weight = self.bias = None
            return
        self.weight = state["weight"].to(device)
        self.bias = None if state["bias"] is None else state["bias"].to(device)
