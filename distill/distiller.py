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

:meth:`Distiller.train_step` is the one training step of the toolkit (the trainer, the
dry run and ``benchmarks/step_cost.py`` all call it): autocast (bf16 / fp16 with a
``GradScaler``), gradient accumulation over micro-batches (``no_sync`` under DDP on all but
the last), clipping after unscaling, the optimiser step, ``policy.observe`` on every
micro-batch and the EMA update. :func:`distill.build.build_distiller` assembles one from a
recipe.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from timm.utils import dispatch_clip_grad

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
    student: Optional[StudentOutputs]  # None for an accumulated step (its micro-batches were observed)
    finite: Optional[Tensor] = None  # bool scalar: the loss was finite (False: an fp16 step the scaler skips)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """Return ``fp32`` / ``bf16`` / ``fp16`` for a recipe's ``run.precision`` on ``device``
    (``auto``: bf16 on CUDA when supported, else fp32)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Return an autocast context for ``dtype``, or a null context for fp32 (None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class TrainSettings:
    """How :meth:`Distiller.train_step` runs a step (the recipe's run / optim fields)."""

    precision: str = "fp32"  # fp32 | bf16 | fp16 (resolved: no auto)
    accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"  # norm | value | agc
    channels_last: bool = False
    ema_decay: Optional[float] = None  # None: no EMA
    ema_warmup: bool = False


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
        # training state (set by `setup_training`)
        self.settings = TrainSettings()
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scaler: Optional[torch.amp.GradScaler] = None
        self.ddp: Optional[nn.Module] = None  # DistributedDataParallel of `trainable` (wrap_ddp)
        self.ema = None  # timm ModelEmaV3 of the student
        self.ema_updates = 0

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

    def to(self, device: torch.device) -> "Distiller":
        """Move every part to ``device``; returns self."""
        self.trainable.to(device)
        self.pool.to(device)
        if self.policy is not None:
            self.policy.to(device)
        return self

    # -- training ----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Return the device of the trainable parameters."""
        return next(self.trainable.parameters()).device

    def setup_training(self, optimizer: torch.optim.Optimizer, settings: TrainSettings) -> "Distiller":
        """Attach the optimiser and the step's settings (scaler for fp16, EMA copy); returns self.

        Call after :meth:`to` (the EMA copy and the scaler live on the trainable's device).
        """
        if settings.precision not in PRECISIONS:
            raise ValueError(f"precision {settings.precision!r} is not one of {', '.join(PRECISIONS)}")
        self.optimizer, self.settings = optimizer, settings
        device = self.device
        self.scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
        if settings.channels_last:
            self.trainable.to(memory_format=torch.channels_last)
            self.pool.to(memory_format=torch.channels_last)
        if settings.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.student, decay=settings.ema_decay, use_warmup=settings.ema_warmup)
            self.ema_updates = 0
        return self

    def compile(self, **kwargs: Any) -> "Distiller":
        """``torch.compile`` the trainable part and, separately, each frozen teacher (in place,
        state-dict keys unchanged); the policy's agent stays eager. Returns self."""
        self.trainable.compile(**kwargs)
        for teacher in self.pool.teachers:
            teacher.tapped.compile(**kwargs)
        return self

    def wrap_ddp(self, sync_bn: bool = False) -> nn.Module:
        """Wrap :attr:`trainable` (student + projectors) in DistributedDataParallel; teachers stay
        unwrapped. With ``sync_bn`` its BatchNorms become SyncBatchNorm first (CUDA only)."""
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
        self.ddp = DistributedDataParallel(self.trainable, device_ids=ids)
        return self.ddp

    def _clipped_parameters(self) -> List[nn.Parameter]:
        params = [p for p in self.trainable.parameters() if p.grad is not None]
        if self.settings.clip_mode != "agc":
            return params
        head = {id(p) for p in self.student.get_classifier().parameters()}  # timm: AGC leaves the head out
        return [p for p in params if id(p) not in head]

    def train_step(self, x: Tensor, target: Tensor, keys: Optional[Tensor] = None) -> StepOutput:
        """Run one training step on batch ``x`` ``(B, ...)`` with labels ``(B,)`` or soft targets
        ``(B, C)``: forward under autocast, backward (fp16: scaled), accumulated over
        ``accum_steps`` micro-batches, clipped, the optimiser step, ``policy.observe`` on every
        micro-batch and the EMA update. Returns the batch's :class:`StepOutput` (detached loss).

        Each micro-batch's mean loss is weighted by its share of ``B``, so an accumulated step
        equals one step on the whole batch (BatchNorm statistics aside).
        """
        if self.optimizer is None:
            raise RuntimeError("Distiller.train_step: call setup_training(optimizer, settings) first")
        st = self.settings
        dtype = PRECISIONS[st.precision]
        device = x.device
        if st.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        n = min(st.accum_steps, x.shape[0])
        chunks = list(zip(x.tensor_split(n), target.tensor_split(n),
                          keys.tensor_split(n) if keys is not None else [None] * n))
        self.optimizer.zero_grad(set_to_none=True)
        outs: List[StepOutput] = []
        for i, (xc, yc, kc) in enumerate(chunks):
            last = i == n - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync:
                with autocast(device, dtype):
                    out = self.forward(xc, yc, trainable=self.ddp, keys=kc)
                share = xc.shape[0] / x.shape[0]
                loss = out.loss * share if n > 1 else out.loss
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if self.policy is not None and out.signals is not None:
                self.policy.observe(out.signals, out.weights, out.teachers, out.student, yc)
            outs.append(out)
        if self.scaler is not None:
            if st.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(self._clipped_parameters(), st.clip_grad, mode=st.clip_mode)
            self.scaler.step(self.optimizer)  # skipped when the gradients hold inf / NaN
            self.scaler.update()
        else:
            if st.clip_grad is not None:
                dispatch_clip_grad(self._clipped_parameters(), st.clip_grad, mode=st.clip_mode)
            self.optimizer.step()
        if self.ema is not None:
            self.ema_updates += 1
            self.ema.update(self.student, step=self.ema_updates)
        return merge_outputs(outs, x.shape[0], self.scaler is not None)

    def state_dict(self) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """Return ``(tensors, state)``: the trainable part's tensors (``student.*``,
        ``projectors.*``, ``ema.*``) and JSON-able state (policy, scaler, EMA update count)."""
        from .checkpoint import EMA_PREFIX, STUDENT_PREFIX, prefixed

        tensors = {**prefixed(self.student.state_dict(), STUDENT_PREFIX),
                   **prefixed(self.trainable.projectors.state_dict(), "projectors.")}
        if self.ema is not None:
            tensors.update(prefixed(self.ema.module.state_dict(), EMA_PREFIX))
        state = {"policy": self.policy.state_dict() if self.policy is not None else {},
                 "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                 "ema_updates": self.ema_updates if self.ema is not None else None}
        return tensors, state

    def load_state_dict(self, tensors: Dict[str, Tensor], state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (raises RuntimeError when a tensor does not fit)."""
        from .checkpoint import EMA_PREFIX, STUDENT_PREFIX, split_prefix
        from .errors import DistillError

        self.student.load_state_dict(split_prefix(tensors, STUDENT_PREFIX))
        self.trainable.projectors.load_state_dict(split_prefix(tensors, "projectors."))
        if self.ema is not None:
            ema = split_prefix(tensors, EMA_PREFIX)
            if not ema or state.get("ema_updates") is None:
                raise DistillError("the checkpoint holds no EMA of the student (run.ema was off when it was written)")
            self.ema.module.load_state_dict(ema)
            self.ema_updates = int(state["ema_updates"])
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

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


def merge_outputs(outs: List[StepOutput], batch: int, scaled: bool) -> StepOutput:
    """Return one detached :class:`StepOutput` for a step's micro-batch outputs (shares of
    ``batch``); with ``scaled`` (fp16) ``finite`` says whether the loss was finite."""
    if len(outs) == 1:
        o = outs[0]
        loss = o.loss.detach()
        return StepOutput(loss, o.per_sample.detach(), o.logits.detach(), o.parts, o.weights, o.signals,
                          o.teachers, o.student, torch.isfinite(loss) if scaled else None)
    shares = [o.per_sample.shape[0] / batch for o in outs]
    loss = sum(o.loss.detach() * w for o, w in zip(outs, shares))
    parts = {k: sum(o.parts[k] * w for o, w in zip(outs, shares)) for k in outs[0].parts}
    weights = None
    if outs[0].weights is not None:
        weights = Weights(torch.cat([o.weights.logit for o in outs]), torch.cat([o.weights.feat for o in outs]))
    return StepOutput(loss, torch.cat([o.per_sample.detach() for o in outs]),
                      torch.cat([o.logits.detach() for o in outs]), parts, weights, None, None, None,
                      torch.isfinite(loss) if scaled else None)
