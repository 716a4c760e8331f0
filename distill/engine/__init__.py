"""Training and evaluation loops, by job.

- :mod:`~distill.engine.loop`: the :class:`Trainer` (epochs of the one
  :class:`~distill.step.TrainStep`), :class:`TrainResult`, :func:`mix_batch`;
- :mod:`~distill.engine.evaluate`: top-1 / top-5 / loss of a model on a loader;
- :mod:`~distill.engine.metrics`: the :class:`EpochMeter` (sums kept on the device);
- :mod:`~distill.engine.interrupt`: SIGINT / SIGTERM stop after the current step;
- :mod:`~distill.engine.rundir`: checkpoints, exact resume, ``summary.csv``.

Device, seeds and precision are :mod:`distill.runtime` (below the step and the cache, which
both read them).
"""

from .evaluate import evaluate
from .interrupt import TrainingInterrupted
from .loop import Trainer, TrainResult, mix_batch
from .metrics import EpochMeter

__all__ = ["EpochMeter", "Trainer", "TrainResult", "TrainingInterrupted", "evaluate", "mix_batch"]
