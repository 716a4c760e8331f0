"""The cache on disk: ``$DISTILL_HOME/cache/teachers/<key>/``.

- ``shard-NNNNN.safetensors``: images ``[start, stop)`` of the training set, every view:
  ``views`` int64 ``(n, K, 7)`` (the view records, :mod:`distill.cache.views`), ``values``
  fp16 ``(n, K, M, k)`` and ``ids`` int16/int32 ``(n, K, M, k)`` (each teacher's top-k
  logits and their classes), ``rest`` fp32 ``(n, K, M)`` (log-sum-exp of the other
  logits; absent when k = C, :mod:`distill.cache.topk`), ``feature.<m>`` fp16
  ``(n, K, ...)`` (teacher m's tapped feature: pooled pre-logits ``(d,)`` for the
  ``pre_logits`` tap) and ``embedding.<m>`` fp16 ``(n, K, d)`` where the tap is a map.
  Written to a temporary file and renamed, so a shard on disk is always whole; memory-mappable
  (plain safetensors).
- ``shard-NNNNN.json``: the finished shard's range, size and SHA-256 (build progress).
- ``index.json``: the key, the spec it hashes (:func:`cache_spec`), the layout and every
  shard's SHA-256; written last, once every shard is there.

The key is the SHA-256 (first 32 hex digits) of the spec: the training set's file list
(relative paths and sizes, no pixels) and labels, the augmentation settings and seed, the
number of views, every teacher's weights hash and input adapter, the tap, top-k and the
autocast dtype. Reading verifies every shard's checksum; a cache whose spec differs from
the recipe's, or with a missing or corrupt shard, is refused (:class:`DistillError`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from ..fileio import atomic_write, read_json, require_finite
from ..errors import DistillError
from ..manifest import content_hash, record_differences
from ..paths import distill_home
from ..signals import TeacherOutputs
from ..teachers import TeacherPool
from .items import leaf_item
from .topk import reconstruct_logits

FORMAT = 1
KEY_LENGTH = 32


def cache_root() -> Path:
    """Return the folder holding every teacher cache (``$DISTILL_HOME/cache/teachers``)."""
    return distill_home() / "cache" / "teachers"


def shard_name(shard: int) -> str:
    """Return the file name of shard number ``shard``."""
    return f"shard-{shard:05d}.safetensors"


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_shard(path: Path, tensors: Dict[str, Tensor]) -> None:
    """Write a shard's tensors to ``path`` (safetensors through a temporary file and a rename)."""
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


# ----------------------------------------------------------------------------- key


def dataset_fingerprint(dataset: Dataset) -> Dict[str, Any]:
    """Return ``{"items", "files" or "pixels", "labels"}`` hashes identifying a training set.

    Image files count by relative path and size (nothing is decoded); in-memory images
    (digits, torchvision's CIFAR arrays) by a hash of their bytes.
    """
    files, labels = hashlib.sha256(), hashlib.sha256()
    arrays: Dict[int, List[int]] = {}
    leaves: Dict[int, Dataset] = {}
    for i in range(len(dataset)):
        leaf, j = leaf_item(dataset, i)
        labels.update(f"{int(leaf.targets[j])},".encode())
        if hasattr(leaf, "samples"):
            path = leaf.samples[j][0]
            files.update(f"{os.path.relpath(path, leaf.root)}\t{os.path.getsize(path)}\n".encode())
        else:
            arrays.setdefault(id(leaf), []).append(j)
            leaves[id(leaf)] = leaf
    for key, indices in arrays.items():
        leaf = leaves[key]
        data = leaf.images[indices] if hasattr(leaf, "images") else np.ascontiguousarray(leaf.data[indices])
        array = data.contiguous().numpy() if isinstance(data, Tensor) else data
        files.update(f"{array.dtype} {array.shape}\0".encode())
        files.update(array.tobytes())
    return {"items": len(dataset), "files": files.hexdigest(), "labels": labels.hexdigest()}


def teacher_spec(pool: TeacherPool) -> List[Dict[str, Any]]:
    """Return, per teacher, the name, weights hash, input adapter and tap that its outputs depend on."""
    specs = []
    for teacher in pool.teachers:
        adapter = teacher.adapter
        specs.append({"name": teacher.name, "weights": content_hash(teacher.model),
                      "tap": [teacher.tapped.tap.kind, teacher.tapped.tap.index],
                      "adapter": {"scale": [round(v, 7) for v in adapter.scale.flatten().tolist()],
                                  "shift": [round(v, 7) for v in adapter.shift.flatten().tolist()],
                                  "renormalise": adapter.renormalise, "size": adapter.size}})
    return specs


def cache_spec(dataset: Dataset, augment: Dict[str, Any], seed: int, views: int, top_k: int,
               num_classes: int, pool: TeacherPool, dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """Return the JSON-able record a cache's key hashes (see the module docstring)."""
    return {"format": FORMAT, "dataset": dataset_fingerprint(dataset), "augment": augment, "seed": int(seed),
            "views": int(views), "top_k": int(top_k), "num_classes": int(num_classes),
            "teachers": teacher_spec(pool), "autocast": str(dtype)}


def cache_key(spec: Dict[str, Any]) -> str:
    """Return the key of a spec: the first 32 hex digits of the SHA-256 of its sorted JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:KEY_LENGTH]


# ----------------------------------------------------------------------------- reading


def read_index(folder: Path) -> Optional[Dict[str, Any]]:
    """Return the index of a finished cache folder, or None when it has none yet."""
    path = folder / "index.json"
    if not path.is_file():
        return None
    return read_json(path, "teacher-cache index")


def bad_shards(folder: Path, index: Dict[str, Any]) -> List[str]:
    """Return the names of the index's shards that are missing or fail their SHA-256."""
    bad = []
    for shard in index["shards"]:
        path = folder / shard["file"]
        if not path.is_file() or file_sha256(path) != shard["sha256"]:
            bad.append(shard["file"])
    return bad


class TeacherCache:
    """A finished cache in memory: view records and each row's teacher outputs, looked up by key.

    Row ``key = i * K + v`` holds image ``i``'s view ``v``; :meth:`lookup` returns the
    :class:`TeacherOutputs` of a batch of keys, logits rebuilt from the top-k soft labels.
    """

    def __init__(self, index: Dict[str, Any], tensors: Dict[str, Tensor]):
        self.index = index
        self.key = index["key"]
        self.num_classes = int(index["spec"]["num_classes"])
        self.records = tensors["views"]  # (N, K, PARAMS)
        flat = {name: t.flatten(0, 1) for name, t in tensors.items() if name != "views"}
        self.values, self.ids, self.rest = flat["values"], flat["ids"], flat.get("rest")  # (N*K, M, k), (N*K, M)
        count = len(index["teachers"])
        self.features = [flat[f"feature.{m}"] for m in range(count)]
        self.embeddings = [flat.get(f"embedding.{m}") for m in range(count)]  # None: the feature itself

    @property
    def num_views(self) -> int:
        """Return K, the views per image."""
        return self.records.shape[1]

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        """Return the memory the cached tensors take, in bytes."""
        tensors = [self.records, self.values, self.ids, *self.features,
                   *(t for t in [self.rest, *self.embeddings] if t is not None)]
        return sum(t.nbytes for t in tensors)

    def lookup(self, keys: Tensor) -> TeacherOutputs:
        """Return the :class:`TeacherOutputs` of rows ``keys (B,)`` on the keys' device (float32)."""
        device = keys.device
        rows = keys.cpu()
        rest = self.rest.index_select(0, rows) if self.rest is not None else None
        logits = reconstruct_logits(self.values.index_select(0, rows), self.ids.index_select(0, rows), rest,
                                    self.num_classes)  # (B, M, C)
        logits = logits.transpose(0, 1).contiguous().to(device, non_blocking=True)
        features = [f.index_select(0, rows).float().to(device, non_blocking=True) for f in self.features]
        embeddings = [feature if e is None else e.index_select(0, rows).float().to(device, non_blocking=True)
                      for feature, e in zip(features, self.embeddings)]
        return TeacherOutputs(logits, features, embeddings)


def open_cache(folder: Path, spec: Optional[Dict[str, Any]] = None, rebuild_hint: str = "") -> TeacherCache:
    """Return the cache in ``folder``, checked against ``spec`` (when given) and every shard's SHA-256.

    Raises :class:`DistillError` in one line naming what differs, or which shard is missing
    or corrupt (``rebuild_hint`` ends that message).
    """
    index = read_index(folder)
    if index is None:
        raise DistillError(f"run.teacher_cache: no finished teacher cache in {folder}{rebuild_hint}")
    if spec is not None:
        lines = record_differences(index["spec"], spec, "", "in the cache", "in this recipe")
        if lines:
            raise DistillError(f"run.teacher_cache: cache {index['key']} does not match this recipe: "
                               + "; ".join(lines))
    bad = bad_shards(folder, index)
    if bad:
        raise DistillError(f"run.teacher_cache: {folder}: shard(s) {', '.join(bad)} missing or failing their "
                           f"SHA-256 (corrupt){rebuild_hint}")
    parts = [load_file(str(folder / shard["file"])) for shard in index["shards"]]
    for shard, part in zip(index["shards"], parts):
        require_finite(part, folder / shard["file"])
    tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return TeacherCache(index, tensors)
