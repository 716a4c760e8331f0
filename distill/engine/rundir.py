"""A training run's folder: ``last`` / ``best`` checkpoints, exact resume and ``summary.csv``.

A checkpoint holds the step's state (:meth:`distill.step.TrainStep.state_dict`: student,
projectors, EMA, policy, scaler, optimiser), the scheduler, the run's progress (epoch,
best top-1, history) and the caller's identity records, which a resume must match
(:func:`distill.manifest.record_differences`, the one identity check).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import DistillError
from ..fileio import atomic_write
from ..manifest import record_differences
from ..step import TrainStep


@dataclass
class Progress:
    """Where a run stands: the per-epoch rows so far, the best validation top-1 and the next epoch."""

    history: List[Dict[str, float]] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = -1
    start_epoch: int = 0


def write_checkpoint(stem: Path, step: TrainStep, scheduler: Any, epoch: int, progress: Progress,
                     identity: Dict[str, Any], metadata: Dict[str, str]) -> None:
    """Write checkpoint ``stem`` of a run at the end of ``epoch`` (``metadata``: the student's)."""
    tensors, step_state = step.state_dict()
    state = {"epoch": epoch, "best_top1": progress.best_top1, "best_epoch": progress.best_epoch,
             "history": progress.history, "scheduler": scheduler.state_dict(), **step_state, **identity}
    save_checkpoint(stem, tensors, state, metadata)


def resume(stem: Path, step: TrainStep, scheduler: Any, identity: Dict[str, Any]) -> Progress:
    """Load checkpoint ``stem`` into ``step`` and ``scheduler``; return the progress to continue from.

    Raises one-line :class:`DistillError`s when a record of ``identity`` differs from the
    checkpoint's or when the checkpoint does not fit the student.
    """
    tensors, state = load_checkpoint(stem)
    for key, expected in identity.items():
        lines = record_differences(state.get(key), expected, key, "in the checkpoint", "in this run")
        if lines:
            raise DistillError(f"{stem}: cannot resume, the checkpoint's {key} differs from this run's: "
                               + "; ".join(lines))
    try:
        step.load_state_dict(tensors, state)
    except RuntimeError as exc:
        raise DistillError(f"{stem}: checkpoint does not fit this student "
                           f"({str(exc).splitlines()[0][:200]})") from None
    except DistillError as exc:
        raise DistillError(f"{stem}: cannot resume: {exc}") from None
    scheduler.load_state_dict(state["scheduler"])
    return Progress(state["history"], state["best_top1"], state["best_epoch"], state["epoch"] + 1)


def write_summary(path: Path, history: List[Dict[str, float]]) -> None:
    """Write ``history`` (one row per epoch; columns in order of first appearance) as CSV to ``path``."""
    fields: List[str] = []
    for row in history:
        fields += [k for k in row if k not in fields]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)
