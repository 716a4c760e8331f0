"""The one training step of the toolkit: :class:`TrainStep`.

The trainer, the dry run and ``benchmarks/step_cost.py`` all call it: autocast (bf16 / fp16
with a ``GradScaler``), gradient accumulation over micro-batches (``no_sync`` under DDP on
all but the last), clipping after unscaling, the optimiser step, ``policy.observe`` on
every micro-batch and the EMA update, around :meth:`distill.distiller.Distiller.forward`.
:func:`distill.build.build_train_step` assembles one from a recipe.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, TypeVar

import torch
from timm.utils import dispatch_clip_grad
from torch import Tensor, nn

from .checkpoint import EMA_PREFIX, STUDENT_PREFIX, prefixed, split_prefix
from .distiller import Distiller, StepOutput
from .errors import DistillError
from .policies import Weights
from .runtime import PRECISIONS, autocast
from .signals import TeacherOutputs

R = TypeVar("R")


@dataclass
class TrainSettings:
    """How :class:`TrainStep` runs a step (the recipe's run / optim fields)."""

    precision: str = "fp32"  # fp32 | bf16 | fp16 (resolved: no auto)
    accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"  # norm | value | agc
    channels_last: bool = False
    ema_decay: Optional[float] = None  # None: no EMA
    ema_warmup: bool = False


class TrainStep:
    """Optimiser, loss scaler, accumulation and clipping around a :class:`Distiller` ``task``.

    Call it as ``step(x, y, teachers=None)`` (:meth:`train_step`). The task is set up for
    ``settings`` by the builder (memory format, EMA); the step keeps the fp16 ``GradScaler``.
    """

    def __init__(self, task: Distiller, optimizer: torch.optim.Optimizer, settings: TrainSettings):
        if settings.precision not in PRECISIONS:
            raise ValueError(f"precision {settings.precision!r} is not one of {', '.join(PRECISIONS)}")
        self.task, self.optimizer, self.settings = task, optimizer, settings
        self.dtype = PRECISIONS[settings.precision]
        self.scaler = torch.amp.GradScaler(task.device.type) if settings.precision == "fp16" else None

    @property
    def trainable(self) -> nn.Module:
        """Return what the optimiser steps: the task's student + projectors."""
        return self.task.trainable

    @property
    def student(self) -> nn.Module:
        """Return the student timm model."""
        return self.task.student

    @property
    def ema(self) -> Optional[nn.Module]:
        """Return the task's EMA of the student (timm ``ModelEmaV3``), or None."""
        return self.task.ema

    @property
    def ema_updates(self) -> int:
        """Return the number of EMA updates so far."""
        return self.task.ema_updates

    def _clipped_parameters(self) -> List[nn.Parameter]:
        params = [p for p in self.trainable.parameters() if p.grad is not None]
        if self.settings.clip_mode != "agc":
            return params
        head = {id(p) for p in self.student.get_classifier().parameters()}  # timm: AGC leaves the head out
        return [p for p in params if id(p) not in head]

    def train_step(self, x: Tensor, target: Tensor, teachers: Optional[TeacherOutputs] = None) -> StepOutput:
        """Run one training step on batch ``x`` ``(B, ...)`` with labels ``(B,)`` or soft targets
        ``(B, C)``: forward under autocast, backward (fp16: scaled), accumulated over
        ``accum_steps`` micro-batches, clipped, the optimiser step, ``policy.observe`` on every
        micro-batch and the EMA update. ``teachers``: the pool's outputs for ``x`` when they came
        with the batch (teacher cache); None: the live pool runs. Returns the batch's
        :class:`StepOutput` (detached loss).

        Each micro-batch's mean loss is weighted by its share of ``B``, so an accumulated step
        equals one step on the whole batch (BatchNorm statistics aside).
        """
        st, task = self.settings, self.task
        if st.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        n = min(st.accum_steps, x.shape[0])
        chunks = list(zip(x.tensor_split(n), target.tensor_split(n),
                          split_teachers(teachers, n) if teachers is not None else [None] * n))
        self.optimizer.zero_grad(set_to_none=True)
        outs: List[StepOutput] = []
        for i, (xc, yc, tc) in enumerate(chunks):
            with task.no_sync() if i < n - 1 else contextlib.nullcontext():
                with autocast(x.device, self.dtype):
                    out = task(xc, yc, tc)
                loss = out.loss * (xc.shape[0] / x.shape[0]) if n > 1 else out.loss
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if task.policy is not None and out.signals is not None:
                task.policy.observe(out.signals, out.weights, out.teachers, out.student, yc)
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
        if task.ema is not None:
            task.update_ema()
        return merge_outputs(outs, x.shape[0], self.scaler is not None)

    __call__ = train_step

    def state_dict(self) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """Return the step's checkpoint ``(tensors, state)``: the trainable part's tensors
        (``student.*``, ``projectors.*``, ``ema.*``) and the JSON-able state (``policy``,
        ``scaler``, ``ema_updates``, ``optimizer``; tensors inside are moved out on save)."""
        task = self.task
        tensors = {**prefixed(task.student.state_dict(), STUDENT_PREFIX),
                   **prefixed(task.trainable.projectors.state_dict(), "projectors.")}
        if task.ema is not None:
            tensors.update(prefixed(task.ema.module.state_dict(), EMA_PREFIX))
        state = {"policy": task.policy.state_dict() if task.policy is not None else {},
                 "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                 "ema_updates": task.ema_updates if task.ema is not None else None,
                 "optimizer": self.optimizer.state_dict()}
        return tensors, state

    def load_state_dict(self, tensors: Dict[str, Tensor], state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (raises RuntimeError when a tensor does not
        fit, :class:`DistillError` when the EMA this step keeps is not in the checkpoint)."""
        task = self.task
        task.student.load_state_dict(split_prefix(tensors, STUDENT_PREFIX))
        task.trainable.projectors.load_state_dict(split_prefix(tensors, "projectors."))
        if task.ema is not None:
            ema = split_prefix(tensors, EMA_PREFIX)
            if not ema or state.get("ema_updates") is None:
                raise DistillError("the checkpoint holds no EMA of the student (run.ema was off when it was written)")
            task.ema.module.load_state_dict(ema)
            task.ema_updates = int(state["ema_updates"])
        if task.policy is not None:
            task.policy.load_state_dict(state["policy"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


def split_teachers(teachers: TeacherOutputs, n: int) -> List[TeacherOutputs]:
    """Return ``teachers`` cut along the batch into ``n`` parts (as ``Tensor.tensor_split``)."""
    logits = teachers.logits.tensor_split(n, dim=1)
    features = [f.tensor_split(n) for f in teachers.features]
    embeddings = [e.tensor_split(n) for e in teachers.embeddings]
    return [TeacherOutputs(logits[i], [f[i] for f in features], [e[i] for e in embeddings]) for i in range(n)]


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


def saved_activation_bytes(run: Callable[[], R], params: Iterable[Tensor]) -> Tuple[R, int]:
    """Return ``(run(), bytes)``: the bytes of the distinct tensor storages autograd saved for
    backward while ``run`` ran (``saved_tensors_hooks``), storages of ``params`` and meta
    tensors left out: the activation memory a step holds at its peak, on any device."""
    excluded = {p.untyped_storage().data_ptr() for p in params}
    saved: Dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded and storage.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return result, sum(saved.values())
