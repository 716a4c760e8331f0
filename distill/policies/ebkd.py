"""``ebkd``: entropy-based weights (Kwon et al. 2020, "Adaptive knowledge distillation based
on entropy"): a more confident teacher (lower prediction entropy) gets a larger weight."""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from ..signals import Signals, StudentOutputs, TeacherOutputs
from .base import Weights, WeightingPolicy, register_policy


def entropy_weights(teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Return ``softmax_m(-H(p_Tm))`` per sample, shape ``(B, M)``, from ``teacher_logits (M, B, C)``.

    ``p_Tm = softmax(z_Tm / temperature)`` and ``H(p) = -sum_c p_c ln p_c`` (nats; ``0 ln 0 = 0``).
    """
    p = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    entropy = torch.special.entr(p).sum(-1)  # (M, B)
    return F.softmax(-entropy, dim=0).t()


@register_policy
class EntropyPolicy(WeightingPolicy):
    """Entropy-based weights, the same at both levels.

    Per sample ``i`` and teacher ``m``::

        H[i, m] = -sum_c p[i, m, c] ln p[i, m, c],   p[i, m] = softmax(z_Tm[i] / temperature)
        w_l[i, m] = w_f[i, m] = exp(-H[i, m]) / sum_k exp(-H[i, k])

    ``temperature`` (default 1: the teacher's own predictive distribution) is only for the
    entropy, independent of the KD temperature. Labels are not used, so a confidently
    wrong teacher is up-weighted (the weakness CA-MKD addresses).
    """

    name = "ebkd"

    def __init__(self, num_teachers: int, temperature: float = 1.0):
        super().__init__(num_teachers)
        self.temperature = float(temperature)

    @classmethod
    def check_args(cls, args: Dict[str, Any]) -> None:
        super().check_args(args)
        t = args.get("temperature", 1.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise ValueError(f"policy 'ebkd': temperature must be a number > 0, got {t!r}")

    def weights(self, signals: Signals, teachers: TeacherOutputs, student: StudentOutputs,
                target: Tensor) -> Weights:
        """Return ``softmax_m(-H(p_Tm))``, shape ``(B, M)``, for both levels."""
        w = entropy_weights(teachers.logits, self.temperature)
        return Weights(w, w)
