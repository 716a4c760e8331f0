"""``aver``: equal weights 1/M for every teacher and sample (the paper's AVER baseline)."""

from __future__ import annotations

from torch import Tensor

from ..signals import Signals, StudentOutputs, TeacherOutputs
from .base import Weights, WeightingPolicy, register_policy, uniform_weights


@register_policy
class AverPolicy(WeightingPolicy):
    """Equal weights: ``w_l = w_f = 1/M``."""

    name = "aver"

    def weights(self, signals: Signals, teachers: TeacherOutputs, student: StudentOutputs,
                target: Tensor) -> Weights:
        """Return ``1/M`` for every sample and teacher, shape ``(B, M)``."""
        w = uniform_weights(signals.student_ce.shape[0], self.num_teachers, signals.student_ce)
        return Weights(w, w)
