"""Per-sample losses. Each returns one value per sample, shape ``(B,)`` (or ``(M,B)``
when teacher tensors carry a leading teacher axis); reductions happen in the Distiller."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Return the cross-entropy of ``logits (..., B, C)`` against ``target``, shape ``(..., B)``.

    ``target`` is either class indices ``(B,)`` or a soft distribution ``(B, C)`` (mixup,
    label smoothing); a leading teacher axis on ``logits`` broadcasts.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    if target.dtype in (torch.int64, torch.int32):
        index = target.expand(log_p.shape[:-1]).unsqueeze(-1)
        return -log_p.gather(-1, index).squeeze(-1)
    return -(target.float() * log_p).sum(-1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Return Hinton's KD loss ``T^2 KL(p_T || p_S)`` at temperature ``T``, shape ``(..., B)``.

    ``student_logits (B, C)``; ``teacher_logits (B, C)`` or ``(M, B, C)`` (one value per
    teacher and sample). Teacher logits are treated as constants.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature**2


def fitnet_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Return FitNet's squared error, averaged over all non-batch dims, shape ``(B,)``.

    Both inputs have the same shape ``(B, ...)`` (the student's already projected into
    the teacher's space).
    """
    diff = student_feature.float() - teacher_feature.detach().float()
    return diff.pow(2).flatten(1).mean(1)
