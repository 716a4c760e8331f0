"""The teacher-output cache (distill.cache): replayed views, top-k soft labels, shards, keys, training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from distill.cache.items import CachedViews, ViewSampler, load_view
from distill.cache.store import cache_root, open_cache
from distill.cache.topk import reconstruct_logits, topk_soft_labels
from distill.cli import cache_main
from distill.data import EpochSampler, build_data, build_loader
from distill.errors import DistillError, RecipeError
from distill.losses import cross_entropy, kd_loss
from distill.pipeline import RecipeRunner
from distill.plot import read_summary
from distill.recipe_load import recipe_from_dict

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
HOOKED_PATH = os.pathsep.join([str(REPO), str(REPO / "tests" / "hooks")])  # + tests-only hooks


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """A tiny ImageFolder: 3 classes x 8 train images of varied sizes (random pixels), 2 test each."""
    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("test", 2)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = 28 + 3 * i, 40 - 2 * i
                pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _data_cfg(root, augment, **extra):
    raw = {"name": "t", "student": "cifar_resnet8", "teachers": [{"model": "cifar_resnet8", "pretrained": False}],
           "data": {"dataset": "imagefolder", "root": str(root), "augment": augment, "input_size": 24,
                    "num_workers": 0, **extra}}
    return recipe_from_dict(raw).data


@pytest.mark.parametrize("augment, extra", [
    ("cifar", {}),
    ("timm", {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.5, "interpolation": "random"}),
])
def test_replaying_view_v_gives_what_the_live_loader_shows_in_epoch_v(image_tree, augment, extra):
    bundle = build_data(_data_cfg(image_tree, augment, **extra))
    seed, views = 5, 3
    live = build_loader(bundle.train, 6, True, 0, seed)
    # the records of views 0..2, drawn as the cache build draws them (item seeded as in epoch v)
    from distill.cache.items import ViewItems, seeded_keys
    from distill.data import SeededDataset

    items = SeededDataset(ViewItems(bundle.train))
    records = torch.zeros(len(bundle.train), views, 7, dtype=torch.int64)
    for v in range(views):
        for key in seeded_keys(range(len(bundle.train)), seed, v):
            records[key[0], v] = items[key][1]
    cached = build_loader(CachedViews(bundle.train, records), 6, True, 0, seed,
                          sampler=ViewSampler(EpochSampler(len(bundle.train), True, seed), views))
    for epoch in range(views):
        live.sampler.set_epoch(epoch)
        cached.sampler.set_epoch(epoch)
        xs, ys = map(torch.cat, zip(*list(live)))
        cx, cy, keys = map(torch.cat, zip(*list(cached)))
        assert torch.equal(xs, cx) and torch.equal(ys, cy)
        assert set((keys % views).tolist()) == {epoch}
    assert not torch.equal(records[:, 0], records[:, 1])  # the views differ
    if augment == "timm":  # the later random ops are seeded by the record: another seed, another tensor
        other = records[0, 0].clone()
        other[6] += 1
        assert not torch.equal(load_view(bundle.train, 0, other)[0], load_view(bundle.train, 0, records[0, 0])[0])


def test_top_k_reconstruction_keeps_top_k_and_spreads_the_rest():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 12, generator=gen) * 3
    top1 = logits.argmax(-1)  # labels inside the top-k: the tail is spread uniformly (tests/test_cache_tails.py)
    soft = topk_soft_labels(logits, 12, 1.0, top1)  # k = C: the full logits (fp16)
    assert soft.tail is None
    full = reconstruct_logits(soft, 12, 1.0)
    assert torch.equal(full, logits.half().float())
    student = torch.randn(5, 12, generator=gen)
    assert torch.equal(kd_loss(student, full, 4.0), kd_loss(student, logits.half().float(), 4.0))

    soft = topk_soft_labels(logits, 4, 1.0, top1)
    ids = soft.ids
    approx = reconstruct_logits(soft, 12, 1.0)
    p, q = logits.softmax(-1), approx.softmax(-1)
    top = p.gather(-1, ids.long())
    torch.testing.assert_close(q.gather(-1, ids.long()), top, atol=2e-3, rtol=5e-3)  # fp16 logits
    others = q.scatter(-1, ids.long(), 0.0)
    torch.testing.assert_close(others.sum(-1), 1 - top.sum(-1), atol=2e-3, rtol=5e-3)  # the rest mass ...
    spread = others.scatter(-1, ids.long(), float("nan"))
    assert torch.allclose(spread.nanmean(-1, keepdim=True).expand_as(spread)[~spread.isnan()],
                          spread[~spread.isnan()])  # ... spread uniformly over the other 8 classes
    assert not torch.allclose(q, p, atol=1e-3)
    ce = cross_entropy(approx, torch.zeros(5, dtype=torch.long))  # teacher CE reads the same logits
    assert ce.shape == (3, 5)


def _digits(run_dir, epochs=2, **run):
    raw = {"name": "cached", "output_dir": str(run_dir), "seed": 1,
           "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0, "train_subset": 160,
                    "augment": "cifar", **({"fixed_views": 2} if run else {})},
           "student": "cifar_resnet8",
           "teachers": [{"model": "cifar_resnet8", "pretrained": False},
                        {"model": "cifar_resnet14", "pretrained": False}],
           "distill": {"policy": "camkd", "features": "pre_logits"},
           "schedule": {"name": "cosine", "epochs": epochs},
           "run": {"progress": False, "device": "cpu", **run}}
    return recipe_from_dict(raw)


def test_a_cached_run_equals_a_live_run_on_the_same_views(tmp_path, monkeypatch):
    plain = RecipeRunner(_digits(tmp_path / "plain")).run()
    calls = []
    from distill.teachers import TeacherPool

    original = TeacherPool.forward
    monkeypatch.setattr(TeacherPool, "forward", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    cached = RecipeRunner(_digits(tmp_path / "cached", teacher_cache="auto")).run()
    # the pool ran on the 2-image projector-sizing batch and once on each of the 160 x 2 views only
    assert sum(calls) == 2 + 160 * 2
    a, b = read_summary(tmp_path / "plain"), read_summary(tmp_path / "cached")
    for column in ("train_loss", "train_kd", "train_feat", "val_top1", "w_logit_mean/0:cifar_resnet8"):
        assert [r[column] for r in a] == pytest.approx([r[column] for r in b], rel=1e-4, abs=1e-5)  # fp16 storage
    assert cached.student["final_top1"] == pytest.approx(plain.student["final_top1"], abs=1e-9)
    calls.clear()
    again = RecipeRunner(_digits(tmp_path / "again", teacher_cache="auto")).run()  # loaded, not rebuilt
    assert sum(calls) == 2 and again.student["final_top1"] == cached.student["final_top1"]


def cache_recipe_file(tmp_path, features: str = "last_map", **run):
    """Write and return a small digits recipe with two untrained teachers (tap ``features``, extra ``run`` fields)."""
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({
        "name": "c", "output_dir": str(tmp_path / "run"), "seed": 3,
        "data": {"dataset": "digits", "num_workers": 0, "train_subset": 96, "augment": "cifar", "batch_size": 16},
        "student": "cifar_resnet8",
        "teachers": [{"model": "cifar_resnet8", "pretrained": False}, {"model": "cifar_resnet14", "pretrained": False}],
        "distill": {"features": features}, "run": {"device": "cpu", "progress": False, **run}}))
    return path


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}



def test_cached_outputs_arrive_with_the_batch_from_a_loader_worker(tmp_path):
    """With run.teacher_cache the loader's worker looks the batch up: batches are (x, y, TeacherOutputs)
    and the outputs are the pool's on exactly those replayed views (fp16 storage)."""
    from distill.cache.recipes import training_cache
    from distill.cache.source import cached_train_loader
    from distill.recipe_load import load_recipe, teacher_configs
    from distill.signals import TeacherOutputs
    from distill.teachers import TeacherPool

    recipe = load_recipe(str(cache_recipe_file(tmp_path)), ["run.teacher_cache=auto", "data.fixed_views=2",
                                                       "data.num_workers=1"])
    runner = RecipeRunner(recipe)
    pool = TeacherPool([runner.prepare_teacher(i, cfg) for i, cfg in enumerate(teacher_configs(recipe))])
    cache = training_cache(recipe, runner.bundle, pool, torch.device("cpu"), None)
    loader = cached_train_loader(recipe, runner.bundle.train, cache)
    assert loader.num_workers == 1
    loader.sampler.set_epoch(1)  # the second stored view of every image
    x, y, teachers = next(iter(loader))
    assert isinstance(teachers, TeacherOutputs) and teachers.logits.shape == (2, 16, 10)
    live = pool(x)
    torch.testing.assert_close(teachers.logits.softmax(-1), live.logits.softmax(-1), atol=2e-3, rtol=5e-3)
    for cached, computed in zip(teachers.features, live.features):
        assert cached.shape == computed.shape and cached.dtype == torch.float32
        torch.testing.assert_close(cached, computed, atol=2e-2, rtol=1e-2)

def test_killed_build_resumes_to_a_byte_identical_cache(tmp_path, capsys):
    recipe = cache_recipe_file(tmp_path)
    args = ["build", str(recipe), "--views", "3", "--top-k", "4", "--shard-images", "16"]
    assert cache_main(args) == 0
    folder = next(cache_root().iterdir())
    whole = _files(folder)
    assert len([n for n in whole if n.endswith(".safetensors")]) == 6
    capsys.readouterr()  # drop the build's output
    assert cache_main(["info", folder.name]) == 0
    out = capsys.readouterr().out
    assert "96/96 images (6 of 6 shards)" in out and "top-k      4 of 10" in out and "3 per image" in out

    home = tmp_path / "killed_home"
    env = dict(os.environ, DISTILL_HOME=str(home), PYTHONPATH=HOOKED_PATH, OMP_NUM_THREADS="1",
               DISTILL_TEST_SHARD_DELAY="0.4")
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", "cache", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_folder = home / "cache" / "teachers" / folder.name
    deadline = time.time() + 60
    while time.time() < deadline and len(list(killed_folder.glob("shard-*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _files(killed_folder)
    assert "index.json" not in partial and 2 <= sum(n.endswith(".json") and n.startswith("shard") for n in partial) < 6
    result = subprocess.run([sys.executable, "-m", "distill.cli", "cache", *args], env=dict(env, DISTILL_TEST_SHARD_DELAY="0"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    resumed = _files(killed_folder)
    assert {n for n in resumed if not n.startswith(".")} == set(whole)
    assert all(resumed[n] == whole[n] for n in whole)


def test_mismatched_or_corrupt_cache_is_refused_with_exit_2(tmp_path, capsys):
    recipe = cache_recipe_file(tmp_path)
    assert cache_main(["build", str(recipe), "--views", "2", "--shard-images", "32"]) == 0
    folder = next(cache_root().iterdir())
    train = ["train", str(recipe), "run.teacher_cache=" + folder.name, "data.fixed_views=2", "schedule.epochs=1", "schedule.name=constant"]
    from distill.cli import main

    capsys.readouterr()
    assert main([*train[:1], *train[1:], "data.fixed_views=3"]) == 2  # another view count
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "views: 2 in the cache, 3 in this recipe" in err
    assert main([*train, "distill.features=pre_logits"]) == 2  # another tap
    assert "tap" in capsys.readouterr().err

    shard = folder / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(train) == 2
    err = capsys.readouterr().err
    assert "shard-00001.safetensors" in err and "corrupt" in err
    with pytest.raises(DistillError):
        open_cache(folder)
    assert cache_main(["build", str(recipe), "--views", "2", "--shard-images", "32"]) == 0  # rebuilt
    assert len(open_cache(folder)) == 96 * 2
    assert main(train) == 0


@pytest.mark.parametrize("override, field", [
    (["run.teacher_cache=auto"], "run.teacher_cache"),
    (["run.teacher_cache=nonsense", "data.fixed_views=2"], "run.teacher_cache"),
    (["data.fixed_views=2", "run.teacher_cache=auto", "data.mixup=0.2"], "run.teacher_cache"),
    (["data.fixed_views=2"], "data.fixed_views"),
    (["data.fixed_views=0", "run.teacher_cache=auto"], "data.fixed_views"),
    (["data.fixed_views=2", "run.teacher_cache=auto", "run.teacher_top_k=0"], "run.teacher_top_k"),
    (["data.fixed_views=2", "run.teacher_cache=auto", "data.aug_repeats=3"], "data.aug_repeats"),
])
def test_bad_cache_settings_name_the_field(override, field):
    raw = {"student": "cifar_resnet8", "data": {"dataset": "digits"}, "teachers": [{"model": "cifar_resnet8"}]}
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, override)
    assert field in str(info.value)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("sketch", [[], ["--sketch", "4"]])  # with a sketch: rank 0 fits the basis, rank 1 reads it
def test_two_ranks_build_disjoint_shards_of_the_same_cache(tmp_path, sketch):
    recipe = cache_recipe_file(tmp_path)
    args = ["build", str(recipe), "--views", "2", "--top-k", "3", "--shard-images", "32", *sketch]
    assert cache_main(args) == 0
    folder = next(cache_root().iterdir())
    home = tmp_path / "ranks_home"
    env = dict(os.environ, DISTILL_HOME=str(home), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_free_port()), "-m", "distill.cli", "cache", *args],
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _files(home / "cache" / "teachers" / folder.name) == _files(folder)


def test_key_tracks_files_seed_views_teachers_top_k_and_dtype(image_tree, tmp_path):
    import shutil

    from distill.cache.store import cache_key, cache_spec, dataset_fingerprint
    from distill.pipeline import make_teacher
    from distill.resolve import DataSpec, resolve_model
    from distill.recipe import TeacherConfig
    from distill.taps import FeatureTap
    from distill.teachers import TeacherPool

    root = tmp_path / "copy"
    shutil.copytree(image_tree, root)
    bundle = build_data(_data_cfg(root, "cifar"))
    data = DataSpec(bundle.input_size, bundle.mean, bundle.std)

    def pool(seed=0, tap="pre_logits"):
        torch.manual_seed(seed)
        resolved = resolve_model("cifar_resnet8", num_classes=3)
        return TeacherPool([make_teacher("0:r8", TeacherConfig("cifar_resnet8"), resolved, data, FeatureTap(tap))])

    def key(dataset=bundle.train, seed=0, views=2, top_k=3, teachers=None, dtype=None):
        return cache_key(cache_spec(dataset, {"augment": "cifar"}, seed, views, top_k, 3, teachers or pool(), dtype))

    base = key()
    assert base == key()  # deterministic: same files, weights, settings
    others = [key(seed=1), key(views=3), key(top_k=2), key(teachers=pool(seed=1)),
              key(teachers=pool(tap="last_map")), key(dtype=torch.bfloat16)]
    assert len({base, *others}) == 7
    before = dataset_fingerprint(bundle.train)
    path = root / "train" / "class1" / "3.png"
    path.write_bytes(path.read_bytes() + b"\0")  # one file changes size
    assert dataset_fingerprint(build_data(_data_cfg(root, "cifar")).train)["files"] != before["files"]


def test_record_hash_is_the_sha256_of_sorted_json_and_refuses_what_json_cannot_hold():
    """One digest keys caches and stored teacher metrics: an existing cache keeps its key across versions."""
    import hashlib

    from distill.cache.store import KEY_LENGTH, cache_key
    from distill.manifest import record_hash

    record = {"views": 2, "teachers": [{"sha256": "ab", "tap": "last_map"}], "autocast": None}
    text = '{"autocast": null, "teachers": [{"sha256": "ab", "tap": "last_map"}], "views": 2}'
    assert record_hash(record) == hashlib.sha256(text.encode()).hexdigest()
    assert cache_key(record) == record_hash(record)[:KEY_LENGTH] and KEY_LENGTH == 32
    assert record_hash(dict(reversed(list(record.items())))) == record_hash(record)
    with pytest.raises(TypeError):
        record_hash({"root": Path("/data")})  # no repr()-based key that could never match again


def test_cache_shard_with_non_finite_outputs_is_refused_naming_shard_and_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from distill.cache.verify import file_sha256
    from distill.cli import main

    recipe = cache_recipe_file(tmp_path)
    assert cache_main(["build", str(recipe), "--views", "2", "--shard-images", "32"]) == 0
    folder = next(cache_root().iterdir())
    shard = folder / "shard-00001.safetensors"
    tensors = load_file(str(shard))
    name = next(k for k in sorted(tensors) if tensors[k].is_floating_point())
    tensors[name].view(-1)[5] = float("nan")
    save_file(tensors, str(shard))  # as a cache written from a teacher with NaN outputs: its SHA-256 recorded
    index = json.loads((folder / "index.json").read_text())
    for record in index["shards"]:
        if record["file"] == shard.name:
            record["sha256"] = file_sha256(shard)
    (folder / "index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert main(["train", str(recipe), "run.teacher_cache=" + folder.name, "data.fixed_views=2",
                 "schedule.epochs=1", "schedule.name=constant"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(shard) in err and f"tensor '{name}'" in err and "1 NaN" in err, err
