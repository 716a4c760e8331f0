"""Provenance of a run: content hashes of models and readable differences between records.

``record_hash(record)`` is the hex SHA-256 of a JSON record's sorted serialisation: the key of
a teacher cache and of a run's stored teacher metrics.

``content_hash(model)`` is a SHA-256 over a model's ``state_dict`` as loaded (sorted keys;
each key, dtype, shape and raw bytes), so two teachers hash alike exactly when they compute
the same function, wherever their weights came from (Hub, file, URL, trained here).

``diff(old, new)`` lists how two JSON-like records differ, one readable line per leaf::

    teachers[1] (1:hf-hub:org/net).commit: 'a1b2...' in the checkpoint, 'c3d4...' now

``record_differences(stored, expected)`` is the one identity check of the toolkit (a
resumed run against its checkpoint, a trained teacher against its folder, a teacher cache
against the recipe): ``expected`` as it would be stored, then ``diff``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, List

import torch
from torch import nn

_MAX_VALUE = 80  # characters of a value shown in a difference line


def record_hash(record: Any) -> str:
    """Return the hex SHA-256 (64 digits) of ``record`` serialised as JSON with sorted keys.

    Raises ``TypeError`` for a value JSON cannot hold, rather than hashing an object's repr."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def content_hash(model: nn.Module) -> str:
    """Return the hex SHA-256 of ``model.state_dict()`` (parameters and buffers)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        header = f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0{tensor.nbytes}\0"
        digest.update(header.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 3] + "..."


def _label(path: str, item: Any) -> str:
    """Return the path of a list item, with its ``name`` when it has one (a teacher)."""
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        return f"{path} ({item['name']})"
    return path


def _same(a: Any, b: Any) -> bool:
    """Return whether two leaves are equal; True vs 1 differ, 1 vs 1.0 do not."""
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, numbers) and isinstance(b, numbers):
        return a == b
    return type(a) is type(b) and a == b


def diff(old: Any, new: Any, path: str = "", old_label: str = "in the checkpoint",
         new_label: str = "now") -> List[str]:
    """Return one line per difference between JSON-like ``old`` and ``new`` (empty: equal).

    Mappings are compared key by key, lists item by item (items with a ``name`` are labelled
    with it); a key or item present on one side only is reported as added or missing.
    """
    lines: List[str] = []
    where = path or "(whole record)"
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                lines.append(f"{sub}: {_show(old[key])} {old_label}, absent {new_label}")
            elif key not in old:
                lines.append(f"{sub}: absent {old_label}, {_show(new[key])} {new_label}")
            else:
                lines += diff(old[key], new[key], sub, old_label, new_label)
    elif isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            lines.append(f"{where}: {len(old)} items {old_label}, {len(new)} {new_label}")
        for i in range(max(len(old), len(new))):
            sub = f"{path}[{i}]"
            if i >= len(new):
                lines.append(f"{_label(sub, old[i])}: {_show(old[i])} {old_label}, absent {new_label}")
            elif i >= len(old):
                lines.append(f"{_label(sub, new[i])}: absent {old_label}, {_show(new[i])} {new_label}")
            else:
                lines += diff(old[i], new[i], _label(sub, old[i]), old_label, new_label)
    elif not _same(old, new):
        lines.append(f"{where}: {_show(old)} {old_label}, {_show(new)} {new_label}")
    return lines


def record_differences(stored: Any, expected: Any, path: str = "", stored_label: str = "in the checkpoint",
                       expected_label: str = "now") -> List[str]:
    """Return one line per difference between a record read back from JSON (``stored``) and
    ``expected`` after the same JSON round trip (tuples become lists); empty: the same record."""
    expected = json.loads(json.dumps(expected))
    lines = diff(stored, expected, path, stored_label, expected_label)
    if not lines and stored != expected:  # equal to diff's rule (1 vs 1.0), not to Python's
        lines = [f"{path or '(whole record)'}: {_show(stored)} {stored_label}, {_show(expected)} {expected_label}"]
    return lines
