"""run.teacher_cache_view_seed: the runs of a multi-seed study share one teacher cache."""

import json

import pytest
import torch

from distill.cache.store import cache_root
from distill.errors import RecipeError
from distill.pipeline import RecipeRunner
from distill.recipe_load import recipe_from_dict

torch.set_num_threads(1)


@pytest.fixture
def teacher_weights(tmp_path):
    """A fixed teacher (the key hashes the teachers' weights: random-init teachers would differ by seed)."""
    from safetensors.torch import save_file

    from distill.resolve import resolve_model

    torch.manual_seed(0)
    model = resolve_model("cifar_resnet8", num_classes=10, in_chans=1).model
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _raw(run_dir, seed, weights, **run):
    return {"name": "s", "output_dir": str(run_dir), "seed": seed,
           "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0, "train_subset": 64, "val_subset": 32,
                    "augment": "cifar", "fixed_views": 2},
           "student": "cifar_resnet8", "teachers": [{"model": "cifar_resnet8", "weights": weights}],
           "distill": {"features": "pre_logits"}, "schedule": {"name": "constant", "epochs": 1},
           "run": {"progress": False, "device": "cpu", "teacher_cache": "auto", "teacher_top_k": 4, **run}}


def _recipe(run_dir, seed, weights, **run):
    return recipe_from_dict(_raw(run_dir, seed, weights, **run))


def test_a_two_seed_study_with_one_view_seed_builds_one_cache(tmp_path, monkeypatch, teacher_weights):
    from distill.teachers import TeacherPool

    calls = []
    original = TeacherPool.forward
    monkeypatch.setattr(TeacherPool, "forward", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    first = RecipeRunner(_recipe(tmp_path / "seed1", 1, teacher_weights, teacher_cache_view_seed=7)).run()
    assert sum(calls) == 2 + 64 * 2  # projector sizing, then the build: 64 images x 2 views
    calls.clear()
    second = RecipeRunner(_recipe(tmp_path / "seed2", 2, teacher_weights, teacher_cache_view_seed=7)).run()
    assert sum(calls) == 2  # the cache of seed 1 is used: no teacher ran on a view
    (folder,) = cache_root().iterdir()
    assert json.loads((folder / "index.json").read_text())["spec"]["view_seed"] == 7
    assert first.student != second.student  # two runs all the same: seed 2 trained its own student

    calls.clear()
    RecipeRunner(_recipe(tmp_path / "default", 2, teacher_weights)).run()  # default: the views follow the training seed, 2
    assert sum(calls) == 2 + 64 * 2 and len(list(cache_root().iterdir())) == 2
    keys = {json.loads((f / "index.json").read_text())["spec"]["view_seed"] for f in cache_root().iterdir()}
    assert keys == {7, 2}


@pytest.mark.parametrize("override, message", [
    (["run.teacher_cache=null", "data.fixed_views=null", "run.teacher_top_k=null"], "run.teacher_cache=auto"),
    (["run.teacher_cache_view_seed=-1"], "must be >= 0"),
])
def test_bad_view_seed_names_the_field(tmp_path, override, message):
    raw = {"student": "cifar_resnet8", "data": {"dataset": "digits", "fixed_views": 2},
           "teachers": [{"model": "cifar_resnet8"}], "run": {"teacher_cache": "auto", "teacher_cache_view_seed": 3}}
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, override)
    assert "run.teacher_cache_view_seed" in str(info.value) and message in str(info.value)


def test_a_run_without_teachers_trains_on_the_stored_views_of_its_study(tmp_path, monkeypatch, teacher_weights):
    """The student-alone row of a cached study sees, batch for batch, the images the cached runs see."""
    from distill.taps import TappedModel

    seen = []
    original = TappedModel.forward

    def record(self, x):
        if self.model.training and torch.is_grad_enabled():  # the student's training steps only
            seen.append(x.clone())
        return original(self, x)

    monkeypatch.setattr(TappedModel, "forward", record)

    def training_inputs(name, teachers=True, fixed_views=True):
        seen.clear()
        raw = _raw(tmp_path / name, 1, teacher_weights, teacher_cache_view_seed=7)
        raw["schedule"]["epochs"] = 3
        if not teachers:
            raw["teachers"] = []
        if not fixed_views:
            del raw["data"]["fixed_views"], raw["run"]["teacher_cache"], raw["run"]["teacher_cache_view_seed"]
        RecipeRunner(recipe_from_dict(raw)).run()
        return list(seen)

    cached = training_inputs("cached")
    alone = training_inputs("alone", teachers=False)
    live = training_inputs("live", teachers=False, fixed_views=False)
    assert len(cached) == len(alone) == len(live) == 3 * 2  # 64 images, batch 32, 3 epochs
    assert all(torch.equal(a, b) for a, b in zip(cached, alone))
    # epoch 2 shows view 0 again, in epoch 2's order: the same images as epoch 0, reordered
    sums = [sorted(torch.cat(epoch).sum((1, 2, 3)).tolist()) for epoch in (alone[:2], alone[4:])]
    assert sums[0] == sums[1]
    assert not torch.equal(alone[4], alone[0])
    assert not any(torch.equal(a, b) for a, b in zip(alone, live))  # without fixed views: fresh crops each epoch
