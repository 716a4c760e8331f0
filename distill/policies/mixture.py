"""``mixture``: the teachers as one mixture distribution in log space, distilled with ONE KD term.

From the multi-teacher feature request (shared/papers/multi-teacher-mixture-request.txt):
each teacher's tempered log-probabilities are combined as

    ``log p_mix = logsumexp_m(log w_m + log softmax(z_Tm / T))``,   ``w`` normalised to sum 1,

and the student's logit term is the single-teacher loss against ``p_mix``:
``T^2 KL(p_mix || p_S)`` (``logit_loss: kd``), or DIST against ``p_mix`` (``logit_loss: dist``;
the mixture enters DIST as the teacher logits ``T log p_mix``, whose tempered softmax is
``p_mix``). With one teacher this is exactly plain KD; with weights ``(1, 0, ...)`` exactly
KD against the first teacher.

Weights come from ``policy_args``:

- ``weights: [0.5, 0.3, 0.2]``: static per-teacher weights (non-negative, not all zero,
  one per teacher, normalised); default uniform.
- ``over: camkd`` / ``over: mtkd_rl`` (any registered policy but ``mixture``), with its own
  arguments in ``over_args: {...}``: per-sample weights ``w_l (B, M)`` from that policy, which
  receives every lifecycle call (``bind_heads``, ``setup``, ``begin_epoch``, ``observe``, ``end_epoch``) and
  whose state is checkpointed as ``inner.*``. An inner MTKD-RL agent is still rewarded with
  the per-teacher terms of Equ.(6) (the mixture has no per-teacher term), which measure how
  well the student matches each teacher.

The feature level has no mixture: ``feature_term`` is the usual ``sum_m w_f FEAT_m`` with
the static weights or the inner policy's ``w_f``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import losses
from ..signals import Signals, StudentOutputs, TeacherOutputs
from .base import POLICIES, TeacherHead, Weights, WeightingPolicy, register_policy


@register_policy
class MixturePolicy(WeightingPolicy):
    """One KD term against the log-space mixture of the teachers (see module docstring)."""

    name = "mixture"

    def __init__(self, num_teachers: int, weights: Optional[List[float]] = None, over: Optional[str] = None,
                 over_args: Optional[Dict[str, Any]] = None):
        super().__init__(num_teachers)
        type(self).check_args({"weights": weights, "over": over, "over_args": over_args})
        if weights is not None and len(weights) != num_teachers:
            raise ValueError(f"policy 'mixture': weights has {len(weights)} values for {num_teachers} teachers")
        self.logit_loss = "kd"
        self.inner: Optional[WeightingPolicy] = None
        if over is not None:
            self.inner = POLICIES[over](num_teachers, **(over_args or {}))
        static = torch.ones(num_teachers) if weights is None else torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("static", static / static.sum(), persistent=False)

    @classmethod
    def check_args(cls, args: Dict[str, Any]) -> None:
        """Raise ValueError for unknown keys or bad values (the inner policy's args included)."""
        super().check_args(args)
        weights, over, over_args = args.get("weights"), args.get("over"), args.get("over_args")
        if weights is not None:
            if (not isinstance(weights, (list, tuple)) or not weights
                    or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in weights)
                    or sum(weights) <= 0):
                raise ValueError(f"policy 'mixture': weights must be a list of non-negative numbers, "
                                 f"not all zero, got {weights!r}")
        if weights is not None and over is not None:
            raise ValueError("policy 'mixture': give weights or over, not both")
        if over is not None:
            if over == cls.name or over not in POLICIES:
                known = sorted(k for k in POLICIES if k != cls.name)
                raise ValueError(f"policy 'mixture': over must name another policy ({', '.join(known)}), got {over!r}")
            if over_args is not None and not isinstance(over_args, dict):
                raise ValueError(f"policy 'mixture': over_args must be a mapping, got {over_args!r}")
            POLICIES[over].check_args(over_args or {})
        elif over_args:
            raise ValueError("policy 'mixture': over_args needs over")

    def bind_heads(self, heads: Sequence[TeacherHead]) -> None:
        """Hand the teachers' heads on to the inner policy."""
        if self.inner is not None:
            self.inner.bind_heads(heads)

    def bind_student(self, projectors: Sequence[nn.Module], classifier: Optional[nn.Linear]) -> None:
        """Hand the projectors and the student's classifier on to the inner policy."""
        if self.inner is not None:
            self.inner.bind_student(projectors, classifier)

    def setup(self, teachers: TeacherOutputs, alpha: float = 1.0, beta: float = 5.0,
              temperature: float = 4.0, logit_loss: str = "kd") -> None:
        """Remember the logit loss; hand the call on to the inner policy."""
        self.logit_loss = logit_loss
        if self.inner is not None:
            self.inner.setup(teachers, alpha, beta, temperature, logit_loss)

    def weights(self, signals: Signals, teachers: TeacherOutputs, student: StudentOutputs,
                target: Tensor) -> Weights:
        """Return the inner policy's weights, or the static ones broadcast to ``(B, M)``."""
        if self.inner is not None:
            return self.inner.weights(signals, teachers, student, target)
        w = self.static.to(signals.student_ce.device).expand(signals.student_ce.shape[0], -1)
        return Weights(w, w)

    def logit_term(self, weights: Weights, signals: Signals, teachers: TeacherOutputs,
                   student: StudentOutputs, temperature: float) -> Tensor:
        """Return the per-sample loss against the teachers' mixture with ``w_l``, shape ``(B,)``."""
        if self.logit_loss == "dist":
            log_mix = losses.mixture_log_probs(teachers.logits, weights.logit, temperature)
            return losses.dist_loss(student.logits, temperature * log_mix, temperature)
        return losses.mixture_kd_loss(student.logits, teachers.logits, weights.logit, temperature)

    def begin_epoch(self, epoch: int) -> None:
        if self.inner is not None:
            self.inner.begin_epoch(epoch)

    def observe(self, signals: Signals, weights: Weights, teachers: TeacherOutputs, student: StudentOutputs,
                target: Tensor) -> None:
        if self.inner is not None:
            self.inner.observe(signals, weights, teachers, student, target)

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        return self.inner.end_epoch(epoch) if self.inner is not None else {}
