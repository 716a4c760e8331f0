"""Training and evaluation loops: optimiser, schedule, autocast, per-epoch seeding,
progress, metrics aggregated on device, ``summary.csv``, ``last`` / ``best`` checkpoints
and exact resume at epoch boundaries."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import Tensor
from tqdm import tqdm

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .distiller import PRECISIONS, Distiller, autocast, resolve_precision
from .errors import DistillError
from .fileio import atomic_write
from .logger import open_logger
from .manifest import diff
from .recipe import OptimConfig, RunConfig, ScheduleConfig
from .registry import DataSpec, student_metadata


# ----------------------------------------------------------------------------- runtime


def resolve_device(name: str) -> torch.device:
    """Return the torch device for a recipe's ``run.device`` (``auto``: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"run.device={name}: CUDA is not available on this machine")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Return the autocast dtype for ``precision`` on ``device`` (None: full fp32)."""
    return PRECISIONS[resolve_precision(precision, device)]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Return the RNG seed of ``epoch``: every epoch is reproducible on its own (exact resume)."""
    return seed * 100_003 + epoch


def set_deterministic(enabled: bool) -> None:
    """Switch deterministic kernels on or off (cudnn autotuning is their opposite)."""
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(forward: Callable[[Tensor], Tensor], loader, device: torch.device,
             dtype: Optional[torch.dtype] = None, desc: str = "eval", progress: bool = False) -> Dict[str, float]:
    """Return ``{'top1', 'top5', 'loss'}`` (percent, percent, mean CE) of ``forward`` on ``loader``."""
    correct1 = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, file=sys.stderr):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = forward(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(y.unsqueeze(1))
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(1).sum()
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        count += y.shape[0]
    if distributed.is_distributed():  # sharded evaluation: sum every rank's shard
        total = torch.stack([correct1, correct5, loss_sum.double(), torch.tensor(float(count), device=device)])
        distributed.all_reduce_sum([total])
        correct1, correct5, loss_sum, count = total[0], total[1], total[2], int(total[3].item())
    if count == 0:
        raise DistillError("evaluation set is empty")
    return {"top1": 100.0 * correct1.item() / count, "top5": 100.0 * correct5.item() / count,
            "loss": loss_sum.item() / count}


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) training run reports."""

    final_top1: float
    final_top5: float
    best_top1: float
    best_epoch: int
    epochs: int
    wall_time: float


class EpochMeter:
    """Sums of the epoch's metrics kept on device; read (one host sync) at log intervals.

    A step whose loss was not finite under fp16 (``out.finite`` False: the GradScaler skips
    it and lowers its scale) is counted in ``skipped`` and left out of the loss means.
    With teachers it also sums the logit weight that went to (sample, teacher) pairs whose
    teacher's top-1 misses the sample's label: ``w_logit_wrong`` in :meth:`weight_stats`.
    """

    LOSSES = ("loss", "ce", "kd", "feat")

    def __init__(self, device: torch.device, num_teachers: int):
        zero = lambda *shape: torch.zeros(shape, device=device, dtype=torch.float64)  # noqa: E731
        self.sums = {k: zero() for k in (*self.LOSSES, "correct", "finite_images", "skipped", "w_wrong", "wrong")}
        self.w_sum = zero(2, num_teachers)
        self.w_sq = zero(2, num_teachers)
        self.count = 0
        self.scaled = False  # saw fp16 (GradScaler) steps: report `skipped`

    def update(self, out, y: Tensor) -> None:
        """Add one step's :class:`~distill.distiller.StepOutput` (batch targets ``y``)."""
        b = out.per_sample.shape[0]
        values = {"loss": out.loss.detach(), **out.parts}
        if out.finite is not None:  # fp16: a skipped step adds nothing to the loss means
            values = {k: torch.where(out.finite, v, 0.0) for k, v in values.items()}
            self.sums["finite_images"] += out.finite.double() * b
            self.sums["skipped"] += 1 - out.finite.double()
            self.scaled = True
        else:
            self.sums["finite_images"] += b
        for k, v in values.items():
            self.sums[k] += v * b
        labels = y if y.ndim == 1 else y.argmax(1)
        self.sums["correct"] += out.logits.detach().argmax(1).eq(labels).sum()
        if out.weights is not None:
            w = torch.stack([out.weights.logit, out.weights.feat]).double()  # (2, B, M)
            self.w_sum += w.sum(1)
            self.w_sq += w.pow(2).sum(1)
            if out.teachers is not None:
                wrong = out.teachers.logits.argmax(-1).ne(labels).t()  # (B, M): teacher m misses sample b
                self.sums["w_wrong"] += (w[0] * wrong).sum()
                self.sums["wrong"] += wrong.sum()
        self.count += b

    def reduced(self) -> "EpochMeter":
        """Return a copy whose sums cover every rank (itself when not distributed)."""
        if not distributed.is_distributed():
            return self
        out = EpochMeter.__new__(EpochMeter)
        keys = list(self.sums)
        flat = torch.cat([torch.stack([self.sums[k] for k in keys]), self.w_sum.flatten(), self.w_sq.flatten(),
                          torch.tensor([float(self.count)], dtype=torch.float64, device=self.w_sum.device)])
        distributed.all_reduce_sum([flat])
        out.sums = {k: flat[i] for i, k in enumerate(keys)}
        n, size = len(keys), self.w_sum.numel()
        out.w_sum = flat[n:n + size].view_as(self.w_sum)
        out.w_sq = flat[n + size:n + 2 * size].view_as(self.w_sq)
        out.count = int(flat[-1].item())
        out.scaled = self.scaled
        return out

    def read(self) -> Dict[str, float]:
        """Return the epoch-to-date means ``loss, ce, kd, feat`` (finite steps), ``top1`` (%) and
        the number of ``skipped`` (non-finite fp16) steps."""
        values = {k: v.item() for k, v in self.sums.items()}
        images = values["finite_images"]
        if images == 0 and self.count:  # every step so far skipped: no finite loss to report
            out = {k: float("nan") for k in self.LOSSES}
        else:
            out = {k: values[k] / max(images, 1.0) for k in self.LOSSES}
        out["top1"] = 100.0 * values["correct"] / max(self.count, 1)
        if self.scaled:
            out["skipped"] = values["skipped"]
        return out

    def weight_stats(self, names: List[str]) -> Dict[str, float]:
        """Return per teacher the epoch's mean and std of the logit and feature weights
        (``w_logit_mean/<name>`` ...) and ``w_logit_wrong``: the mean logit weight on a teacher
        that misclassifies the sample, times M (1.0: no less than uniform; 0: never; NaN: no
        teacher missed, or ``optim.accum_steps > 1``: an accumulated step keeps no teacher outputs)."""
        n = max(self.count, 1)
        mean = (self.w_sum / n).cpu()
        std = (self.w_sq / n - mean.to(self.w_sq.device).pow(2)).clamp_min(0).sqrt().cpu()
        stats = {}
        for level, label in enumerate(("logit", "feat")):
            for m, name in enumerate(names):
                stats[f"w_{label}_mean/{name}"] = mean[level, m].item()
                stats[f"w_{label}_std/{name}"] = std[level, m].item()
        wrong = self.sums["wrong"].item()
        stats["w_logit_wrong"] = self.sums["w_wrong"].item() / wrong * len(names) if wrong else float("nan")
        return stats


def build_optimizer(module: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Return the optimiser of ``cfg`` over ``module``'s trainable parameters (timm factory)."""
    if cfg.name == "sgd":
        return create_optimizer_v2(module, opt="sgd" if cfg.nesterov else "momentum", lr=cfg.lr,
                                   weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                   filter_bias_and_bn=cfg.filter_bias_and_bn)
    return create_optimizer_v2(module, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                               filter_bias_and_bn=cfg.filter_bias_and_bn)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
    """Return the epoch-stepped timm scheduler of ``cfg`` (warm-up in epochs)."""
    sched = {"multistep": "multistep", "cosine": "cosine", "constant": "step"}[cfg.name]
    kwargs: Dict[str, Any] = dict(sched=sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                  warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, decay_rate=cfg.decay_rate,
                                  updates_per_epoch=steps_per_epoch, step_on_epochs=True)
    if cfg.name == "multistep":
        kwargs["decay_milestones"] = cfg.decay_epochs()
    if cfg.name == "constant":
        kwargs.update(decay_epochs=cfg.epochs + 1, decay_rate=1.0)
    scheduler, _ = create_scheduler_v2(optimizer, **kwargs)
    return scheduler


def mix_batch(mixup: Callable, x: Tensor, y: Tensor):
    """Return ``mixup(x, y)``: the mixed batch and soft targets ``(B, C)`` (timm ``Mixup``).

    timm's batch mixing needs an even batch; an odd one (a dataset smaller than a batch)
    is left unmixed and only gets the smoothed one-hot targets.
    """
    if x.shape[0] % 2 == 0:
        return mixup(x, y)
    from timm.data.mixup import mixup_target

    return x, mixup_target(y, mixup.num_classes, 1.0, mixup.label_smoothing)


class Trainer:
    """Trains ``distiller.trainable`` for ``schedule.epochs`` epochs in ``run_dir``.

    Writes ``summary.csv`` (one row per epoch), ``last`` and ``best`` checkpoints; with
    ``resume=True`` continues from ``last`` and, since every epoch is seeded from
    (seed, epoch), reproduces the uninterrupted run exactly.
    """

    def __init__(self, distiller: Distiller, train_loader, val_loader, data: DataSpec, arch: str,
                 model_args: Dict[str, Any], schedule: ScheduleConfig, run: RunConfig,
                 run_dir: Path, seed: int, state_extra: Optional[Dict[str, Any]] = None, label: str = "train",
                 batch_transform: Optional[Callable] = None):
        self.distiller = distiller  # built by distill.build.build_distiller: on its device, with its optimiser
        self.train_loader, self.val_loader = train_loader, val_loader
        self.data, self.arch, self.model_args = data, arch, model_args
        self.schedule, self.run = schedule, run
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.state_extra = state_extra or {}
        self.label = label
        self.batch_transform = batch_transform  # e.g. timm Mixup: (x, y) -> (x', soft targets (B, C))
        if distiller.teacher_cache is not None and getattr(batch_transform, "mix_prob", 0.0) > 0:
            raise DistillError("run.teacher_cache: mixup / cutmix change the images after the teachers' "
                               "outputs were cached; set data.mixup=0 and data.cutmix=0, or run.teacher_cache=null")
        self.device = distiller.device
        self.dtype = PRECISIONS[distiller.settings.precision]
        self.optimizer = distiller.optimizer
        self.scheduler = build_scheduler(self.optimizer, schedule, len(train_loader))
        self.logger = open_logger(run.log, self.run_dir) if distributed.is_main() else None
        self.history: List[Dict[str, float]] = []
        self.best_top1, self.best_epoch, self.start_epoch = -1.0, -1, 0

    # -- checkpoints ----------------------------------------------------------

    def _save(self, name: str, epoch: int) -> None:
        """Write checkpoint ``name`` (rank 0 only; every rank waits until it is on disk)."""
        if distributed.is_main():
            self._write_checkpoint(name, epoch)
        distributed.barrier()

    def _write_checkpoint(self, name: str, epoch: int) -> None:
        d = self.distiller
        tensors, task_state = d.state_dict()
        state = {"epoch": epoch, "best_top1": self.best_top1, "best_epoch": self.best_epoch,
                 "history": self.history, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), **task_state, **self.state_extra}
        meta = student_metadata(self.arch, d.student, self.model_args, self.data)
        save_checkpoint(self.run_dir / name, tensors, state, meta)

    def _resume(self) -> None:
        tensors, state = load_checkpoint(self.run_dir / "last")
        for key, expected in self.state_extra.items():
            found, expected = state.get(key), json.loads(json.dumps(expected))
            if found != expected:
                lines = diff(found, expected, key, "in the checkpoint", "in this run")
                raise DistillError(f"{self.run_dir}/last: cannot resume, the checkpoint's {key} differs from this "
                                   f"run's: " + "; ".join(lines or [f"{key}: {found!r} vs {expected!r}"]))
        try:
            self.distiller.load_state_dict(tensors, state)
        except RuntimeError as exc:
            raise DistillError(f"{self.run_dir}/last: checkpoint does not fit this student "
                               f"({str(exc).splitlines()[0][:200]})") from None
        except DistillError as exc:
            raise DistillError(f"{self.run_dir}/last: cannot resume: {exc}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = state["history"]
        self.best_top1, self.best_epoch = state["best_top1"], state["best_epoch"]
        self.start_epoch = state["epoch"] + 1

    def _write_summary(self) -> None:
        if not distributed.is_main():
            return
        path = self.run_dir / "summary.csv"
        fields: List[str] = []
        for row in self.history:
            fields += [k for k in row if k not in fields]
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.history)

        atomic_write(path, write)

    # -- loops ----------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to the last epoch (continuing from ``last`` when ``resume``); return the result."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume and (self.run_dir / "last.json").is_file():
            self._resume()
        set_deterministic(self.run.deterministic)
        started = time.perf_counter()
        try:
            with _StopOnSignal() as self._stop:
                for epoch in range(self.start_epoch, self.schedule.epochs):
                    self._fit_epoch(epoch)
        finally:
            if self.logger is not None:
                self.logger.close()
        last = self.history[-1] if self.history else {}
        return TrainResult(last.get("val_top1", float("nan")), last.get("val_top5", float("nan")),
                           self.best_top1, self.best_epoch, len(self.history), time.perf_counter() - started)

    def _fit_epoch(self, epoch: int) -> None:
        """Train, evaluate and checkpoint one epoch; on SIGINT / SIGTERM stop cleanly."""
        row = self._train_epoch(epoch)
        if row is None:  # a signal stopped the epoch after a finished step
            raise self._stop.interrupted(self.label, epoch, resumes_at=epoch)
        self.distiller.trainable.eval()
        val = evaluate(self._student_logits, self.val_loader, self.device, self.dtype)
        row.update({f"val_{k}": v for k, v in val.items()})
        if self.distiller.ema is not None:  # the EMA student beside the raw one
            ema = evaluate(self.distiller.ema.module, self.val_loader, self.device, self.dtype, desc="eval ema")
            row.update({f"val_ema_{k}": v for k, v in ema.items()})
        self.history.append(row)
        is_best = val["top1"] > self.best_top1
        if is_best:
            self.best_top1, self.best_epoch = val["top1"], epoch
        self._save("last", epoch)
        if is_best:
            self._save("best", epoch)
        self._write_summary()
        if self.logger is not None:
            self.logger.log(row, epoch + 1)
        if distributed.is_main():
            ema_note = f"  ema top1 {row['val_ema_top1']:.2f}" if "val_ema_top1" in row else ""
            print(f"[{self.label}] epoch {epoch + 1}/{self.schedule.epochs}  loss {row['train_loss']:.4f}  "
                  f"train top1 {row['train_top1']:.2f}  val top1 {val['top1']:.2f}  top5 {val['top5']:.2f}{ema_note}  "
                  f"{row['images_per_sec']:.0f} img/s", flush=True)
        if self._stop.requested(sync=True) and epoch + 1 < self.schedule.epochs:
            raise self._stop.interrupted(self.label, epoch, resumes_at=epoch + 1)

    def _student_logits(self, x: Tensor) -> Tensor:
        return self.distiller.student(x)

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
        lr = self.optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"[{self.label}] epoch {epoch + 1}/{self.schedule.epochs}",
                   leave=False, disable=not (self.run.progress and sys.stderr.isatty()), file=sys.stderr)
        for step, batch in enumerate(bar):  # (x, y), or (x, y, view keys) with run.teacher_cache
            x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
            keys = batch[2].to(self.device, non_blocking=True) if len(batch) > 2 else None
            if self.batch_transform is not None:
                x, y = mix_batch(self.batch_transform, x, y)
            out = d.train_step(x, y, keys)
            meter.update(out, y)
            logged = (step + 1) % self.run.log_interval == 0
            if logged:
                values = self._check_finite(meter, epoch, step, x)
                seen = meter.count / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['top1']:.1f}", img_s=f"{seen:.0f}")
            if _TEST_STEP_DELAY:  # tests only: slow steps down so a signal lands mid-epoch
                print(f"DISTILL_TEST_STEP {epoch} {step}", file=sys.stderr, flush=True)
                time.sleep(_TEST_STEP_DELAY)
            # single process: stop after any finished step; DDP: agree at log steps (one tiny all_reduce)
            if step + 1 < len(self.train_loader) and self._stop.requested(sync=logged) and \
                    (logged or not distributed.is_distributed()):
                return None
        elapsed = time.perf_counter() - started
        values = self._check_finite(meter, epoch, len(self.train_loader) - 1, x)
        total = meter.reduced()
        row: Dict[str, float] = {"epoch": epoch + 1, "lr": lr}
        row.update({f"train_{k}": v for k, v in values.items()})
        row.update({"epoch_time": elapsed, "images_per_sec": total.count / max(elapsed, 1e-9)})
        if len(d.pool):
            row.update(total.weight_stats(d.pool.names))
        if d.policy is not None:
            row.update({f"policy/{k}": v for k, v in d.policy.end_epoch(epoch).items()})
        return row

    def _check_finite(self, meter: EpochMeter, epoch: int, step: int, x: Tensor) -> Dict[str, float]:
        """Return the meter's means; raise when the loss is not finite, naming the first teacher whose
        outputs on ``x`` (the step's input batch) are not finite when there is one. Under fp16 a
        non-finite step is the GradScaler's business (skipped, not a crash); only every step skipped raises."""
        values = meter.reduced().read()
        if not math.isfinite(values["loss"]):
            pool = self.distiller.pool
            if len(pool) and self.distiller.teacher_cache is None:  # cached outputs were checked at load
                pool.require_finite(pool(x))
            parts = ", ".join(f"{k}={values[k]:.4g}" for k in ("ce", "kd", "feat"))
            raise DistillError(f"[{self.label}] non-finite loss by epoch {epoch + 1} step {step + 1} "
                               f"(running means: {parts}); stopping without overwriting the last checkpoint")
        return values


_TEST_STEP_DELAY = float(os.environ.get("DISTILL_TEST_STEP_DELAY", "0") or 0)  # seconds per step; tests only


class TrainingInterrupted(DistillError):
    """SIGINT / SIGTERM stopped training after a finished step; exit code 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class _StopOnSignal:
    """Turns SIGINT / SIGTERM into a request to stop after the current step (main thread only).

    Nothing is written on the signal: the ``last`` checkpoint of the previous epoch boundary
    stays the resume point (an epoch is cheap to redo relative to the bookkeeping a
    mid-epoch checkpoint needs), and a checkpoint being written when the signal arrives is
    finished first. A second signal of the same kind gets the default behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum == signum:  # asked twice: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def requested(self, sync: bool = False) -> bool:
        """Return True when a signal asked to stop (with ``sync`` under DDP: on any rank)."""
        if sync and distributed.is_distributed():
            flag = torch.tensor([float(self.signum)], dtype=torch.float64)
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signum = self.signum or int(flag.item())
        return self.signum != 0

    def interrupted(self, label: str, epoch: int, resumes_at: int) -> TrainingInterrupted:
        name = signal.Signals(self.signum).name if self.signum else "a signal"
        where = (f"the last checkpoint (end of epoch {resumes_at}) is intact" if resumes_at > 0
                 else "no checkpoint was written yet")
        return TrainingInterrupted(f"[{label}] stopped by {name} in epoch {epoch + 1}; {where}; run again with "
                                   f"--resume to continue from the start of epoch {resumes_at + 1}",
                                   self.signum or signal.SIGINT)
