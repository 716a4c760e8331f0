"""Tests only: fault and timing hooks for distill processes that tests start as subprocesses.

A test puts this folder on the child's ``PYTHONPATH`` (after the worktree);
Python imports this module at start-up, and each ``DISTILL_TEST_*`` variable set in the
environment wraps one production function (nothing in ``distill`` knows about tests):

- ``DISTILL_TEST_STEP_DELAY=S``: after each training batch print ``DISTILL_TEST_STEP <epoch>
  <batch>`` to stderr and sleep S seconds (a signal then lands mid-epoch);
- ``DISTILL_TEST_PAUSE_AT=checkpoint-rename|checkpoint-commit`` (``DISTILL_TEST_PAUSE_S``,
  default 30): print ``DISTILL_TEST_PAUSED <point>`` and sleep before the tensors file is
  renamed into place, or before the JSON commit, of a checkpoint save;
- ``DISTILL_TEST_FAIL_WRITE=SUBSTRING[@N]``: writes to paths containing SUBSTRING fail with
  ``ENOSPC`` (a full disk), from the N-th such write of the process on (default 1);
- ``DISTILL_TEST_SHARD_DELAY=S``: sleep S seconds after recording each finished teacher-cache
  shard (a kill then lands between shards).
"""

import errno
import functools
import os
import sys
import time


def _seconds(name: str) -> float:
    return float(os.environ.get(name, "0") or 0)


def _step_delay(seconds: float) -> None:
    from distill.engine.loop import Trainer

    original = Trainer._train_batch

    @functools.wraps(original)
    def train_batch(self, x, y, teachers, meter, epoch, index, started, bar):
        logged = original(self, x, y, teachers, meter, epoch, index, started, bar)
        print(f"DISTILL_TEST_STEP {epoch} {index}", file=sys.stderr, flush=True)
        time.sleep(seconds)
        return logged

    Trainer._train_batch = train_batch


def _pause_at(point: str) -> None:
    from distill import checkpoint

    name = {"checkpoint-rename": "install_tensors", "checkpoint-commit": "commit_state"}[point]
    original = getattr(checkpoint, name)

    @functools.wraps(original)
    def paused(tmp, path):
        print(f"DISTILL_TEST_PAUSED {point}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("DISTILL_TEST_PAUSE_S", "30")))
        return original(tmp, path)

    setattr(checkpoint, name, paused)


def _fail_write(spec: str) -> None:
    from distill import checkpoint, fileio

    fragment, _, nth = spec.rpartition("@") if "@" in spec else (spec, "", "1")
    hits = [0]
    original = fileio.write_temp

    @functools.wraps(original)
    def write_temp(path, write):
        if fragment in str(path):
            hits[0] += 1
            if hits[0] >= int(nth):
                raise fileio.write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)))
        return original(path, write)

    fileio.write_temp = write_temp  # atomic_write's
    checkpoint.write_temp = write_temp  # the checkpoint's two files


def _shard_delay(seconds: float) -> None:
    from distill.cache import build

    original = build.write_shard

    @functools.wraps(original)
    def write_shard(*args, **kwargs):
        original(*args, **kwargs)
        time.sleep(seconds)

    build.write_shard = write_shard


if _seconds("DISTILL_TEST_STEP_DELAY"):
    _step_delay(_seconds("DISTILL_TEST_STEP_DELAY"))
if os.environ.get("DISTILL_TEST_PAUSE_AT"):
    _pause_at(os.environ["DISTILL_TEST_PAUSE_AT"])
if os.environ.get("DISTILL_TEST_FAIL_WRITE"):
    _fail_write(os.environ["DISTILL_TEST_FAIL_WRITE"])
if _seconds("DISTILL_TEST_SHARD_DELAY"):
    _shard_delay(_seconds("DISTILL_TEST_SHARD_DELAY"))
