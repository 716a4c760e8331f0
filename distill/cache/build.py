"""Building a cache: the pool runs once on every view of every training image.

Work is cut into shards of ``shard_images`` consecutive images (all K views each); under
torchrun rank ``r`` builds the shards ``s`` with ``s mod world = r``. A finished shard is
renamed into place and then recorded (``shard-NNNNN.json`` with its SHA-256); a restarted
build skips the recorded shards whose file still matches and rebuilds the rest, so a killed
build resumes at shard granularity and ends byte-identical to an uninterrupted one (the
batches are fixed by the shard and view, never by where the build stopped). Rank 0 writes
``index.json`` last.

With a sketch (:mod:`distill.cache.sketch`) rank 0 first runs the pool on the first
``FIT_ROWS`` image views (the first images, every view, seeded as the shards seed them),
fits every teacher's basis and writes ``sketch.safetensors`` (recorded with its SHA-256 in
``sketch.json``, reused by a resumed build); after a barrier every rank reads that one file,
so all shards' coefficients are in one basis. Those rows run through the pool twice (once
for the basis, once in their shard): ``FIT_ROWS`` image views per cache.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import distributed
from ..data import PARAMS, SeededDataset, dataset_targets, ignore_interrupts
from ..errors import DistillError
from ..fileio import read_json, write_text
from ..runtime import autocast
from ..teachers import TeacherPool
from .items import ViewItems, seeded_keys, shard_ranges
from .sketch import FIT_ROWS, SKETCH_FILE, Sketch, fit_sketch, read_sketch, write_sketch
from .store import read_index, save_shard, shard_name
from .verify import file_sha256
from .topk import topk_soft_labels


def _record_path(folder: Path, shard: int) -> Path:
    return folder / shard_name(shard).replace(".safetensors", ".json")


def _recorded(record: Path, path: Path) -> bool:
    """Return True when ``record`` exists and ``path`` still has the SHA-256 it records."""
    if not record.is_file() or not path.is_file():
        return False
    try:
        return json.loads(record.read_text())["sha256"] == file_sha256(path)
    except (OSError, ValueError, KeyError):
        return False


def _record(record: Path, path: Path, **extra: int) -> None:
    """Write ``record``: ``path``'s name, size and SHA-256 (and ``extra``)."""
    write_text(record, json.dumps({"file": path.name, **extra, "bytes": path.stat().st_size,
                                   "sha256": file_sha256(path)}, sort_keys=True))


def shard_done(folder: Path, shard: int) -> bool:
    """Return True when shard ``shard`` is recorded and its file still has the recorded SHA-256."""
    return _recorded(_record_path(folder, shard), folder / shard_name(shard))


def write_shard(folder: Path, shard: int, image_range: Tuple[int, int], tensors: Dict[str, torch.Tensor]) -> None:
    """Save shard ``shard`` (images ``image_range``, tensors ``(n, K, ...)``) and record it (its SHA-256)."""
    path = folder / shard_name(shard)
    save_shard(path, tensors)
    start, stop = image_range
    _record(_record_path(folder, shard), path, start=start, count=stop - start)


def _view_loader(dataset: Dataset, batches: List[List[Tuple[int, int]]], num_workers: int) -> DataLoader:
    """Return a loader of ``(x, records, index)`` batches of seeded ``(index, item seed)`` keys, augmented live."""
    return DataLoader(SeededDataset(ViewItems(dataset)), batch_sampler=batches, num_workers=num_workers,
                      worker_init_fn=ignore_interrupts)  # Ctrl-C: the main process stops


def teacher_sketch(folder: Path, spec: Dict[str, Any], dataset: Dataset, pool: TeacherPool, device: torch.device,
                   dtype: Optional[torch.dtype], batch_size: int, num_workers: int) -> Optional[Sketch]:
    """Return the cache's :class:`Sketch` (None when ``spec`` has none), fitted and written by rank 0 first
    when ``folder`` holds no recorded one, then read from its file on every rank (module docstring)."""
    rank = int(spec.get("sketch", 0))
    if not rank:
        return None
    path, record = folder / SKETCH_FILE, folder / SKETCH_FILE.replace(".safetensors", ".json")
    images = min(len(dataset), -(-FIT_ROWS // spec["views"]))
    if images * spec["views"] < rank:  # refused on every rank, before rank 0 would fit alone
        raise DistillError(f"run.teacher_cache_sketch: a rank-{rank} sketch needs at least {rank} image views to "
                           f"fit its basis; the training set gives {images * spec['views']}")
    if distributed.is_main() and not _recorded(record, path):
        for stale in folder.glob("shard-*.json"):  # shards of another basis: rebuilt with this one
            stale.unlink()
        keys = [key for view in range(spec["views"]) for key in seeded_keys(range(images), spec["view_seed"], view)]
        logits = []
        pool.to(device)
        for x, _, _ in _view_loader(dataset, [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)],
                                    num_workers):
            with autocast(device, dtype):
                logits.append(pool(x.to(device, non_blocking=True)).logits.float().transpose(0, 1).cpu())
        write_sketch(path, fit_sketch(torch.cat(logits), rank))  # rows (n, M, C): per teacher
        _record(record, path)
    distributed.barrier()
    return read_sketch(path)


def write_index(folder: Path, key: str, spec: Dict[str, Any], num_images: int, shard_images: int) -> Dict[str, Any]:
    """Write and return ``index.json`` of a cache whose every shard is recorded (the build's last step)."""
    shards = []
    for s in range(len(shard_ranges(num_images, shard_images))):
        record = _record_path(folder, s)
        if not record.is_file():
            raise DistillError(f"teacher cache {folder}: shard {shard_name(s)} was not built")
        shards.append(read_json(record, "teacher-cache shard record"))
    index = {"key": key, "spec": spec, "num_images": num_images, "views": spec["views"], "top_k": spec["top_k"],
             "params": PARAMS, "shard_images": shard_images, "teachers": [t["name"] for t in spec["teachers"]],
             "shards": shards}
    if spec.get("sketch"):
        index["sketch"] = read_json(folder / SKETCH_FILE.replace(".safetensors", ".json"), "teacher-cache sketch record")
    write_text(folder / "index.json", json.dumps(index, indent=1, sort_keys=True))
    return index


class _ShardBuffer:
    """One shard's outputs ``(n, K, ...)``, filled batch by batch."""

    def __init__(self, count: int, views: int):
        self.count, self.views = count, views
        self.tensors: Dict[str, torch.Tensor] = {}

    def put(self, name: str, rows: torch.Tensor, view: int, value: torch.Tensor) -> None:
        if name not in self.tensors:
            self.tensors[name] = torch.zeros(self.count, self.views, *value.shape[1:], dtype=value.dtype)
        self.tensors[name][rows, view] = value


def build_shards(folder: Path, spec: Dict[str, Any], dataset: Dataset, pool: TeacherPool, device: torch.device,
                 dtype: Optional[torch.dtype], batch_size: int, num_workers: int, shard_images: int,
                 progress: bool = True) -> Dict[str, Any]:
    """Build the missing or corrupt shards of ``folder`` and return its index (see the module docstring).

    ``spec`` (:func:`distill.cache.store.cache_spec`) gives the view seed, views, top-k, the
    temperature of the stored tails and the rank of their sketch.
    """
    key, views, top_k, seed = spec["key"], spec["views"], spec["top_k"], spec["view_seed"]
    temperature = spec["tail_temperature"]
    targets = torch.tensor(dataset_targets(dataset), dtype=torch.long)
    spec = {k: v for k, v in spec.items() if k != "key"}
    folder.mkdir(parents=True, exist_ok=True)
    started_spec = folder / "spec.json"
    if started_spec.is_file():  # a build began here: keep its shard layout
        shard_images = int(read_json(started_spec, "teacher-cache build spec")["shard_images"])
    elif distributed.is_main():
        write_text(started_spec, json.dumps({"key": key, "spec": spec, "shard_images": shard_images},
                                              indent=1, sort_keys=True))
    distributed.barrier()
    sketch = teacher_sketch(folder, spec, dataset, pool, device, dtype, batch_size, num_workers)
    if sketch is not None:
        sketch = sketch.to(device)
    ranges = shard_ranges(len(dataset), shard_images)
    mine = [s for s in range(len(ranges)) if s % distributed.world_size() == distributed.rank()]
    todo = [s for s in mine if not shard_done(folder, s)]
    plan: List[Tuple[int, int, List[Tuple[int, int]]]] = []  # (shard, view, keys of one batch)
    for s in todo:
        start, stop = ranges[s]
        for view in range(views):
            keys = seeded_keys(range(start, stop), seed, view)
            plan += [(s, view, keys[i:i + batch_size]) for i in range(0, len(keys), batch_size)]
    total = sum(len(keys) for _, _, keys in plan)
    loader = _view_loader(dataset, [keys for _, _, keys in plan], num_workers)
    bar = tqdm(total=total, unit="img", desc=f"teacher cache {key[:12]}", file=sys.stderr,
               disable=not (progress and sys.stderr.isatty()), smoothing=0.1)
    started, buffer, current = time.perf_counter(), None, -1
    pool.to(device)
    for (shard, view, keys), (x, records, index) in zip(plan, loader):
        if shard != current:
            buffer, current = _ShardBuffer(ranges[shard][1] - ranges[shard][0], views), shard
        rows = index - ranges[shard][0]
        with autocast(device, dtype):
            out = pool(x.to(device, non_blocking=True))
        labels = targets[index].to(device).unsqueeze(-1)  # (B, 1): broadcast over the teachers
        soft = topk_soft_labels(out.logits.transpose(0, 1), min(top_k, out.logits.shape[-1]), temperature, labels,
                                sketch)
        buffer.put("views", rows, view, records)
        for name in ("values", "ids", "tail", "labels", "label_logit", "coefficients"):
            if getattr(soft, name) is not None:
                buffer.put(name, rows, view, getattr(soft, name).cpu())
        for m, (feature, embedding) in enumerate(zip(out.features, out.embeddings)):
            buffer.put(f"feature.{m}", rows, view, feature.half().cpu())
            if embedding is not feature:
                buffer.put(f"embedding.{m}", rows, view, embedding.half().cpu())
        bar.update(len(keys))
        if view == views - 1 and int(rows[-1]) == buffer.count - 1:  # the shard's last batch
            write_shard(folder, shard, ranges[shard], buffer.tensors)
            buffer = None
    bar.close()
    elapsed = time.perf_counter() - started
    if total and distributed.is_main():
        print(f"teacher cache {key}: ran {len(pool)} teachers on {total} image views in {elapsed:.1f} s "
              f"({total / max(elapsed, 1e-9):.0f} images/s)", flush=True)
    distributed.barrier()
    if distributed.is_main():
        write_index(folder, key, spec, len(dataset), shard_images)
    distributed.barrier()
    index = read_index(folder)
    assert index is not None  # rank 0 wrote it before the barrier
    return index
