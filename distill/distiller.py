"""The Distiller: student + projectors (the trainable part) + frozen teacher pool + policy.

One step, as data (see DESIGN.md)::

    teachers(x) -> TeacherOutputs        (inference_mode, one pass per teacher)
    trainable(x) -> StudentOutputs       (student logits, tapped feature, r_m(feature))
    compute_signals(...) -> Signals      (CE, KD, FEAT, cos, KL; each (M, B); computed once)
    policy.weights(...) -> Weights       (w_l, w_f: (B, M), detached)
    per_sample = CE + alpha * sum_m w_l KD_m + beta * sum_m w_f FEAT_m      (B,)
    loss = per_sample.mean()             (the one reduction)

Only :attr:`Distiller.trainable` has parameters to train, so it alone is what an
optimiser (or DistributedDataParallel) wraps; the pool is never wrapped.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .policies import Weights, WeightingPolicy
from .projectors import build_projector
from .signals import Signals, StudentOutputs, TeacherOutputs, compute_signals
from .taps import FeatureTap, TappedModel
from .teachers import TeacherPool
from . import losses


def build_projectors(student_shape, teacher_shapes, names: List[str], device: torch.device) -> List[nn.Module]:
    """Return one projector per teacher, initialised as a function of the two feature shapes.

    One number is drawn from the global RNG (so the run's seed still decides), and each
    projector is built under a private seed derived from it and from its (student, teacher)
    shapes: teachers whose features have the same shape start from the same projector. Any
    difference between their feature terms then comes from their targets, never from
    initialisation noise (a policy that compares teachers through their projectors, such as
    MTKD-RL's gradient-alignment reward, would otherwise prefer a lucky initialisation).
    """
    base = int(torch.randint(0, 2**31 - 1, (1,)).item())
    projectors = []
    for shape, name in zip(teacher_shapes, names):
        key = zlib.crc32(repr((tuple(student_shape), tuple(shape))).encode())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base ^ key)
            projectors.append(build_projector(student_shape, shape, name).to(device))
    return projectors


class StudentWithProjectors(nn.Module):
    """The trainable part: the student (tapped) and one projector per teacher."""

    def __init__(self, student: nn.Module, tap: FeatureTap, input_shape, projectors: List[nn.Module]):
        super().__init__()
        self.tapped = TappedModel(student, tap, tuple(input_shape))
        self.projectors = nn.ModuleList(projectors)

    @property
    def student(self) -> nn.Module:
        """Return the student timm model."""
        return self.tapped.model

    def forward(self, x: Tensor) -> StudentOutputs:
        """Return student logits ``(B, C)``, tapped feature and its projection per teacher."""
        out = self.tapped(x)
        return StudentOutputs(out.logits, out.feature, [p(out.feature) for p in self.projectors])


@dataclass
class StepOutput:
    """One step's loss and what the engine logs."""

    loss: Tensor  # scalar: mean over the batch of `per_sample`
    per_sample: Tensor  # (B,)
    logits: Tensor  # (B, C) student logits
    parts: Dict[str, Tensor]  # scalar batch means of ce / kd / feat (detached)
    weights: Optional[Weights]  # None without teachers
    signals: Optional[Signals]
    teachers: Optional[TeacherOutputs]
    student: StudentOutputs


class Distiller:
    """Multi-teacher distillation with the loss of Equ.(2) and a weighting policy.

    With no teachers it reduces to plain cross-entropy training of the student (used for
    teacher pre-training and the no-KD baseline).
    """

    def __init__(self, student: nn.Module, pool: TeacherPool, policy: Optional[WeightingPolicy],
                 tap: FeatureTap, input_shape, alpha: float = 1.0, beta: float = 5.0,
                 temperature: float = 4.0, logit_loss: str = "kd"):
        self.pool = pool
        self.policy = policy
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.logit_loss = logit_loss
        self.teacher_cache = None  # a distill.cache.store.TeacherCache: teachers' outputs by view key
        projectors = self._size_projectors(student, tap, input_shape) if len(pool) else []
        self.trainable = StudentWithProjectors(student, tap, input_shape, projectors)

    def _size_projectors(self, student: nn.Module, tap: FeatureTap, input_shape) -> List[nn.Module]:
        """Return one projector per teacher, sized from feature shapes on a dummy batch."""
        param = next(student.parameters())
        x = torch.zeros(2, *input_shape, device=param.device)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            s_feat = TappedModel(student, tap, tuple(input_shape))(x).feature
            t_out = self.pool(x)
            t_feats = t_out.features
            if self.policy is not None:
                self.policy.bind_heads(self.pool.heads())
                self.policy.setup(t_out, self.alpha, self.beta, self.temperature, self.logit_loss)
        student.train(was_training)
        return build_projectors(s_feat.shape[1:], [f.shape[1:] for f in t_feats], self.pool.names, param.device)

    @property
    def student(self) -> nn.Module:
        """Return the student timm model."""
        return self.trainable.student

    def to(self, device: torch.device) -> "Distiller":
        """Move every part to ``device``; returns self."""
        self.trainable.to(device)
        self.pool.to(device)
        if self.policy is not None:
            self.policy.to(device)
        return self

    def forward(self, x: Tensor, target: Tensor, trainable: Optional[nn.Module] = None,
                keys: Optional[Tensor] = None) -> StepOutput:
        """Return the :class:`StepOutput` of batch ``x`` with labels or soft targets ``target``.

        ``trainable`` overrides the module that runs the student (a DDP wrapper of
        :attr:`trainable`). ``keys`` ``(B,)``: the stored-view keys of ``x``
        (:mod:`distill.cache`); with :attr:`teacher_cache` set, the teachers' outputs are
        looked up by them instead of computed.
        """
        # Teachers first: their activations are freed before the student's, which autograd
        # keeps for backward, are allocated, so the two never coexist (the step's peak memory
        # is the larger of the two, not their sum; benchmarks/step_cost.py). Teachers are in
        # eval mode and draw no random numbers, so the order changes no result.
        teachers = None
        if len(self.pool):
            use_cache = self.teacher_cache is not None and keys is not None
            teachers = self.teacher_cache.lookup(keys) if use_cache else self.pool(x)
        student = (trainable or self.trainable)(x)
        if teachers is None:
            ce = losses.cross_entropy(student.logits, target)
            return StepOutput(ce.mean(), ce, student.logits, {"ce": ce.detach().mean()}, None, None, None, student)
        signals, weights, per_sample, parts = self.loss_head(student, teachers, target)
        return StepOutput(per_sample.mean(), per_sample, student.logits, parts, weights, signals, teachers, student)

    def loss_head(self, student: StudentOutputs, teachers: TeacherOutputs,
                  target: Tensor) -> Tuple[Signals, Weights, Tensor, Dict[str, Tensor]]:
        """Return Equ.(2) on given model outputs: the step's :class:`Signals`, the policy's
        weights (detached, ``(B, M)`` each), the per-sample loss ``(B,)`` and the detached batch
        means of its ce / kd / feat parts."""
        signals = compute_signals(student, teachers, target, self.temperature, self.logit_loss)
        weights = self.policy.weights(signals, teachers, student, target)
        weights = Weights(weights.logit.detach(), weights.feat.detach())
        logit_term = self.policy.logit_term(weights, signals, teachers, student, self.temperature)
        feat_term = self.policy.feature_term(weights, signals)
        per_sample = signals.student_ce + self.alpha * logit_term + self.beta * feat_term
        parts = {"ce": signals.student_ce.detach().mean(), "kd": logit_term.detach().mean(),
                 "feat": feat_term.detach().mean()}
        return signals, weights, per_sample, parts

    __call__ = forward
