"""Optional metric loggers beside ``summary.csv`` (which is always written)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from .errors import DistillError


class TensorBoardLogger:
    """Writes each epoch's ``summary.csv`` row (numeric columns, per-teacher weights included)
    as TensorBoard scalars under ``<run_dir>/tensorboard``; the step is the epoch number."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DistillError("run.log=tensorboard: the tensorboard package is not installed "
                               "(pip install 'distill[tensorboard]')") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, row: Dict[str, float], epoch: int) -> None:
        """Write every numeric value of ``row`` at step ``epoch``."""
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def open_logger(kind: str, run_dir: Path) -> Optional[TensorBoardLogger]:
    """Return the logger of ``run.log`` (None for ``csv``: summary.csv alone)."""
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir)
    return None
