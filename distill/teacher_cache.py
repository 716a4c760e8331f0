"""Teacher-output cache: run the frozen teachers once per fixed view, reuse their outputs.

With ``data.fixed_views: K`` every training input is one of ``N * K`` fixed tensors
(:mod:`distill.views`), so the pool's outputs for it never change. ``run.teacher_cache``
computes them once (logits ``(M, N*K, C)``, each teacher's tapped feature and embedding),
and every training step gathers its batch's rows by key instead of running the teachers.

The outputs are saved to ``$DISTILL_HOME/cache/teachers/<key>.safetensors``, where the key
is a SHA-256 over the exact input views, each teacher's weights and input adapter, the
feature tap and the autocast dtype, so runs that differ only in policy, student or
schedule share one file, and any change to what the teachers would see makes a new one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor

from . import distributed
from .engine import autocast
from .checkpoint import load_tensors
from .errors import DistillError
from .fileio import atomic_write, ensure_dir
from .manifest import content_hash
from .paths import distill_home
from .signals import TeacherOutputs
from .teachers import TeacherPool
from .views import FixedViews


def cache_dir() -> Path:
    """Return the folder of saved teacher-output caches (``$DISTILL_HOME/cache/teachers``)."""
    return distill_home() / "cache" / "teachers"


def cache_key(pool: TeacherPool, views: FixedViews, dtype: Optional[torch.dtype]) -> str:
    """Return the hex SHA-256 identifying the pool's outputs on ``views`` under autocast ``dtype``."""
    digest = hashlib.sha256()
    flat = views.flat_views().contiguous()
    digest.update(f"views {tuple(flat.shape)} {flat.dtype}\0".encode())
    digest.update(flat.reshape(-1).view(torch.uint8).numpy())
    for teacher in pool.teachers:
        adapter = teacher.adapter
        spec = {"weights": content_hash(teacher.model), "tap": [teacher.tapped.tap.kind, teacher.tapped.tap.index],
                "scale": adapter.scale.flatten().tolist(), "shift": adapter.shift.flatten().tolist(),
                "renormalise": adapter.renormalise, "size": adapter.size}
        digest.update(json.dumps(spec, sort_keys=True).encode())
    digest.update(str(dtype).encode())
    return digest.hexdigest()


class TeacherOutputCache:
    """The pool's outputs for every fixed view, gathered per batch by key (:meth:`lookup`)."""

    def __init__(self, logits: Tensor, features: List[Tensor], embeddings: List[Optional[Tensor]]):
        self.logits = logits  # (M, V, C)
        self.features = features  # per teacher (V, ...)
        self.embeddings = embeddings  # per teacher (V, d), None where it is the feature itself

    def __len__(self) -> int:
        return self.logits.shape[1]

    @property
    def nbytes(self) -> int:
        """Return the memory the cached tensors take, in bytes."""
        tensors = [self.logits, *self.features, *(e for e in self.embeddings if e is not None)]
        return sum(t.nbytes for t in tensors)

    def lookup(self, keys: Tensor) -> TeacherOutputs:
        """Return the :class:`TeacherOutputs` of the views ``keys`` ``(B,)``, on the keys' device."""
        device = keys.device
        index = keys.to(self.logits.device)
        logits = self.logits.index_select(1, index).to(device, non_blocking=True)
        features = [f.index_select(0, index).to(device, non_blocking=True) for f in self.features]
        embeddings = [feature if e is None else e.index_select(0, index).to(device, non_blocking=True)
                      for feature, e in zip(features, self.embeddings)]
        return TeacherOutputs(logits, features, embeddings)

    @classmethod
    def compute(cls, pool: TeacherPool, views: FixedViews, device: torch.device, dtype: Optional[torch.dtype],
                batch_size: int = 256) -> "TeacherOutputCache":
        """Return the cache of ``pool`` on every view, computed in batches (outputs kept on CPU, fp32)."""
        flat = views.flat_views()
        logits: List[Tensor] = []
        features: List[List[Tensor]] = [[] for _ in range(len(pool))]
        embeddings: List[List[Tensor]] = [[] for _ in range(len(pool))]  # stays empty where it is the feature
        for start in range(0, flat.shape[0], batch_size):
            x = flat[start:start + batch_size].to(device)
            with autocast(device, dtype):
                out = pool(x)
            logits.append(out.logits.float().cpu())
            for m in range(len(pool)):
                features[m].append(out.features[m].float().cpu())
                if out.embeddings[m] is not out.features[m]:
                    embeddings[m].append(out.embeddings[m].float().cpu())
        return cls(torch.cat(logits, 1), [torch.cat(f) for f in features],
                   [torch.cat(e) if e else None for e in embeddings])

    def save(self, path: Path) -> None:
        """Write the cache to ``path`` (safetensors; written beside it, then renamed into place)."""
        tensors: Dict[str, Tensor] = {"logits": self.logits.contiguous()}
        for m, (feature, embedding) in enumerate(zip(self.features, self.embeddings)):
            tensors[f"feature.{m}"] = feature.contiguous()
            if embedding is not None:
                tensors[f"embedding.{m}"] = embedding.contiguous()
        ensure_dir(path.parent, "teacher cache folder")
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"teachers": str(len(self.features))}))

    @classmethod
    def load(cls, path: Path) -> "TeacherOutputCache":
        """Return the cache saved at ``path``."""
        tensors = load_tensors(path)
        count = sum(1 for k in tensors if k.startswith("feature."))
        if "logits" not in tensors:
            raise DistillError(f"{path}: not a teacher cache (no logits); delete it to rebuild the cache")
        return cls(tensors["logits"], [tensors[f"feature.{m}"] for m in range(count)],
                   [tensors.get(f"embedding.{m}") for m in range(count)])


def teacher_output_cache(pool: TeacherPool, views: FixedViews, device: torch.device,
                         dtype: Optional[torch.dtype], batch_size: int = 256) -> TeacherOutputCache:
    """Return the pool's cache on ``views``: loaded from :func:`cache_dir` when saved, else computed
    (by rank 0 under torchrun) and saved. Prints which of the two happened."""
    path = cache_dir() / f"{cache_key(pool, views, dtype)[:32]}.safetensors"
    cache: Optional[TeacherOutputCache] = None
    if path.is_file():
        cache = TeacherOutputCache.load(path)
        how = "loaded"
    elif distributed.is_main():
        cache = TeacherOutputCache.compute(pool, views, device, dtype, batch_size)
        cache.save(path)
        how = f"ran {len(pool)} teachers once on {len(views)} images x {views.num_views} views, saved"
    distributed.barrier()  # under torchrun the other ranks load what rank 0 wrote
    if cache is None:
        if not path.is_file():
            raise DistillError(f"teacher cache {path} was not written by rank 0")
        cache, how = TeacherOutputCache.load(path), "loaded"
    if distributed.is_main():
        print(f"teacher cache: {how} {path} ({len(cache)} views, {cache.nbytes / 2**20:.0f} MiB)", flush=True)
    return cache
