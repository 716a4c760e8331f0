"""SIGINT / SIGTERM during training: stop after the current step, exit 128 + signal number."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Dict

import torch

from .. import distributed
from ..errors import DistillError


class TrainingInterrupted(DistillError):
    """SIGINT / SIGTERM stopped training after a finished step; exit code 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
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

    def __enter__(self) -> "StopOnSignal":
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
