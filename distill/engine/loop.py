"""The training loop: epochs of :class:`~distill.step.TrainStep` calls, evaluation, checkpoints.

Per epoch: seeded from (seed, epoch), the scheduler stepped, every batch through the step
(with the teachers' outputs when they came with it from the cache), metrics summed on the
device (:class:`~distill.engine.metrics.EpochMeter`), evaluation (and the EMA student's),
``last`` / ``best`` checkpoints and ``summary.csv`` (:mod:`distill.engine.rundir`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor
from tqdm import tqdm

from .. import distributed
from ..errors import DistillError
from ..logger import open_logger
from ..recipe import RunConfig, ScheduleConfig
from ..resolve import DataSpec, student_metadata
from ..runtime import epoch_seed, seed_everything, set_deterministic
from ..signals import TeacherOutputs
from ..step import TrainStep
from .evaluate import evaluate
from .interrupt import StopOnSignal
from .metrics import EpochMeter
from . import rundir
from .rundir import Progress


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) training run reports."""

    final_top1: float
    final_top5: float
    best_top1: float
    best_epoch: int
    epochs: int
    wall_time: float


def mix_batch(mixup: Callable, x: Tensor, y: Tensor):
    """Return ``mixup(x, y)``: the mixed batch and soft targets ``(B, C)`` (timm ``Mixup``).

    timm's batch mixing needs an even batch; an odd one (a dataset smaller than a batch)
    is left unmixed and only gets the smoothed one-hot targets.
    """
    if x.shape[0] % 2 == 0:
        return mixup(x, y)
    from timm.data.mixup import mixup_target

    return x, mixup_target(y, mixup.num_classes, 1.0, mixup.label_smoothing)


def batch_to(batch, device) -> Tuple[Tensor, Tensor, Optional[TeacherOutputs]]:
    """Return ``(x, y, teachers)`` of a loader's batch on ``device`` (copies not blocking the host).

    A batch is ``(x, y)``, or ``(x, y, TeacherOutputs)`` when the teachers' outputs came with
    it (:mod:`distill.cache.source`); ``teachers`` is None for the first (the live pool runs).
    """
    x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    teachers = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
    return x, y, teachers


class Trainer:
    """Trains ``step`` (its task's student + projectors) for ``schedule.epochs`` epochs in ``run_dir``.

    Writes ``summary.csv`` (one row per epoch), ``last`` and ``best`` checkpoints; with
    ``resume=True`` continues from ``last`` and, since every epoch is seeded from
    (seed, epoch), reproduces the uninterrupted run exactly. ``identity``: records the
    checkpoint stores and a resume must match.
    """

    def __init__(self, step: TrainStep, scheduler: Any, train_loader, val_loader, data: DataSpec, arch: str,
                 model_args: Dict[str, Any], schedule: ScheduleConfig, run: RunConfig, run_dir: Path, seed: int,
                 identity: Optional[Dict[str, Any]] = None, label: str = "train",
                 batch_transform: Optional[Callable] = None):
        self.step, self.scheduler = step, scheduler  # built by distill.build: on its device, with its optimiser
        self.distiller = step.task
        self.train_loader, self.val_loader = train_loader, val_loader
        self.data, self.arch, self.model_args = data, arch, model_args
        self.schedule, self.run = schedule, run
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.identity = identity or {}
        self.label = label
        self.batch_transform = batch_transform  # e.g. timm Mixup: (x, y) -> (x', soft targets (B, C))
        self.device = self.distiller.device
        self.logger = open_logger(run.log, self.run_dir) if distributed.is_main() else None
        self.progress = Progress()

    def _save(self, name: str, epoch: int) -> None:
        """Write checkpoint ``name`` (rank 0 only; every rank waits until it is on disk)."""
        if distributed.is_main():
            meta = student_metadata(self.arch, self.distiller.student, self.model_args, self.data)
            rundir.write_checkpoint(self.run_dir / name, self.step, self.scheduler, epoch, self.progress, self.identity,
                             meta)
        distributed.barrier()

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to the last epoch (continuing from ``last`` when ``resume``); return the result."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume and (self.run_dir / "last.json").is_file():
            self.progress = rundir.resume(self.run_dir / "last", self.step, self.scheduler, self.identity)
        set_deterministic(self.run.deterministic)
        started = time.perf_counter()
        try:
            with StopOnSignal() as self._stop:
                for epoch in range(self.progress.start_epoch, self.schedule.epochs):
                    self._fit_epoch(epoch)
        finally:
            if self.logger is not None:
                self.logger.close()
        p = self.progress
        last = p.history[-1] if p.history else {}
        return TrainResult(last.get("val_top1", float("nan")), last.get("val_top5", float("nan")),
                           p.best_top1, p.best_epoch, len(p.history), time.perf_counter() - started)

    def _fit_epoch(self, epoch: int) -> None:
        """Train, evaluate and checkpoint one epoch; on SIGINT / SIGTERM stop cleanly."""
        row = self._train_epoch(epoch)
        if row is None:  # a signal stopped the epoch after a finished step
            raise self._stop.interrupted(self.label, epoch, resumes_at=epoch)
        d, p = self.distiller, self.progress
        d.trainable.eval()
        val = evaluate(d.student, self.val_loader, self.device, self.step.dtype)
        row.update({f"val_{k}": v for k, v in val.items()})
        if d.ema is not None:  # the EMA student beside the raw one
            ema = evaluate(d.ema.module, self.val_loader, self.device, self.step.dtype, desc="eval ema")
            row.update({f"val_ema_{k}": v for k, v in ema.items()})
        p.history.append(row)
        is_best = val["top1"] > p.best_top1
        if is_best:
            p.best_top1, p.best_epoch = val["top1"], epoch
        self._save("last", epoch)
        if is_best:
            self._save("best", epoch)
        if distributed.is_main():
            rundir.write_summary(self.run_dir / "summary.csv", p.history)
        if self.logger is not None:
            self.logger.log(row, epoch + 1)
        if distributed.is_main():
            ema_note = f"  ema top1 {row['val_ema_top1']:.2f}" if "val_ema_top1" in row else ""
            print(f"[{self.label}] epoch {epoch + 1}/{self.schedule.epochs}  loss {row['train_loss']:.4f}  "
                  f"train top1 {row['train_top1']:.2f}  val top1 {val['top1']:.2f}  top5 {val['top5']:.2f}{ema_note}  "
                  f"{row['images_per_sec']:.0f} img/s", flush=True)
        if self._stop.requested(sync=True) and epoch + 1 < self.schedule.epochs:
            raise self._stop.interrupted(self.label, epoch, resumes_at=epoch + 1)

    def _train_epoch(self, epoch: int) -> Optional[Dict[str, float]]:
        """Return the epoch's summary row, or None when a signal stopped it after a finished step."""
        d = self.distiller
        seed_everything(epoch_seed(self.seed, epoch))
        if hasattr(self.train_loader.sampler, "set_epoch"):
            self.train_loader.sampler.set_epoch(epoch)
        self.scheduler.step(epoch)
        d.trainable.train()
        if d.policy is not None:
            d.policy.begin_epoch(epoch)
        meter = EpochMeter(self.device, len(d.pool))
        lr = self.step.optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"[{self.label}] epoch {epoch + 1}/{self.schedule.epochs}",
                   leave=False, disable=not (self.run.progress and sys.stderr.isatty()), file=sys.stderr)
        x = teachers = None
        for index, batch in enumerate(bar):
            x, y, teachers = batch_to(batch, self.device)
            logged = self._train_batch(x, y, teachers, meter, epoch, index, started, bar)
            # single process: stop after any finished step; DDP: agree at log steps (one tiny all_reduce)
            if index + 1 < len(self.train_loader) and self._stop.requested(sync=logged) and \
                    (logged or not distributed.is_distributed()):
                return None
        elapsed = time.perf_counter() - started
        values = self._check_finite(meter, epoch, len(self.train_loader) - 1, x if teachers is None else None)
        total = meter.reduced()
        row: Dict[str, float] = {"epoch": epoch + 1, "lr": lr}
        row.update({f"train_{k}": v for k, v in values.items()})
        row.update({"epoch_time": elapsed, "images_per_sec": total.count / max(elapsed, 1e-9)})
        if len(d.pool):
            row.update(total.weight_stats(d.pool.names))
        if d.policy is not None:
            row.update({f"policy/{k}": v for k, v in d.policy.end_epoch(epoch).items()})
        return row

    def _train_batch(self, x: Tensor, y: Tensor, teachers: Optional[TeacherOutputs], meter: EpochMeter, epoch: int,
                     index: int, started: float, bar) -> bool:
        """Run the step on batch ``index`` of ``epoch`` (on the device; ``teachers``: outputs carried
        with it, or None) and add it to ``meter``; return whether it was a log step (the running
        means were read and checked)."""
        if self.batch_transform is not None:
            x, y = mix_batch(self.batch_transform, x, y)
        meter.update(self.step(x, y, teachers), y)
        logged = (index + 1) % self.run.log_interval == 0
        if logged:
            values = self._check_finite(meter, epoch, index, x if teachers is None else None)
            seen = meter.count / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['top1']:.1f}", img_s=f"{seen:.0f}")
        return logged

    def _check_finite(self, meter: EpochMeter, epoch: int, step: int, x: Optional[Tensor]) -> Dict[str, float]:
        """Return the meter's means; raise when the loss is not finite, naming the first teacher whose
        outputs on ``x`` (the step's input batch; None: its teachers' outputs came from the cache,
        checked at load) are not finite when there is one. Under fp16 a non-finite step is the
        GradScaler's business (skipped, not a crash); only every step skipped raises."""
        values = meter.reduced().read()
        if not math.isfinite(values["loss"]):
            pool = self.distiller.pool
            if len(pool) and x is not None:
                pool.require_finite(pool(x))
            parts = ", ".join(f"{k}={values[k]:.4g}" for k in ("ce", "kd", "feat"))
            raise DistillError(f"[{self.label}] non-finite loss by epoch {epoch + 1} step {step + 1} "
                               f"(running means: {parts}); stopping without overwriting the last checkpoint")
        return values
