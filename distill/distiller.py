"""The Distiller task (an ``nn.Module`` in timm's ``timm/task`` shape): student + projectors
(the trainable part), the frozen teacher pool and the weighting policy.

One step, as data (see DESIGN.md)::

    teachers(x) -> TeacherOutputs        (inference_mode, one pass per teacher; or carried
                                          with the batch from the teacher cache)
    trainable(x) -> StudentOutputs       (student logits, tapped feature, r_m(feature))
    compute_signals(...) -> Signals      (CE, KD, FEAT, cos, KL; each (M, B); computed once)
    policy.weights(...) -> Weights       (w_l, w_f: (B, M), detached)
    per_sample = CE + alpha * sum_m w_l KD_m + beta * sum_m w_f FEAT_m      (B,)
    loss = per_sample.mean()             (the one reduction)

Only :attr:`Distiller.trainable` has parameters to train, so it alone is what an
optimiser (or DistributedDataParallel, :meth:`Distiller.prepare_distributed`) wraps; the
pool is never wrapped. :meth:`Distiller.forward` returns one batch's :class:`StepOutput`;
the optimiser, scaler, accumulation and clipping are :class:`distill.step.TrainStep`'s.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

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
        return StudentOutputs(out.logits, out.feature, [p(out.feature) for p in self.projectors],
                              out.embedding if self.tapped.split_head else None)


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
    student: Optional[StudentOutputs]  # None for an accumulated step (its micro-batches were observed)
    finite: Optional[Tensor] = None  # bool scalar: the loss was finite (False: an fp16 step the scaler skips)


class Distiller(nn.Module):
    """Multi-teacher distillation with the loss of Equ.(2) and a weighting policy.

    Submodules: :attr:`trainable` (student + projectors), :attr:`pool` (frozen teachers),
    :attr:`policy` and, after :meth:`setup_ema`, :attr:`ema` (timm ``ModelEmaV3`` of the
    student). With no teachers it reduces to plain cross-entropy training of the student
    (used for teacher pre-training and the no-KD baseline).
    """

    def __init__(self, student: nn.Module, pool: TeacherPool, policy: Optional[WeightingPolicy],
                 tap: FeatureTap, input_shape, alpha: float = 1.0, beta: float = 5.0,
                 temperature: float = 4.0, logit_loss: str = "kd"):
        super().__init__()
        self.pool = pool
        self.policy = policy
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.logit_loss = logit_loss
        projectors = self._size_projectors(student, tap, input_shape) if len(pool) else []
        self.trainable = StudentWithProjectors(student, tap, input_shape, projectors)
        if policy is not None:
            tapped = self.trainable.tapped
            policy.bind_student(list(projectors), student.get_classifier() if tapped.split_head else None)
        self.ema = None  # timm ModelEmaV3 of the student (setup_ema)
        self.ema_updates = 0
        # the DDP wrapper of `trainable` (prepare_distributed); kept off the module tree so that
        # state_dict() and to() see `trainable` once
        object.__setattr__(self, "ddp", None)

    def _size_projectors(self, student: nn.Module, tap: FeatureTap, input_shape) -> List[nn.Module]:
        """Return one projector per teacher, sized from feature shapes on a dummy batch."""
        param = next(student.parameters())
        x = torch.zeros(2, *input_shape, device=param.device)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            s_feat = TappedModel(student, tap, tuple(input_shape))(x).feature
            t_out = self.pool(x)
            self.pool.require_finite(t_out)
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

    @property
    def device(self) -> torch.device:
        """Return the device of the trainable parameters."""
        return next(self.trainable.parameters()).device

    # -- set-up (timm's task vocabulary) ------------------------------------------

    def setup_ema(self, decay: float, warmup: bool = False) -> "Distiller":
        """Keep a timm ``ModelEmaV3`` of the student (on its device, in its memory format); returns self."""
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(self.student, decay=decay, use_warmup=warmup)
        self.ema_updates = 0
        return self

    def update_ema(self) -> None:
        """Move the EMA one update towards the student (timm's ``update(model, step=updates)``)."""
        self.ema_updates += 1
        self.ema.update(self.student, step=self.ema_updates)

    def compile(self, **kwargs: Any) -> "Distiller":
        """``torch.compile`` the trainable part and, separately, each frozen teacher (in place,
        state-dict keys unchanged); the policy's agent stays eager. Returns self."""
        self.trainable.compile(**kwargs)
        for teacher in self.pool.teachers:
            teacher.tapped.compile(**kwargs)
        return self

    def prepare_distributed(self, sync_bn: bool = False) -> "Distiller":
        """Wrap :attr:`trainable` (student + projectors) in DistributedDataParallel; teachers stay
        unwrapped. With ``sync_bn`` its BatchNorms become SyncBatchNorm first (CUDA only). Returns self."""
        from torch.nn.parallel import DistributedDataParallel

        from .errors import DistillError

        device = self.device
        if sync_bn:
            if device.type != "cuda":
                raise DistillError("run.sync_bn: SyncBatchNorm needs CUDA devices; it is not available on CPU")
            converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.trainable)
            assert converted is self.trainable  # the root is not a BatchNorm: children replaced in place
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        object.__setattr__(self, "ddp", DistributedDataParallel(self.trainable, device_ids=ids))
        return self

    def no_sync(self):
        """Return a context in which DDP skips its gradient all-reduce (a null context without DDP)."""
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    # -- one batch ----------------------------------------------------------------

    def forward(self, x: Tensor, target: Tensor, teachers: Optional[TeacherOutputs] = None) -> StepOutput:
        """Return the :class:`StepOutput` of batch ``x`` ``(B, ...)`` with labels ``(B,)`` or soft
        targets ``(B, C)``.

        ``teachers``: the pool's outputs for ``x`` when they came with the batch (the teacher
        cache); None: the live pool runs on ``x``. The student runs through its DDP wrapper
        after :meth:`prepare_distributed`.
        """
        # Teachers first: their activations are freed before the student's, which autograd
        # keeps for backward, are allocated, so the two never coexist (the step's peak memory
        # is the larger of the two, not their sum; benchmarks/step_cost.py). Teachers are in
        # eval mode and draw no random numbers, so the order changes no result.
        if teachers is None and len(self.pool):
            teachers = self.pool(x)
        student = (self.ddp if self.ddp is not None else self.trainable)(x)
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
