"""The one builder of a :class:`~distill.distiller.Distiller` ready to train.

The trainer (student distillation, teacher pre-training, the baseline), the dry run and
``benchmarks/step_cost.py`` all build their step here, so what is timed and checked is
what trains.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from . import distributed
from .distiller import Distiller, TrainSettings, resolve_precision
from .engine import build_optimizer
from .policies import build_policy
from .recipe import DistillConfig, OptimConfig, RunConfig
from .taps import FeatureTap
from .teachers import Teacher, TeacherPool


def train_settings(run: RunConfig, optim: OptimConfig, device: torch.device) -> TrainSettings:
    """Return the :class:`TrainSettings` of a recipe's ``run`` and ``optim`` sections on ``device``."""
    return TrainSettings(precision=resolve_precision(run.precision, device), accum_steps=optim.accum_steps,
                         clip_grad=optim.clip_grad, clip_mode=optim.clip_mode, channels_last=run.channels_last,
                         ema_decay=run.ema_decay if run.ema else None, ema_warmup=run.ema_warmup)


def build_distiller(student: nn.Module, teachers: Sequence[Teacher], tap: FeatureTap,
                    input_shape: Tuple[int, ...], distill: DistillConfig, optim: OptimConfig, run: RunConfig,
                    device: torch.device, wrap_ddp: bool = True) -> Distiller:
    """Return a Distiller on ``device`` with its pool, policy, projectors, optimiser and step settings.

    ``run.compile`` compiles the trainable part and each teacher; ``run.channels_last`` puts
    them in channels-last; ``run.ema`` keeps an EMA of the student; under torchrun (and
    ``wrap_ddp``) the trainable part is wrapped in DDP.
    """
    pool = TeacherPool(list(teachers)).to(device)
    policy = build_policy(distill.policy, len(pool), distill.policy_args) if len(pool) else None
    student.to(device)
    distiller = Distiller(student, pool, policy, tap, input_shape, distill.alpha, distill.beta,
                          distill.temperature, distill.logit_loss).to(device)
    optimizer = build_optimizer(distiller.trainable, optim)
    distiller.setup_training(optimizer, train_settings(run, optim, device))
    if run.compile:
        distiller.compile()
    if wrap_ddp and distributed.is_distributed():
        distiller.wrap_ddp(run.sync_bn)
    return distiller
