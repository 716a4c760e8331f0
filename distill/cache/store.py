"""The cache on disk: ``$DISTILL_HOME/cache/teachers/<key>/``.

- ``shard-NNNNN.safetensors``: images ``[start, stop)`` of the training set, every view:
  ``views`` int64 ``(n, K, 7)`` (the view records, :mod:`distill.data.transforms`), ``values``
  fp16 ``(n, K, M, k)`` and ``ids`` int16/int32 ``(n, K, M, k)`` (each teacher's top-k
  logits and their classes); when k < C also ``tail`` fp32 ``(n, K, M)`` (the other
  logits' log-sum-exp at the spec's ``tail_temperature``), ``labels`` int16/int32
  ``(n, K, M)`` and ``label_logit`` fp32 ``(n, K, M)`` (:mod:`distill.cache.topk`), and with a
  sketch of rank r ``coefficients`` fp16 ``(n, K, M, r)``; ``feature.<m>`` fp16
  ``(n, K, ...)`` (teacher m's tapped feature: pooled pre-logits ``(d,)`` for the
  ``pre_logits`` tap) and ``embedding.<m>`` fp16 ``(n, K, d)`` where the tap is a map.
  Written to a temporary file and renamed, so a shard on disk is always whole; read
  memory-mapped, row by row (:mod:`distill.cache.shards`).
- ``shard-NNNNN.json``: the finished shard's range, size and SHA-256 (build progress).
- with a sketch (k < C, ``run.teacher_cache_sketch`` > 0): ``sketch.safetensors``, every
  teacher's logit mean and rank-r basis (:mod:`distill.cache.sketch`), fitted and written
  before any shard, and ``sketch.json``, its size and SHA-256.
- ``index.json``: the key, the spec it hashes (:func:`cache_spec`), the layout and every
  shard's (and the sketch's) SHA-256; written last, once every shard is there.

The key is the SHA-256 (first 32 hex digits) of the spec: the training set's file list
(relative paths and sizes, no pixels) and labels, the augmentation settings and the views'
seed (``view_seed``: ``run.teacher_cache_view_seed``, default the training seed), the
number of views, every teacher's weights hash and input adapter, the tap, top-k, the
temperature of the stored tails (None when k = C: the full logits do not depend on it), the
sketch's rank (``sketch``: only in a spec with k < C and a sketch, so every other key is
unchanged) and the autocast dtype. Opening checks every file's size, and the SHA-256 of each
file changed since its last passing check (``verified.json``, :mod:`distill.cache.verify`);
a cache whose spec differs from the recipe's, or with a missing or corrupt shard, is refused
(:class:`DistillError`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from ..fileio import atomic_write, read_json
from ..errors import DistillError
from ..manifest import content_hash, record_differences, record_hash
from ..paths import distill_home
from ..signals import TeacherOutputs
from ..teachers import TeacherPool
from .items import leaf_item
from .shards import ShardedArray, Shards
from .sketch import SKETCH_FILE, Sketch, read_sketch
from .topk import SoftLabels, reconstruct_logits
from .verify import bad_files

FORMAT = 2  # 2: tails exact at the KD temperature, label logits (1: tail log-sum-exp at T = 1)
KEY_LENGTH = 32


def cache_root() -> Path:
    """Return the folder holding every teacher cache (``$DISTILL_HOME/cache/teachers``)."""
    return distill_home() / "cache" / "teachers"


def shard_name(shard: int) -> str:
    """Return the file name of shard number ``shard``."""
    return f"shard-{shard:05d}.safetensors"


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
    """Return, per teacher, the name, weights hash, input adapter, tap and class map that its outputs depend on."""
    specs = []
    for teacher in pool.teachers:
        adapter = teacher.adapter
        specs.append({"name": teacher.name, "weights": content_hash(teacher.model),
                      "tap": [teacher.tapped.tap.kind, teacher.tapped.tap.index],
                      "adapter": {"scale": [round(v, 7) for v in adapter.scale.flatten().tolist()],
                                  "shift": [round(v, 7) for v in adapter.shift.flatten().tolist()],
                                  "renormalise": adapter.renormalise, "size": adapter.size}})
        if teacher.class_map is not None:  # mapped outputs are other outputs (unmapped keys are unchanged)
            specs[-1]["classes"] = list(teacher.class_map)
    return specs


def cache_spec(dataset: Dataset, augment: Dict[str, Any], view_seed: int, views: int, top_k: int,
               num_classes: int, pool: TeacherPool, dtype: Optional[torch.dtype],
               temperature: float = 1.0, sketch: int = 0) -> Dict[str, Any]:
    """Return the JSON-able record a cache's key hashes (see the module docstring).

    ``temperature`` is the KD temperature the top-k tails are stored for and ``sketch`` the
    rank of their shape's sketch (0: none); both are ignored when ``top_k >= num_classes``.
    """
    tail = float(temperature) if top_k < num_classes else None
    spec = {"format": FORMAT, "dataset": dataset_fingerprint(dataset), "augment": augment,
            "view_seed": int(view_seed), "views": int(views), "top_k": int(top_k), "num_classes": int(num_classes),
            "tail_temperature": tail, "teachers": teacher_spec(pool), "autocast": str(dtype)}
    if top_k < num_classes and sketch > 0:
        spec["sketch"] = int(sketch)
    return spec


def cache_key(spec: Dict[str, Any]) -> str:
    """Return the key of a spec: the first 32 hex digits of the SHA-256 of its sorted JSON."""
    return record_hash(spec)[:KEY_LENGTH]


# ----------------------------------------------------------------------------- reading


def read_index(folder: Path) -> Optional[Dict[str, Any]]:
    """Return the index of a finished cache folder, or None when it has none yet."""
    path = folder / "index.json"
    if not path.is_file():
        return None
    return read_json(path, "teacher-cache index")


@dataclass
class CachedRows:
    """The stored rows of a batch of keys, as read from the shards (small; cheap to pass between processes).

    ``soft``: each teacher's :class:`SoftLabels` ``(B, M, ...)``; ``features[m]`` fp16
    ``(B, ...)``; ``embeddings[m]`` fp16 ``(B, d)``, or None where the feature is its own embedding.
    """

    soft: SoftLabels
    features: List[Tensor]
    embeddings: List[Optional[Tensor]]


class TeacherCache:
    """A finished cache, memory-mapped: view records and each row's teacher outputs, read by key.

    Row ``key = i * K + v`` holds image ``i``'s view ``v``. Nothing is loaded at open: every
    lookup reads just its rows from the mapped shards (:mod:`distill.cache.shards`), so a
    process's resident memory does not grow with the cache. :meth:`read_rows` is the raw
    read (run it in a DataLoader worker), :meth:`outputs` rebuilds the logits on a device,
    :meth:`lookup` is both.
    """

    def __init__(self, folder: Path, index: Dict[str, Any]):
        self.index = index
        self.key = index["key"]
        self.num_classes = int(index["spec"]["num_classes"])
        self.temperature = index["spec"]["tail_temperature"]
        rank = int(index["spec"].get("sketch", 0))
        self.sketch: Optional[Sketch] = read_sketch(folder / SKETCH_FILE) if rank else None
        self._device_sketches: Dict[str, Sketch] = {}  # the sketch moved once per device (see outputs)
        self.shards = Shards([folder / shard["file"] for shard in index["shards"]],
                             [int(shard["count"]) for shard in index["shards"]], int(index["views"]))
        names = set(self.shards.files[0].header)
        self.records = ShardedArray(self.shards, "views")  # (N, K, PARAMS), read per image
        self.values, self.ids = ShardedArray(self.shards, "values"), ShardedArray(self.shards, "ids")  # (M, k) a row
        self.tails = {name: ShardedArray(self.shards, name)
                      for name in ("tail", "labels", "label_logit", "coefficients")
                      if name in names}  # (M,) a row; coefficients (M, r)
        if (self.sketch is None) != ("coefficients" not in names):
            raise DistillError(f"{folder}: teacher-cache shards and sketch rank {rank} disagree (coefficients "
                               f"{'missing' if 'coefficients' not in names else 'without a sketch'})")
        count = len(index["teachers"])
        self.features = [ShardedArray(self.shards, f"feature.{m}") for m in range(count)]
        self.embeddings = [ShardedArray(self.shards, f"embedding.{m}") if f"embedding.{m}" in names else None
                           for m in range(count)]  # None: the feature itself

    @property
    def num_views(self) -> int:
        """Return K, the views per image."""
        return self.records.shape[1]

    def __len__(self) -> int:
        return self.records.shape[0] * self.num_views

    @property
    def nbytes(self) -> int:
        """Return the size of the cached tensors in bytes (on disk; read row by row, never all resident)."""
        arrays = [self.records, self.values, self.ids, *self.tails.values(), *self.features,
                  *(a for a in self.embeddings if a is not None)]
        basis = 0 if self.sketch is None else (self.sketch.mean.numel() + self.sketch.basis.numel()) * 4
        return sum(a.nbytes for a in arrays) + basis

    def read_rows(self, keys: Tensor) -> CachedRows:
        """Return the stored rows of ``keys (B,)`` (CPU tensors, as stored: fp16 logits and features)."""
        images, views = np.divmod(keys.cpu().numpy().astype(np.int64), self.num_views)
        groups = self.shards.group(images)
        count = len(images)
        soft = SoftLabels(self.values.read(groups, views, count), self.ids.read(groups, views, count),
                          **{name: a.read(groups, views, count) for name, a in self.tails.items()})
        rows = CachedRows(soft, [f.read(groups, views, count) for f in self.features],
                          [None if e is None else e.read(groups, views, count) for e in self.embeddings])
        return rows

    def outputs(self, rows: CachedRows, device: torch.device) -> TeacherOutputs:
        """Return the :class:`TeacherOutputs` of read rows on ``device``: logits ``(M, B, C)`` float32, features float32."""
        soft = SoftLabels(**{name: None if t is None else t.to(device, non_blocking=True)
                             for name, t in vars(rows.soft).items()})
        sketch = None if self.sketch is None else self.sketch_on(device)
        logits = reconstruct_logits(soft, self.num_classes, self.temperature, sketch).transpose(0, 1).contiguous()
        features = [f.to(device, non_blocking=True).float() for f in rows.features]
        embeddings = [feature if e is None else e.to(device, non_blocking=True).float()
                      for feature, e in zip(features, rows.embeddings)]
        return TeacherOutputs(logits, features, embeddings)

    def sketch_on(self, device: torch.device) -> Sketch:
        """Return the sketch (mean ``(M, C)``, basis ``(M, C, r)``) on ``device``, moved there once."""
        name = str(device)
        if name not in self._device_sketches:
            self._device_sketches[name] = self.sketch.to(device)
        return self._device_sketches[name]

    def __getstate__(self) -> Dict[str, Any]:
        # DataLoader workers only read rows: they get the host sketch, never a device copy
        return {**self.__dict__, "_device_sketches": {}}

    def lookup(self, keys: Tensor) -> TeacherOutputs:
        """Return the :class:`TeacherOutputs` of rows ``keys (B,)`` on the keys' device (float32)."""
        return self.outputs(self.read_rows(keys), keys.device)


def open_cache(folder: Path, spec: Optional[Dict[str, Any]] = None, rebuild_hint: str = "") -> TeacherCache:
    """Return the cache in ``folder``, checked against ``spec`` (when given) and its files'
    SHA-256s (re-hashing only files changed since their last passing check, :mod:`.verify`).

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
    bad = bad_files(folder, index)
    if bad:
        raise DistillError(f"run.teacher_cache: {folder}: shard(s) {', '.join(bad)} missing or failing their "
                           f"SHA-256 (corrupt){rebuild_hint}")
    return TeacherCache(folder, index)
