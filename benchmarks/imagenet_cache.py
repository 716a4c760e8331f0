"""An ImageNet-size teacher cache on this machine: written, opened, read by 2 processes, trained from.

No images and no teachers: the shards hold random outputs of the cache's real layout
(:mod:`distill.cache.store`), written by the real writer (``write_shard`` / ``write_index`` of
:mod:`distill.cache.build`) and read by the real reader (:func:`distill.cache.store.open_cache`).
Default: 1,281,167 images x K = 4 views x 3 teachers x top-10 of 1,000 classes, tails at
T = 4, pooled features of ``--feature-dim 16`` (fp16; a real ``pre_logits`` tap is 384-2048
wide, see ``distill-cache info`` for its projected size). Steps, each timed:

1. write: the shards (1,024 images each) and the index;
2. open: :func:`open_cache` (index, every shard's SHA-256, shard headers; nothing is loaded);
3. rss: ``--procs`` processes each open the cache and do ``--lookups`` random batch lookups
   (``--batch`` keys); their resident memory (VmRSS, anonymous and file-backed) before and after;
4. loader: lookups per second from a DataLoader (``--workers`` workers read the rows, the
   main process rebuilds the logits);
5. train (``--train-steps`` > 0): ``--procs`` gloo ranks (CPU) train a tiny student (an MLP on
   per-key synthetic inputs) with KD + CE + FitNet from the cache, DataLoader workers reading
   rows; peak RSS per rank and its workers' RSS. (The synthetic outputs are random, so there
   is nothing to learn: this measures memory and speed, not accuracy.)

Run: ``python benchmarks/imagenet_cache.py --out /work/tmp/imagenet_cache`` (``--images`` to size
down); prints one JSON line per step and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.cache.build import write_index, write_shard  # noqa: E402
from distill.cache.items import shard_ranges  # noqa: E402
from distill.cache.store import FORMAT, CachedRows, TeacherCache, cache_key, open_cache  # noqa: E402
from distill.cache.topk import class_id_dtype  # noqa: E402
from distill.data import PARAMS  # noqa: E402


def synthetic_spec(images: int, views: int, teachers: int, top_k: int, classes: int,
                   temperature: float) -> Dict[str, Any]:
    """Return a cache spec of the real shape for synthetic teachers (the key hashes it)."""
    return {"format": FORMAT, "dataset": {"items": images, "files": "synthetic", "labels": "synthetic"},
            "augment": {"augment": "synthetic"}, "view_seed": 0, "views": views, "top_k": top_k, "num_classes": classes,
            "tail_temperature": float(temperature) if top_k < classes else None, "autocast": "None",
            "teachers": [{"name": f"synthetic{m}", "weights": f"synthetic{m}", "tap": ["pre_logits", -1],
                          "adapter": {}} for m in range(teachers)]}


def synthetic_shard(count: int, views: int, teachers: int, top_k: int, classes: int, feature_dim: int,
                    gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Return one shard's tensors ``(count, K, ...)`` in the cache's layout, random values."""
    shape = (count, views, teachers)
    values = (torch.randn(*shape, top_k, generator=gen) * 2 + 8).sort(-1, descending=True).values
    ids = torch.stack([torch.randperm(classes, generator=gen)[:top_k] for _ in range(8)])  # a few id patterns
    ids = ids[torch.randint(0, 8, shape, generator=gen)].to(class_id_dtype(classes))
    labels = torch.randint(0, classes, (count, 1, 1), generator=gen).expand(shape)
    tensors = {"views": torch.randint(0, 224, (count, views, PARAMS), generator=gen),
               "values": values.half(), "ids": ids,
               "tail": values[..., -1] + 3.0, "labels": labels.to(class_id_dtype(classes)).contiguous(),
               "label_logit": values[..., 0] - torch.rand(shape, generator=gen) * 4}
    for m in range(teachers):
        tensors[f"feature.{m}"] = torch.randn(count, views, feature_dim, generator=gen).half()
    return tensors


def write_synthetic_cache(root: Path, images: int, views: int = 4, teachers: int = 3, top_k: int = 10,
                          classes: int = 1000, feature_dim: int = 16, temperature: float = 4.0,
                          shard_images: int = 1024, seed: int = 0) -> Path:
    """Write a synthetic cache under ``root`` with the real writer; return its folder ``root/<key>``."""
    spec = synthetic_spec(images, views, teachers, top_k, classes, temperature)
    key = cache_key(spec)
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for shard, (start, stop) in enumerate(shard_ranges(images, shard_images)):
        write_shard(folder, shard, (start, stop),
                    synthetic_shard(stop - start, views, teachers, top_k, classes, feature_dim, gen))
    write_index(folder, key, spec, images, shard_images)
    return folder


def memory(pid: str = "self") -> Dict[str, float]:
    """Return a process's VmRSS, RssAnon, RssFile and VmHWM in MiB (Linux /proc/<pid>/status)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[name] = int(value.split()[0]) / 1024
    return out


def random_lookups(cache: TeacherCache, lookups: int, batch: int, seed: int) -> float:
    """Do ``lookups`` lookups of ``batch`` random keys; return the seconds taken."""
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(lookups):
        cache.lookup(torch.randint(0, len(cache), (batch,), generator=gen))
    return time.perf_counter() - started


def _rss_worker(folder: str, lookups: int, batch: int, rank: int, queue: Any) -> None:
    torch.set_num_threads(1)
    before = memory()
    cache = open_cache(Path(folder))
    opened = memory()
    seconds = random_lookups(cache, lookups, batch, rank)
    queue.put({"rank": rank, "before_open": before, "after_open": opened, "after_lookups": memory(),
               "lookups_per_s": lookups / seconds})


class KeyBatches(torch.utils.data.Dataset):
    """A dataset whose item is a whole batch of keys: the worker reads the batch's cached rows."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, keys: List[int]) -> Any:
        keys_t = torch.tensor(keys)
        return keys_t, self.cache.read_rows(keys_t)


def first(item: Any) -> Any:
    """Return ``item`` (the DataLoader's collate: a dataset item is already a batch)."""
    return item


def key_loader(cache: TeacherCache, batch: int, workers: int, seed: int, rank: int = 0,
               world: int = 1) -> torch.utils.data.DataLoader:
    """Return a DataLoader of ``(keys (B,), CachedRows)`` over this rank's share of random keys."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(cache), generator=gen)[rank::world].tolist()
    batches = [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]
    return torch.utils.data.DataLoader(KeyBatches(cache), sampler=batches, batch_size=None, num_workers=workers,
                                       collate_fn=first, persistent_workers=False)


def loader_rate(cache: TeacherCache, batch: int, workers: int, batches: int) -> Dict[str, float]:
    """Return rows/s and batches/s of reading ``batches`` batches from a DataLoader and rebuilding them."""
    loader = iter(key_loader(cache, batch, workers, seed=1))
    next(loader)  # workers started
    started = time.perf_counter()
    for _ in range(batches):
        keys, rows = next(loader)
        cache.outputs(rows, torch.device("cpu"))
    seconds = time.perf_counter() - started
    return {"rows_per_s": batches * batch / seconds, "batches_per_s": batches / seconds, "workers": workers}


def _train_rank(rank: int, world: int, folder: str, steps: int, batch: int, workers: int, port: int,
                queue: Any) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from distill.losses import cross_entropy, fitnet_loss, kd_loss

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cache = open_cache(Path(folder))
    classes, teachers = cache.num_classes, len(cache.features)
    dim = cache.features[0].row_shape[-1]
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, classes))
    projector = torch.nn.Linear(128, dim)
    model = torch.nn.ModuleList([student, projector])  # same seed on every rank: same initial weights
    optim = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = iter(key_loader(cache, batch // world, workers, seed=2, rank=rank, world=world))
    started, losses = time.perf_counter(), []
    for _ in range(steps):
        keys, rows = next(loader)
        out = cache.outputs(rows, torch.device("cpu"))  # logits (M, B, C), features [(B, d)]
        x = torch.sin(keys.float().unsqueeze(-1) * torch.arange(1, 65).float() * 1e-3)  # a per-key input
        hidden = student[1](student[0](x))
        logits = student[2](hidden)
        labels = rows.soft.labels[:, 0].long()
        kd = kd_loss(logits, out.logits, 4.0).mean(0)  # (B,)
        feat = torch.stack([fitnet_loss(projector(hidden), f) for f in out.features]).mean(0)
        loss = (cross_entropy(logits, labels) + kd + feat).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():  # data parallel: the gradient averaged over the ranks
            dist.all_reduce(p.grad)
            p.grad /= world
        optim.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    children = Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()  # the loader's workers
    queue.put({"rank": rank, "steps": steps, "seconds": seconds, "first_loss": losses[0], "last_loss": losses[-1],
               "memory": memory(), "workers": [memory(pid) for pid in children], "teachers": teachers})
    dist.destroy_process_group()


def _spawn(target: Any, args_per_proc: List[tuple]) -> List[Dict[str, Any]]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, queue)) for args in args_per_proc]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a benchmark process failed with exit code {p.exitcode}")
    return sorted(results, key=lambda r: r["rank"])


def main(argv: List[str]) -> int:
    """Run the benchmark steps of the module docstring; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the synthetic cache (removed unless --keep)")
    parser.add_argument("--images", type=int, default=1_281_167)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--feature-dim", type=int, default=16)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the cache (and reuse a kept one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: Dict[str, Any] = {}
    spec = synthetic_spec(args.images, args.views, args.teachers, args.top_k, args.classes, 4.0)
    folder = args.out / cache_key(spec)
    if not (args.keep and (folder / "index.json").is_file()):
        started = time.perf_counter()
        folder = write_synthetic_cache(args.out, args.images, args.views, args.teachers, args.top_k, args.classes,
                                       args.feature_dim)
        results["write_s"] = time.perf_counter() - started
    results["disk_bytes"] = sum(p.stat().st_size for p in folder.iterdir())
    started = time.perf_counter()
    cache = open_cache(folder)
    results["open_s"] = time.perf_counter() - started
    results["tensor_bytes"] = cache.nbytes
    print(json.dumps({"step": "write+open", **results}), flush=True)
    results["rss"] = _spawn(_rss_worker, [(str(folder), args.lookups, args.batch, r) for r in range(args.procs)])
    print(json.dumps({"step": "rss", "procs": results["rss"]}), flush=True)
    results["loader"] = loader_rate(cache, args.batch, args.workers, args.loader_batches)
    print(json.dumps({"step": "loader", **results["loader"]}), flush=True)
    if args.train_steps:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        results["train"] = _spawn(_train_rank, [(r, args.procs, str(folder), args.train_steps, args.batch,
                                                 args.workers, port) for r in range(args.procs)])
        print(json.dumps({"step": "train", "ranks": results["train"]}), flush=True)
    if not args.keep:
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
