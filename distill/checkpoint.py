"""Checkpoints as safetensors + JSON, written atomically, never unpickled.

A checkpoint ``<stem>`` is two files:

- ``<stem>.safetensors``: every tensor (student ``student.*``, its EMA ``ema.*``, projectors ``projectors.*``,
  policy ``policy.*``, optimiser ``optim.*``, ...). Its metadata describes the student
  (``distill.arch``, ``distill.num_classes``, ``distill.model_args``, ``distill.data_config``)
  so the file alone can be evaluated or loaded as a model.
- ``<stem>.json``: everything else (epoch, metrics, scheduler, recipe, teacher sources)
  with tensors replaced by ``{"__tensor__": key}`` references into the safetensors file.

Both files carry the same random ``checkpoint_id``; the JSON is the commit marker. A save
writes both files to temporaries (fsync), moves the current ``<stem>.safetensors`` aside to
``<stem>.prev.safetensors``, renames the new tensors in, then the new JSON. A crash at any
point leaves either the new pair, or the old JSON with its tensors in ``<stem>.safetensors``
or ``<stem>.prev.safetensors``: :func:`load_checkpoint` follows the JSON's id to whichever
holds it (the previous checkpoint, complete). Ids that match neither file are an error.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import DistillError
from .fileio import check_readable, read_text, require_finite, write_error, write_temp

STUDENT_PREFIX = "student."
EMA_PREFIX = "ema."  # the EMA of the student (run.ema), same keys as student.*
_TENSOR_REF = "__tensor__"
_ITEMS = "__items__"


def flatten_state(obj: Any, prefix: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """Return ``obj`` as JSON data with every tensor moved into ``tensors`` under a dotted key."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {_TENSOR_REF: prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        # JSON keys are strings; keep other key types (an optimiser's int param ids) as pairs
        return {_ITEMS: [[k, flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def unflatten_state(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`: return ``obj`` with tensor references resolved."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            return tensors[obj[_TENSOR_REF]]
        if set(obj) == {_ITEMS}:
            return {k: unflatten_state(v, tensors) for k, v in obj[_ITEMS]}
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def _write_temp(path: Path, write) -> str:
    """Return the synced temporary written beside ``path`` by ``write(tmp_path)``
    (:func:`distill.fileio.write_temp`), its folder created first.

    A failed write (full disk, permission) is a DistillError naming ``path``; nothing is left behind.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    return write_temp(path, write)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def install_tensors(tmp: str, path: Path) -> None:
    """Rename a save's written tensors file ``tmp`` into place at ``path`` (not yet committed)."""
    os.replace(tmp, path)


def commit_state(tmp: str, path: Path) -> None:
    """Rename a save's written JSON ``tmp`` into place at ``path``: the commit of the checkpoint."""
    os.replace(tmp, path)


def save_checkpoint(stem: Union[str, Path], tensors: Dict[str, torch.Tensor], state: Dict[str, Any],
                    metadata: Dict[str, str]) -> None:
    """Write ``<stem>.safetensors`` (``tensors`` + ``metadata``) and ``<stem>.json`` (``state``).

    ``state`` may contain tensors; they are moved into the safetensors file.
    """
    stem = Path(stem)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    json_state = flatten_state(state, "state", tensors)
    checkpoint_id = uuid.uuid4().hex
    meta = {**metadata, "format": "pt", "distill.checkpoint_id": checkpoint_id}
    text = json.dumps({"checkpoint_id": checkpoint_id, **json_state}, indent=1, sort_keys=True)
    st_path, json_path, prev_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json"), _prev(stem)
    for path in (st_path, json_path):  # temporaries of a save that was killed (one writer per stem)
        for stale in stem.parent.glob(f".{path.name}.*"):
            stale.unlink(missing_ok=True)
    st_tmp = _write_temp(st_path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    try:
        json_tmp = _write_temp(json_path, lambda tmp: Path(tmp).write_text(text))
    except BaseException:
        Path(st_tmp).unlink(missing_ok=True)
        raise
    try:
        if _committed_tensors(json_path, st_path, prev_path) == st_path:
            os.replace(st_path, prev_path)  # keep the committed tensors until the new JSON lands
        install_tensors(st_tmp, st_path)
        commit_state(json_tmp, json_path)
    except BaseException:
        Path(st_tmp).unlink(missing_ok=True)
        Path(json_tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(stem.parent)


def _committed_tensors(json_path: Path, st_path: Path, prev_path: Path):
    """Return the tensors file (``st_path`` or ``prev_path``) the current JSON commits to, or None."""
    try:
        wanted = json.loads(json_path.read_text()).get("checkpoint_id")
    except (OSError, ValueError, AttributeError):
        return None
    for path in (st_path, prev_path):
        try:
            if path.is_file() and read_metadata(path).get("distill.checkpoint_id") == wanted:
                return path
        except DistillError:
            continue
    return None


def _prev(stem: Path) -> Path:
    return stem.with_name(stem.name + ".prev.safetensors")


def read_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """Return the metadata header of a safetensors file (no tensor is read)."""
    from safetensors import safe_open

    check_readable(path, "safetensors file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise DistillError(f"{path}: not a readable safetensors file ({exc})") from None


def load_tensors(path: Union[str, Path], device: str = "cpu") -> Dict[str, torch.Tensor]:
    """Return all tensors of a safetensors file; a corrupt file, or one holding NaN or infinity, is a
    DistillError naming it (and the tensor)."""
    check_readable(path, "safetensors file")
    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DistillError(f"{path}: not a readable safetensors file ({exc})") from None
    require_finite(tensors, path)
    return tensors


def load_checkpoint(stem: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Return ``(tensors, state)`` of checkpoint ``<stem>``, with state tensors resolved."""
    stem = Path(stem)
    st_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not json_path.is_file():
        raise DistillError(f"{json_path}: checkpoint file not found")
    try:
        raw = json.loads(read_text(json_path, "checkpoint state"))
    except json.JSONDecodeError as exc:
        raise DistillError(f"{json_path}: corrupt checkpoint state ({exc})") from None
    if not isinstance(raw, dict):
        raise DistillError(f"{json_path}: corrupt checkpoint state (not a JSON object)")
    wanted = raw.pop("checkpoint_id", None)
    candidates = [p for p in (st_path, _prev(stem)) if p.is_file()]
    if not candidates:
        raise DistillError(f"{st_path}: checkpoint file not found")
    for path in candidates:
        if read_metadata(path).get("distill.checkpoint_id") == wanted:
            if path != st_path:
                import sys

                print(f"warning: {stem}: the last save was interrupted before it completed; using the previous "
                      f"checkpoint ({path.name} + {json_path.name})", file=sys.stderr)
            tensors = load_tensors(path)
            try:
                return tensors, unflatten_state(raw, tensors)
            except KeyError as exc:
                raise DistillError(f"{json_path}: corrupt checkpoint state (missing tensor {exc})") from None
    raise DistillError(f"{stem}: the .json and .safetensors files belong to different checkpoints")


def split_prefix(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Return the tensors under ``prefix`` with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def prefixed(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Return ``state_dict`` with ``prefix`` added to every key."""
    return {prefix + k: v for k, v in state_dict.items()}
