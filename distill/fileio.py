"""Reading and writing the files the tools touch, with one-line errors naming the file.

Reads (:func:`read_text`, :func:`read_json`, :func:`load_torch_file`) turn a missing file,
a directory, an unreadable, empty, undecodable or truncated file into a
:class:`~distill.errors.DistillError` ``<path>: <problem>``. Writes go through
:func:`atomic_write` (temporary file in the same folder, fsync, ``os.replace``), so a failed
write (full disk, no permission) leaves the previous file whole; :func:`ensure_dir` checks
an output folder before anything is written to it.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Union

from .errors import DistillError

PathLike = Union[str, Path]


def _problem(exc: OSError) -> str:
    """Return a short description of an OSError (``permission denied``, ``no space left on device``)."""
    return (exc.strerror or type(exc).__name__).lower()


def check_readable(path: PathLike, what: str = "file") -> Path:
    """Return ``path`` if it is a readable, non-empty regular file; else raise DistillError naming it."""
    path = Path(path)
    if not path.exists():
        raise DistillError(f"{path}: {what} not found")
    if path.is_dir():
        raise DistillError(f"{path}: is a directory, not a {what}")
    if not os.access(path, os.R_OK):
        raise DistillError(f"{path}: cannot read {what} (permission denied)")
    if path.stat().st_size == 0:
        raise DistillError(f"{path}: {what} is empty")
    return path


def read_bytes(path: PathLike, what: str = "file") -> bytes:
    """Return the contents of ``path``; a missing, directory, unreadable or empty file is a DistillError."""
    path = check_readable(path, what)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DistillError(f"{path}: cannot read {what} ({_problem(exc)})") from None


def read_text(path: PathLike, what: str = "file") -> str:
    """Return the UTF-8 text of ``path``; also a DistillError when it is not UTF-8 text."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DistillError(f"{path}: {what} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})") \
            from None


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """Return the parsed JSON of ``path``; invalid or truncated JSON is a DistillError naming the file."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DistillError(f"{path}: {what} is not valid JSON (truncated or corrupt: {exc})") from None


def load_torch_file(path: PathLike, what: str = "weights file") -> Dict[str, Any]:
    """Return the object of a ``torch.save`` file read with ``weights_only=True`` (plain tensors only).

    A file that carries code, or is truncated or not a torch file, is a DistillError naming it.
    """
    import pickle
    import zipfile

    import torch

    path = check_readable(path, what)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = " ".join(str(exc).split())
        if "weights_only" in text or "Unsupported global" in text or "Unpickl" in text:
            raise DistillError(f"{path}: cannot load weights: refused to unpickle objects beyond plain tensors "
                               "(weights_only=True); convert the file to safetensors") from None
        raise DistillError(f"{path}: cannot load {what}: truncated or corrupt ({text.split('. ')[0][:200]})") \
            from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise DistillError(f"{path}: cannot load {what}: truncated or not a torch file "
                           f"({text.split('. ')[0][:200]})") from None


def write_error(path: PathLike, exc: OSError) -> DistillError:
    """Return the one-line DistillError for a write to ``path`` that failed with ``exc``."""
    hint = "; free some space and resume with --resume" if exc.errno == errno.ENOSPC else ""
    return DistillError(f"{path}: cannot write ({_problem(exc)}); the previous file is kept{hint}")


def write_temp(path: PathLike, write: Callable[[str], None]) -> str:
    """Write a synced temporary file beside ``path`` through ``write(tmp_path)``; return its path.

    A failure (full disk, permission) removes the temporary and raises a DistillError naming
    ``path``; renaming it into place (one file, or several in order) is the caller's commit.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide run files from other users
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    return tmp


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` into a temporary beside it, fsync, then rename it in.

    A failure (full disk, permission) removes the temporary, keeps the old ``path`` whole and
    raises a DistillError naming ``path``.
    """
    tmp = write_temp(path, write)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc) from None


def write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def ensure_dir(path: PathLike, what: str = "output directory") -> Path:
    """Return ``path`` as an existing, writable folder (created if missing).

    An existing file at ``path`` (or above it), or a folder that cannot be created or
    written to, is a DistillError naming it.
    """
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise DistillError(f"{path}: cannot use as {what}: {parent} is an existing file")
        if parent.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistillError(f"{path}: cannot create {what} ({_problem(exc)})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DistillError(f"{path}: cannot write to {what} (permission denied)")
    return path


def require_finite(tensors: Mapping[str, Any], source: PathLike) -> None:
    """Refuse tensors holding NaN or infinity: a DistillError naming ``source`` (a file, or a model
    and its file) and the first bad tensor, with its count of NaN and infinite values. Integer and
    boolean tensors are finite by construction and are skipped."""
    import torch

    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor).sum())
            raise DistillError(f"{source}: tensor '{name}' holds non-finite values ({nan} NaN, "
                               f"{int((~finite).sum()) - nan} infinite of {tensor.numel()}); refusing a corrupt file")
