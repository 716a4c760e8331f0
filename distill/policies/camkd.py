"""``camkd``: confidence-aware multi-teacher KD (CA-MKD, Zhang et al. 2022).

Both levels use the confidence weights of the MTKD-RL paper's Equ.(9),
``c = (1 - softmax_m(CE_m)) / (M - 1)`` per sample (:func:`confidence_weights`), on two
different cross-entropies against the label (soft targets under mixup):

``variant: published`` (default), CA-MKD as its paper and code (github.com/Rorozhl/CA-MKD,
``distiller_zoo/CAMKD.py``, ``helper/loops.py``) define it:

- logit weights ``w_l = c(CE(z_Tm, y))``: teacher m's own cross-entropy;
- feature weights ``w_f = c(CE(h_m(r_m(f_S)), y))``: the cross-entropy of teacher m's head
  ``h_m`` applied to the student's feature projected into teacher m's space
  (``student.projected[m]``), i.e. how well the student's feature, read by teacher m's
  classifier, predicts the label. ``h_m`` (:meth:`distill.taps.TappedModel.head`) is the
  classifier on the projected embedding for ``features: pre_logits``, ``forward_head`` on
  the projected map for ``last_map`` (what the authors' code does: the teacher's
  ``avgpool + fc`` on the regressed last-stage map), and for ViT patch tokens ``forward_head``
  with zero prefix tokens, which is the teacher's head only when it pools the patch tokens
  alone (timm's ``global_pool`` ``'avg'``, or ``'map'`` without the prefix tokens).
  :meth:`setup` checks each head against its teacher on the setup batch (the head on the
  teacher's own feature must give the teacher's logits) and raises ValueError where it does
  not (a class-token ViT head, an intermediate stage tap). Computed without grad; the
  weights enter the loss detached (the authors' code lets the feature weights' gradient
  reach the student; ours never do);
- the weighted sums are divided by M: ``logit_term = sum_m w_l KD_m / M``,
  ``feature_term = sum_m w_f FEAT_m / M`` (the code's ``/ (bsz * num_teacher)``), so the
  effective KD weights sum to ``1 / M``;
- no feature loss in the first epoch: ``w_f = 0`` in epoch 0 (the code's ``epoch == 1``).

The authors' scripts (``scripts/run.sh``) train CA-MKD with ``beta = 50`` on the last-stage
map with FitNet's mean squared error (our ``features: last_map``): that is the recipe's
``distill.beta: 50``, not a policy argument.

``variant: shared``: the former form, ``w_l = w_f = c(CE(z_Tm, y))`` at both levels, the
sums not divided by M, the feature loss on from epoch 0.

``M = 1``: every weight is 1 (feature weight 0 in epoch 0 for ``published``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import losses
from ..signals import Signals, StudentOutputs, TeacherOutputs
from .base import TeacherHead, Weights, WeightingPolicy, register_policy

VARIANTS = ("published", "shared")


def confidence_weights(teacher_ce: Tensor) -> Tensor:
    """Return Equ.(9) ``(1 - softmax_m(CE_T)_m) / (M - 1)`` per sample, shape ``(B, M)``.

    ``teacher_ce (M, B)``. Rows sum to 1 (``sum_m (1 - s_m) = M - 1``); for ``M = 1`` the
    weight is 1.
    """
    m = teacher_ce.shape[0]
    if m == 1:
        return teacher_ce.new_ones(teacher_ce.shape[1], 1, dtype=teacher_ce.dtype).float()
    return ((1.0 - F.softmax(teacher_ce.detach().float(), dim=0)) / (m - 1)).t()


def head_cross_entropy(heads: Sequence[TeacherHead], projected: Sequence[Tensor], target: Tensor) -> Tensor:
    """Return ``CE(h_m(projected[m]), target)`` for every teacher m, shape ``(M, B)``, without grad."""
    with torch.no_grad():
        return torch.stack([losses.cross_entropy(head(p.detach()), target) for head, p in zip(heads, projected)])


def check_heads(heads: Sequence[TeacherHead], teachers: TeacherOutputs) -> None:
    """Return None if each teacher's head on its own feature reproduces its logits on the setup
    batch (so it can score a projected student feature); raise ValueError naming the teacher."""
    if len(heads) != teachers.num_teachers:
        raise ValueError(f"policy 'camkd': {len(heads)} teacher heads for {teachers.num_teachers} teachers")
    advice = "use distill.features: pre_logits (or last_map on a CNN) or policy_args: {variant: shared}"
    for m, (head, feature) in enumerate(zip(heads, teachers.features)):
        try:
            logits = head(feature)
        except ValueError as err:
            raise ValueError(f"policy 'camkd' (variant published) scores the student's projected feature with "
                             f"teacher {m}'s head, but {err}; {advice}") from err
        expected = teachers.logits[m]
        if logits.shape != expected.shape or not torch.allclose(logits.float(), expected.float(),
                                                                rtol=1e-3, atol=1e-4):
            raise ValueError(f"policy 'camkd' (variant published): teacher {m}'s head applied to its own "
                             f"{tuple(feature.shape[1:])} feature does not give its logits (e.g. a ViT head "
                             f"reading the class token, which patch tokens lack), so it cannot score the "
                             f"student's projected feature; {advice}")


@register_policy
class ConfidencePolicy(WeightingPolicy):
    """CA-MKD confidence-aware weights (see the module docstring for both variants)."""

    name = "camkd"

    def __init__(self, num_teachers: int, variant: str = "published"):
        super().__init__(num_teachers)
        type(self).check_args({"variant": variant})
        self.variant = variant
        self.epoch = 0
        self.heads: Optional[List[TeacherHead]] = None  # plain list: teacher weights stay out of state_dict

    @classmethod
    def check_args(cls, args: Dict[str, Any]) -> None:
        """Raise ValueError for an unknown key or a variant other than published / shared."""
        super().check_args(args)
        if "variant" in args and args["variant"] not in VARIANTS:
            raise ValueError(f"policy 'camkd': variant must be one of {', '.join(VARIANTS)}, got {args['variant']!r}")

    @property
    def published(self) -> bool:
        """Return True for ``variant: published``."""
        return self.variant == "published"

    def bind_heads(self, heads: Sequence[TeacherHead]) -> None:
        """Keep the teachers' heads (``published`` scores projected student features with them)."""
        self.heads = list(heads)

    def setup(self, teachers: TeacherOutputs, alpha: float = 1.0, beta: float = 5.0,
              temperature: float = 4.0, logit_loss: str = "kd") -> None:
        """``published``: raise ValueError unless the bound heads fit the teachers (:func:`check_heads`)."""
        if self.published:
            check_heads(self._bound_heads(), teachers)

    def _bound_heads(self) -> List[TeacherHead]:
        if self.heads is None:
            raise ValueError("policy 'camkd' (variant published) needs the teachers' heads: call "
                             "bind_heads(pool.heads()) before setup (the Distiller does)")
        return self.heads

    def begin_epoch(self, epoch: int) -> None:
        """Remember the epoch: ``published`` has no feature loss in epoch 0."""
        self.epoch = epoch

    def weights(self, signals: Signals, teachers: TeacherOutputs, student: StudentOutputs,
                target: Tensor) -> Weights:
        """Return ``w_l`` and ``w_f``, each ``(B, M)``: confidence weights on the teachers' CE and,
        for ``published``, on the CE of their heads on the projected student features (0 in epoch 0)."""
        w_logit = confidence_weights(signals.teacher_ce)
        if not self.published:
            return Weights(w_logit, w_logit)
        if self.epoch == 0:
            return Weights(w_logit, torch.zeros_like(w_logit))
        return Weights(w_logit, confidence_weights(head_cross_entropy(self._bound_heads(), student.projected, target)))

    def logit_term(self, weights: Weights, signals: Signals, teachers: TeacherOutputs,
                   student: StudentOutputs, temperature: float) -> Tensor:
        """Return ``sum_m w_l KD_m``, divided by M for ``published``, shape ``(B,)``."""
        term = super().logit_term(weights, signals, teachers, student, temperature)
        return term / self.num_teachers if self.published else term

    def feature_term(self, weights: Weights, signals: Signals) -> Tensor:
        """Return ``sum_m w_f FEAT_m``, divided by M for ``published``, shape ``(B,)``."""
        term = super().feature_term(weights, signals)
        return term / self.num_teachers if self.published else term
