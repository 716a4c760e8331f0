"""``camkd``: confidence-aware weights from the teachers' cross-entropy against the labels
(CA-MKD, Zhang et al. 2022), in the form of the MTKD-RL paper's Equ.(9)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..signals import Signals, StudentOutputs, TeacherOutputs
from .base import Weights, WeightingPolicy, register_policy


def confidence_weights(teacher_ce: Tensor) -> Tensor:
    """Return Equ.(9) ``(1 - softmax_m(CE_T)_m) / (M - 1)`` per sample, shape ``(B, M)``.

    ``teacher_ce (M, B)``. Rows sum to 1 (``sum_m (1 - s_m) = M - 1``); for ``M = 1`` the
    weight is 1.
    """
    m = teacher_ce.shape[0]
    if m == 1:
        return teacher_ce.new_ones(teacher_ce.shape[1], 1, dtype=teacher_ce.dtype).float()
    return ((1.0 - F.softmax(teacher_ce.detach().float(), dim=0)) / (m - 1)).t()


@register_policy
class ConfidencePolicy(WeightingPolicy):
    """Confidence-aware weights, the same at both levels (paper Equ. 9, ``K = M``)::

        w_l[i, m] = w_f[i, m] = (1 - exp(CE_Tm[i]) / sum_k exp(CE_Tk[i])) / (M - 1)

    ``CE_Tm[i]`` is teacher m's cross-entropy on sample i's label (soft targets under
    mixup); a teacher that fits the label better gets more weight. ``M = 1``: weight 1.
    """

    name = "camkd"

    def weights(self, signals: Signals, teachers: TeacherOutputs, student: StudentOutputs,
                target: Tensor) -> Weights:
        """Return Equ.(9) weights, shape ``(B, M)``, for both levels."""
        w = confidence_weights(signals.teacher_ce)
        return Weights(w, w)
