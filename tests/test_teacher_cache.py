"""Fixed augmented views (distill.views) and the teacher-output cache (distill.teacher_cache)."""

from pathlib import Path

import pytest
import torch
from torchvision import transforms as T

from distill.data import TensorImageDataset, build_loader
from distill.errors import RecipeError
from distill.pipeline import RecipeRunner
from distill.plot import read_summary
from distill.recipe_load import recipe_from_dict
from distill.registry import DataSpec
from distill.taps import FeatureTap
from distill.teacher_cache import TeacherOutputCache, cache_dir, cache_key, teacher_output_cache
from distill.teachers import InputAdapter, Teacher, TeacherPool
from distill.views import FixedViews, materialise_views

torch.set_num_threads(1)


def _augmented(n: int = 40) -> TensorImageDataset:
    """Random 3x12x12 images with crop + flip augmentation, labels i % 4."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 12, 12, generator=gen)
    aug = T.Compose([T.RandomCrop(12, padding=2), T.RandomHorizontalFlip()])
    return TensorImageDataset(images, [i % 4 for i in range(n)], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), aug)


def test_view_v_is_what_the_training_loader_shows_in_epoch_v():
    dataset, seed = _augmented(), 7
    views = materialise_views(dataset, 3, seed, batch_size=16)
    assert views.views.shape == (40, 3, 3, 12, 12)
    loader = build_loader(dataset, 8, True, 0, seed)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        order = [index for index, _ in loader.sampler]
        seen = torch.cat([x for x, _ in loader])
        assert torch.equal(seen, views.views[order, epoch])
    # views differ from each other (the augmentation is random) and from another seed's
    assert not torch.equal(views.views[:, 0], views.views[:, 1])
    assert not torch.equal(materialise_views(dataset, 1, seed + 1).views[:, 0], views.views[:, 0])


def test_fixed_views_items_carry_their_key_and_draw_views_reproducibly():
    views = materialise_views(_augmented(), 4, 0)
    assert isinstance(views, FixedViews) and views.num_views == 4
    loader = build_loader(views, 10, True, 0, seed=3)

    picks = {}
    for epoch in range(6):
        loader.sampler.set_epoch(epoch)
        order = [index for index, _ in loader.sampler]
        xs, ys, keys = map(torch.cat, zip(*[(x, y, k) for x, y, k in loader]))
        index, view = keys // 4, keys % 4
        assert index.tolist() == order
        assert torch.equal(xs, views.views[index, view])
        assert ys.tolist() == [i % 4 for i in order]
        picks[epoch] = keys.tolist()
    assert torch.equal(views.flat_views()[torch.tensor(picks[0])], views.views[torch.tensor(picks[0]) // 4,
                                                                                 torch.tensor(picks[0]) % 4])
    loader.sampler.set_epoch(2)
    assert torch.cat([k for _, _, k in loader]).tolist() == picks[2]  # same epoch, same views
    used = torch.tensor(sum(picks.values(), [])) % 4
    assert set(used.tolist()) == {0, 1, 2, 3}  # 240 draws of 4 views: every view shows up


def _pool(seed: int = 0, tap: str = "pre_logits") -> TeacherPool:
    import timm

    import zoo  # noqa: F401

    data = DataSpec((3, 12, 12), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    teachers = []
    for i, name in enumerate(("cifar_resnet8", "cifar_wrn_16_1")):
        torch.manual_seed(seed + i)
        model = timm.create_model(name, num_classes=4)
        adapter = InputAdapter(data, (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
        teachers.append(Teacher(f"{i}:{name}", model, adapter, FeatureTap(tap), (3, 12, 12)))
    return TeacherPool(teachers)


def test_cache_lookup_matches_running_the_teachers():
    views = materialise_views(_augmented(24), 2, 0)
    for tap in ("pre_logits", "last_map"):
        pool = _pool(tap=tap)
        cache = TeacherOutputCache.compute(pool, views, torch.device("cpu"), None, batch_size=10)
        assert len(cache) == 48
        keys = torch.tensor([5, 0, 47, 12, 5])
        got = cache.lookup(keys)
        want = pool(views.flat_views()[keys])
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        for g, w in zip(got.features + got.embeddings, want.features + want.embeddings):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert (got.embeddings[0] is got.features[0]) == (tap == "pre_logits")


def test_cache_round_trips_and_its_key_tracks_inputs_weights_and_tap(tmp_path):
    views = materialise_views(_augmented(16), 2, 0)
    pool = _pool()
    key = cache_key(pool, views, None)
    assert key == cache_key(_pool(), views, None)  # same weights, views, tap
    assert key != cache_key(_pool(seed=5), views, None)
    assert key != cache_key(_pool(tap="last_map"), views, None)
    assert key != cache_key(pool, materialise_views(_augmented(16), 2, 1), None)
    assert key != cache_key(pool, views, torch.bfloat16)
    pool.teachers[1].adapter.shift += 0.1  # another normalisation for one teacher
    assert key != cache_key(pool, views, None)

    cache = TeacherOutputCache.compute(_pool(tap="last_map"), views, torch.device("cpu"), None)
    cache.save(tmp_path / "c.safetensors")
    loaded = TeacherOutputCache.load(tmp_path / "c.safetensors")
    assert torch.equal(loaded.logits, cache.logits)
    for a, b in zip(loaded.features + loaded.embeddings, cache.features + cache.embeddings):
        assert torch.equal(a, b)
    assert loaded.nbytes == cache.nbytes == 4 * (2 * 32 * 4 + 32 * (64 * 3 * 3 + 64) + 32 * (64 * 3 * 3 + 64))


def test_teacher_output_cache_computes_once_then_loads(capsys):
    views = materialise_views(_augmented(16), 2, 0)
    first = teacher_output_cache(_pool(), views, torch.device("cpu"), None)
    assert "ran 2 teachers once on 16 images x 2 views" in capsys.readouterr().out
    assert len(list(cache_dir().glob("*.safetensors"))) == 1
    second = teacher_output_cache(_pool(), views, torch.device("cpu"), None)
    assert "loaded" in capsys.readouterr().out
    assert torch.equal(first.logits, second.logits)


def _digits_recipe(run_dir: Path, **run):
    return recipe_from_dict({
        "name": "cached", "output_dir": str(run_dir), "seed": 1,
        "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0, "train_subset": 192,
                 "augment": "cifar", "fixed_views": 3},
        "student": "cifar_resnet8",
        "teachers": [{"model": "cifar_resnet8", "pretrained": False}, {"model": "cifar_resnet14", "pretrained": False}],
        "distill": {"policy": "camkd", "features": "last_map"},
        "schedule": {"name": "cosine", "epochs": 2},
        "run": {"progress": False, "device": "cpu", **run}})


def test_distillation_with_the_cache_matches_running_the_teachers(tmp_path, monkeypatch):
    plain = RecipeRunner(_digits_recipe(tmp_path / "plain")).run()
    calls = []
    original = TeacherPool.forward
    monkeypatch.setattr(TeacherPool, "forward", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    cached = RecipeRunner(_digits_recipe(tmp_path / "cached", teacher_cache=True)).run()
    # the pool ran on the 2-image projector-sizing batch and once on each of the 192 x 3 views,
    # never in a training step (the teachers' test evaluation calls the models directly)
    assert sum(calls) == 2 + 192 * 3
    a, b = read_summary(tmp_path / "plain"), read_summary(tmp_path / "cached")
    for column in ("train_loss", "train_kd", "train_feat", "val_top1", "w_logit_mean/0:cifar_resnet8"):
        assert [r[column] for r in a] == pytest.approx([r[column] for r in b], rel=1e-5, abs=1e-6)
    assert cached.student["final_top1"] == pytest.approx(plain.student["final_top1"], abs=1e-9)


@pytest.mark.parametrize("override, field", [
    (["run.teacher_cache=true"], "run.teacher_cache"),
    (["data.fixed_views=2", "run.teacher_cache=true", "data.mixup=0.2"], "run.teacher_cache"),
    (["data.fixed_views=0"], "data.fixed_views"),
])
def test_bad_cache_settings_name_the_field(override, field):
    raw = {"student": "cifar_resnet8", "data": {"dataset": "digits"}, "teachers": [{"model": "cifar_resnet8"}]}
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, override)
    assert field in str(info.value)
