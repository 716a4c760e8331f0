"""The one builder of a training step: a :class:`~distill.distiller.Distiller` task on its
device with its :class:`~distill.step.TrainStep` (optimiser, settings).

The trainer (student distillation, teacher pre-training, the baseline), the dry run and
``benchmarks/step_cost.py`` all build their step here, so what is timed and checked is
what trains.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from . import distributed
from .distiller import Distiller
from .optim import build_optimizer
from .policies import build_policy
from .recipe import DistillConfig, OptimConfig, RunConfig
from .runtime import resolve_precision
from .step import TrainSettings, TrainStep
from .taps import FeatureTap
from .teachers import Teacher, TeacherPool


def train_settings(run: RunConfig, optim: OptimConfig, device: torch.device) -> TrainSettings:
    """Return the :class:`TrainSettings` of a recipe's ``run`` and ``optim`` sections on ``device``."""
    return TrainSettings(precision=resolve_precision(run.precision, device), accum_steps=optim.accum_steps,
                         clip_grad=optim.clip_grad, clip_mode=optim.clip_mode, channels_last=run.channels_last,
                         ema_decay=run.ema_decay if run.ema else None, ema_warmup=run.ema_warmup)


def build_train_step(student: nn.Module, teachers: Sequence[Teacher], tap: FeatureTap,
                     input_shape: Tuple[int, ...], distill: DistillConfig, optim: OptimConfig, run: RunConfig,
                     device: torch.device, wrap_ddp: bool = True) -> TrainStep:
    """Return the :class:`TrainStep` of a Distiller on ``device`` with its pool, policy,
    projectors, optimiser and step settings.

    ``run.channels_last`` puts the task in channels-last; ``run.ema`` keeps an EMA of the
    student; ``run.compile`` compiles the trainable part and each teacher; under torchrun
    (and ``wrap_ddp``) the trainable part is wrapped in DDP.
    """
    pool = TeacherPool(list(teachers)).to(device)
    policy = build_policy(distill.policy, len(pool), distill.policy_args) if len(pool) else None
    student.to(device)
    task = Distiller(student, pool, policy, tap, input_shape, distill.alpha, distill.beta,
                     distill.temperature, distill.logit_loss).to(device)
    optimizer = build_optimizer(task.trainable, optim)
    settings = train_settings(run, optim, device)
    if settings.channels_last:
        task.trainable.to(memory_format=torch.channels_last)
        task.pool.to(memory_format=torch.channels_last)
    if settings.ema_decay is not None:
        task.setup_ema(settings.ema_decay, settings.ema_warmup)
    step = TrainStep(task, optimizer, settings)
    if run.compile:
        task.compile()
    if wrap_ddp and distributed.is_distributed():
        task.prepare_distributed(run.sync_bn)
    return step
