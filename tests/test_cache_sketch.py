"""The tail sketch through the real cache: fitted basis, build, store, lookup, refusals, keys, recipe fields."""

import json
import pickle

import pytest
import torch

from distill.cache.projection import project
from distill.cache.sketch import SKETCH_FILE, Sketch, fit_sketch, read_sketch, sketch_coefficients, sketch_logits
from distill.cache.store import cache_key, cache_root, open_cache
from distill.cache.verify import file_sha256
from distill.cache.topk import reconstruct_logits, topk_soft_labels
from distill.cli import cache_main
from distill.errors import DistillError, RecipeError
from distill.recipe_load import recipe_from_dict

from .test_teacher_cache import cache_recipe_file

torch.set_num_threads(1)


def test_fitted_basis_is_orthonormal_and_rebuilds_low_rank_logits_exactly():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 40, generator=gen) * 3  # 2 teachers, 40 classes
    directions = torch.randn(2, 5, 40, generator=gen)  # rank 5 per teacher

    def rows(n):  # (n, M, C): logits in the teachers' rank-5 affine subspaces
        return mean + (torch.randn(n, 2, 1, 5, generator=gen) @ directions).squeeze(-2)

    logits = rows(300)
    sketch = fit_sketch(logits, 5)
    assert sketch.mean.shape == (2, 40) and sketch.basis.shape == (2, 40, 5) and sketch.rank == 5
    torch.testing.assert_close(sketch.basis.transpose(-1, -2) @ sketch.basis, torch.eye(5).expand(2, 5, 5),
                               atol=1e-5, rtol=0)
    fresh = rows(7)  # other items in the same subspaces: their 5 coefficients give them back
    torch.testing.assert_close(sketch_logits(sketch_coefficients(fresh, sketch), sketch), fresh, atol=1e-3, rtol=0)
    smaller = fit_sketch(logits, 3)  # rank 3 of rank-5 logits: the residual is what remains
    residual = logits - sketch_logits(sketch_coefficients(logits, smaller), smaller)
    assert residual.abs().max() > 0.5
    assert torch.equal(fit_sketch(logits.flip(0), 5).basis.sign(), sketch.basis.sign())  # signs fixed, not drawn
    with pytest.raises(DistillError, match="teacher_cache_sketch"):
        fit_sketch(logits[:3], 5)




BUILD = ["--views", "2", "--top-k", "3", "--sketch", "4", "--shard-images", "32"]


def test_a_sketched_cache_round_trips_through_build_and_lookup(tmp_path, capsys, monkeypatch):
    from distill.cache.recipes import training_cache
    from distill.cache.source import cached_train_loader
    from distill.pipeline import RecipeRunner
    from distill.recipe_load import load_recipe, teacher_configs
    from distill.teachers import TeacherPool

    recipe_path = cache_recipe_file(tmp_path, "pre_logits")
    assert cache_main(["build", str(recipe_path), *BUILD]) == 0
    (folder,) = list(cache_root().iterdir())
    assert cache_main(["info", folder.name]) == 0 and "top-k      3 of 10 classes, tails at T = 4, shaped by a rank-4 " \
        "sketch" in capsys.readouterr().out
    index = json.loads((folder / "index.json").read_text())
    assert index["spec"]["sketch"] == 4 and index["sketch"]["file"] == SKETCH_FILE
    assert index["sketch"]["sha256"] == file_sha256(folder / SKETCH_FILE)
    recipe = load_recipe(str(recipe_path), ["run.teacher_cache=auto", "data.fixed_views=2", "run.teacher_top_k=3",
                                            "run.teacher_cache_sketch=4"])
    runner = RecipeRunner(recipe)
    pool = TeacherPool([runner.prepare_teacher(i, cfg) for i, cfg in enumerate(teacher_configs(recipe))])
    cache = training_cache(recipe, runner.bundle, pool, torch.device("cpu"), None)  # found, not rebuilt
    assert cache.key == folder.name and cache.sketch.basis.shape == (2, 10, 4)
    sketch = read_sketch(folder / SKETCH_FILE)
    assert torch.equal(cache.sketch.basis, sketch.basis)
    size = project(96, 2, 3, 10, ["a", "b"], [[tuple(a.row_shape)] for a in cache.features], 4)
    assert size.total == cache.nbytes and size.sketch == 96 * 2 * 2 * 4 * 2 + 2 * 10 * 5 * 4

    loader = cached_train_loader(recipe, runner.bundle.train, cache)
    loader.sampler.set_epoch(1)  # the second stored view
    x, y, teachers = next(iter(loader))
    live = pool(x).logits  # (M, B, C): the teachers on exactly the replayed views
    soft = topk_soft_labels(live.transpose(0, 1), 3, recipe.distill.temperature, y.unsqueeze(-1), sketch)
    expected = reconstruct_logits(soft, 10, recipe.distill.temperature, sketch).transpose(0, 1)
    torch.testing.assert_close(teachers.logits, expected, atol=2e-3, rtol=1e-3)  # the stored rows, rebuilt
    # the tail is shaped, not uniform: the rebuilt tail logits differ within each row
    hidden = torch.zeros_like(live, dtype=torch.bool).scatter(-1, live.topk(3, -1).indices, True)
    hidden.scatter_(-1, y.view(1, -1, 1).expand(2, -1, 1), True)
    tail = teachers.logits.masked_fill(hidden, float("nan"))
    spread = (tail.nan_to_num(-1e9).amax(-1) - tail.nan_to_num(1e9).amin(-1))
    assert bool((spread > 1e-3).all())

    # the basis moves to a device once per process, not once per batch; loader workers get none of it
    moved = []
    real_to = Sketch.to
    monkeypatch.setattr(Sketch, "to", lambda self, device: moved.append(str(device)) or real_to(self, device))
    fresh = open_cache(folder)
    first = fresh.lookup(torch.arange(8))
    fresh.lookup(torch.arange(8, 16))
    assert moved == ["cpu"] and fresh.sketch_on(torch.device("cpu")) is fresh.sketch_on("cpu")
    torch.testing.assert_close(first.logits, cache.lookup(torch.arange(8)).logits)
    assert pickle.loads(pickle.dumps(fresh))._device_sketches == {} and len(fresh._device_sketches) == 1


def test_a_resumed_build_reuses_the_recorded_basis(tmp_path, monkeypatch):
    recipe = cache_recipe_file(tmp_path, "pre_logits")
    assert cache_main(["build", str(recipe), *BUILD]) == 0
    (folder,) = list(cache_root().iterdir())
    whole = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for name in ("shard-00001.safetensors", "shard-00001.json", "index.json"):  # as a build killed before shard 1
        (folder / name).unlink()

    def refit(*args, **kwargs):
        raise AssertionError("the recorded basis was fitted again")

    monkeypatch.setattr("distill.cache.build.fit_sketch", refit)
    assert cache_main(["build", str(recipe), *BUILD]) == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == whole


def _nan_basis(folder):
    from safetensors.torch import load_file, save_file

    path = folder / SKETCH_FILE
    tensors = load_file(str(path))
    tensors["basis"].view(-1)[3] = float("nan")
    save_file(tensors, str(path))  # as a build from a teacher with NaN outputs: its SHA-256 recorded
    index = json.loads((folder / "index.json").read_text())
    index["sketch"]["sha256"] = file_sha256(path)
    (folder / "index.json").write_text(json.dumps(index))


def test_a_missing_or_non_finite_basis_is_refused_naming_the_file_and_rebuilt(tmp_path, capsys):
    from distill.cli import main

    recipe = cache_recipe_file(tmp_path, "pre_logits")
    assert cache_main(["build", str(recipe), *BUILD]) == 0
    (folder,) = list(cache_root().iterdir())
    train = ["train", str(recipe), f"run.teacher_cache={folder.name}", "data.fixed_views=2", "run.teacher_top_k=3",
             "run.teacher_cache_sketch=4", "schedule.epochs=1", "schedule.name=constant"]
    _nan_basis(folder)
    with pytest.raises(DistillError, match="non-finite") as info:
        open_cache(folder)
    assert str(folder / SKETCH_FILE) in str(info.value) and "'basis'" in str(info.value)
    capsys.readouterr()
    assert main(train) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and SKETCH_FILE in err, err

    (folder / SKETCH_FILE).unlink()
    with pytest.raises(DistillError, match=f"{SKETCH_FILE} missing"):
        open_cache(folder)
    with pytest.raises(DistillError, match=f"{SKETCH_FILE}: teacher-cache sketch basis is missing"):
        read_sketch(folder / SKETCH_FILE)
    before = (folder / "shard-00000.safetensors").read_bytes()
    assert cache_main(["build", str(recipe), *BUILD]) == 0  # repaired: the basis again, and shards in that basis
    assert (folder / "shard-00000.safetensors").read_bytes() == before  # deterministic: the same basis
    assert len(open_cache(folder)) == 96 * 2


def test_only_caches_with_a_sketch_change_their_spec_and_key():
    from distill.cache.store import cache_spec
    from distill.data import TensorImageDataset
    from distill.pipeline import make_teacher
    from distill.recipe import TeacherConfig
    from distill.resolve import DataSpec, resolve_model
    from distill.taps import FeatureTap
    from distill.teachers import TeacherPool

    torch.manual_seed(0)
    data = TensorImageDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), [0, 1, 2, 0], (0.5,) * 3, (0.5,) * 3)
    resolved = resolve_model("cifar_resnet8", num_classes=3)
    pool = TeacherPool([make_teacher("0:r8", TeacherConfig("cifar_resnet8"), resolved,
                                     DataSpec((3, 8, 8), (0.5,) * 3, (0.5,) * 3), FeatureTap("pre_logits"))])

    def spec(top_k, **sketch):
        return cache_spec(data, {"augment": "none"}, 0, 1, top_k, 3, pool, None, 4.0, **sketch)

    today = {"format", "dataset", "augment", "view_seed", "views", "top_k", "num_classes", "tail_temperature",
             "teachers", "autocast"}  # the fields every key hashed before the sketch
    assert set(spec(3)) == today and spec(3, sketch=2) == spec(3)  # k = C: no tail, no sketch, today's key
    assert set(spec(1, sketch=0)) == today and spec(1, sketch=0) == spec(1)  # k < C, no sketch: today's key
    assert spec(1, sketch=2)["sketch"] == 2
    assert len({cache_key(spec(1)), cache_key(spec(1, sketch=1)), cache_key(spec(1, sketch=2))}) == 3


@pytest.mark.parametrize("run, message", [
    ({"teacher_cache_sketch": 4}, "set run.teacher_cache=auto"),
    ({"teacher_cache": "auto", "teacher_top_k": 3, "teacher_cache_sketch": -1}, "must be >= 0"),
])
def test_bad_sketch_settings_name_the_field(run, message):
    raw = {"student": "cifar_resnet8", "data": {"dataset": "digits", "fixed_views": 1 if "teacher_cache" in run else None},
           "teachers": [{"model": "cifar_resnet8"}], "run": run}
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    assert "run.teacher_cache_sketch" in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("args, message", [
    (["--sketch", "4"], "all 10 classes are kept"),  # k = C: nothing beyond the top-k to sketch
    (["--top-k", "3", "--sketch", "10"], "rank 10 must be below the 10 classes"),
])
def test_a_sketch_the_build_cannot_use_is_refused_with_exit_2(tmp_path, capsys, args, message):
    assert cache_main(["build", str(cache_recipe_file(tmp_path, "pre_logits")), "--views", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run.teacher_cache_sketch" in err and message in err, err
