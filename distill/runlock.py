"""One ``distill-train`` per run directory: an OS lock (``fcntl.flock``) on ``<run_dir>/run.lock``.

The kernel drops the lock when the holder exits, crashed or not, so a lock never goes
stale; the file only records the holder's pid for the message a second run prints::

    with run_lock(recipe.run_dir):
        ...  # train
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator, Union

from .errors import DistillError
from .fileio import ensure_dir

LOCK_FILE = "run.lock"  # stays in the folder: the lock is on the open file, not its existence


@contextlib.contextmanager
def run_lock(run_dir: Union[str, Path]) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` (created if missing) for the ``with`` block; yield its path.

    Raises DistillError naming the holder's pid when another process holds it.
    """
    path = ensure_dir(run_dir, "run directory") / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DistillError(f"{path}: cannot open the run lock ({(exc.strerror or '').lower()})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise DistillError(f"{run_dir}: another distill-train (pid {holder}) is using this run directory; "
                               "wait for it to finish or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
