"""Optimisers and LR schedules by name (``optim.name``, ``schedule.name``), on the registries.

Each is a timm factory call (``create_optimizer_v2``, ``create_scheduler_v2``); adding one
is one function with one ``@OPTIMIZERS.register`` / ``@SCHEDULES.register`` line.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from .recipe import OptimConfig, ScheduleConfig
from .registries import OPTIMIZERS, SCHEDULES


@OPTIMIZERS.register("sgd")
def sgd(module: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum (Nesterov when ``optim.nesterov``)."""
    return create_optimizer_v2(module, opt="sgd" if cfg.nesterov else "momentum", lr=cfg.lr,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                               filter_bias_and_bn=cfg.filter_bias_and_bn)


@OPTIMIZERS.register("adamw")
def adamw(module: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay)."""
    return create_optimizer_v2(module, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                               filter_bias_and_bn=cfg.filter_bias_and_bn)


def build_optimizer(module: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Return the optimiser ``cfg.name`` over ``module``'s trainable parameters."""
    return OPTIMIZERS.get(cfg.name, "optim.name")(module, cfg)


def _timm_schedule(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, sched: str,
                   **extra: Any):
    kwargs: Dict[str, Any] = dict(sched=sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                  warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, decay_rate=cfg.decay_rate,
                                  updates_per_epoch=steps_per_epoch, step_on_epochs=True)
    kwargs.update(extra)
    scheduler, _ = create_scheduler_v2(optimizer, **kwargs)
    return scheduler


@SCHEDULES.register("multistep")
def multistep(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
    """The LR times ``schedule.decay_rate`` at each of ``schedule.milestones`` (epochs)."""
    return _timm_schedule(optimizer, cfg, steps_per_epoch, "multistep", decay_milestones=cfg.decay_epochs())


@SCHEDULES.register("cosine")
def cosine(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
    """Cosine decay to ``schedule.min_lr`` over the epochs."""
    return _timm_schedule(optimizer, cfg, steps_per_epoch, "cosine")


@SCHEDULES.register("constant")
def constant(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
    """The LR held (after any warm-up)."""
    return _timm_schedule(optimizer, cfg, steps_per_epoch, "step", decay_epochs=cfg.epochs + 1, decay_rate=1.0)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
    """Return the epoch-stepped timm scheduler ``cfg.name`` (warm-up in epochs)."""
    return SCHEDULES.get(cfg.name, "schedule.name")(optimizer, cfg, steps_per_epoch)
