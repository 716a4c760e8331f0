"""The memory-mapped cache store: lookups equal the shards' tensors, in DataLoader workers too, RSS bounded."""

import pickle
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.cache.store import open_cache
from distill.cache.topk import SoftLabels, reconstruct_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from imagenet_cache import key_loader, write_synthetic_cache  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _whole(folder):
    """Return every tensor of the cache read whole (safetensors' load_file), shards concatenated, (N, K, ...)."""
    parts = [load_file(str(p)) for p in sorted(folder.glob("shard-*.safetensors"))]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def test_lookups_read_the_right_rows_from_every_shard(tmp_path):
    folder = write_synthetic_cache(tmp_path, images=600, views=3, teachers=2, top_k=5, classes=50, feature_dim=8,
                                   shard_images=128)  # 5 shards, the last one partial
    whole = _whole(folder)
    cache = open_cache(folder)
    assert len(cache) == 600 * 3 and cache.num_views == 3 and cache.records.shape == (600, 3, 7)
    keys = torch.tensor([0, 1799, 383, 384, 385, 1000, 5, 1798, 384])  # shard edges, repeats, any order
    images, views = keys // 3, keys % 3
    out = cache.lookup(keys)
    soft = SoftLabels(*(whole[n][images, views] for n in ("values", "ids", "tail", "labels", "label_logit")))
    assert torch.equal(out.logits, reconstruct_logits(soft, 50, 4.0).transpose(0, 1))  # (M, B, C)
    for m in range(2):
        assert torch.equal(out.features[m], whole[f"feature.{m}"][images, views].float())
        assert out.embeddings[m] is out.features[m]  # pooled features are their own embeddings
    assert torch.equal(cache.records[384, 2], whole["views"][384, 2]) and torch.equal(cache.records[599],
                                                                                       whole["views"][599])
    again = pickle.loads(pickle.dumps(cache))  # what a spawned DataLoader worker receives: maps reopen
    assert torch.equal(again.lookup(keys).logits, out.logits)
    rows = [rows for _, rows in key_loader(cache, batch=64, workers=2, seed=0)]  # read in 2 worker processes
    assert len(rows) == 1800 // 64
    keys0, rows0 = next(iter(key_loader(cache, batch=64, workers=0, seed=0)))
    assert torch.equal(cache.outputs(rows[0], torch.device("cpu")).logits, cache.lookup(keys0).logits)


RSS_SCRIPT = """
import sys, torch
sys.path.insert(0, {bench!r})
from pathlib import Path
from imagenet_cache import memory, random_lookups
from distill.cache.store import open_cache
torch.set_num_threads(1)
cache = open_cache(Path({folder!r}))
random_lookups(cache, 20, 64, 1)  # warm-up: the libraries' code pages the lookup path runs
before = memory()
random_lookups(cache, 2000, 64, 0)
after = memory()
print(after["RssFile"] - before["RssFile"], after["RssAnon"] - before["RssAnon"], cache.nbytes)
print(before, after, file=sys.stderr)
"""


def test_resident_memory_stays_bounded_over_thousands_of_lookups(tmp_path):
    folder = write_synthetic_cache(tmp_path, images=8192, views=2, teachers=2, top_k=10, classes=100,
                                   feature_dim=512, shard_images=1024)  # 34 MB of tensors
    script = RSS_SCRIPT.format(bench=str(REPO / "benchmarks"), folder=str(folder))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    file_growth, anon_growth, size = (float(v) for v in result.stdout.split())
    assert size > 30e6
    # measured after a 20-lookup warm-up: +0.0 MiB file-backed, +0.03 MiB anonymous over 2,000 lookups of 64 keys;
    # reading the cache whole (the previous store) added 36 MiB resident (72 MiB peak) in every process
    assert file_growth < 4 and anon_growth < 8, (file_growth, anon_growth, result.stderr[-500:])
