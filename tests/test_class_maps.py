"""Teacher ``classes:`` maps on real files, and the pre-training pool check (``run.pool_check``)."""

import pytest
import torch

from distill import cli
from distill.cache.store import teacher_spec
from distill.errors import DistillError, RecipeError
from distill.pipeline import RecipeRunner
from distill.pool_check import pre_training_check
from distill.recipe_load import recipe_from_dict, teacher_configs
from distill.teachers import TeacherPool

from .test_faults import assert_one_line_error, run_cli
from .test_pool_check import SPEC, needs_weights, published_resnet56, recipe_dict, shifted_weights_file

torch.set_num_threads(1)

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
POSITIONS = [57, 3, 91, 20, 44, 0, 68, 12, 99, 35]  # where the 100-class head keeps CIFAR-10 class c


def superset_files(tmp_path, names):
    """Write a 100-class ResNet-56 (CIFAR-10 row c at POSITIONS[c], other rows random) and its names file."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in published_resnet56().state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for key in ("fc.weight", "fc.bias"):
        small = state[key]
        big = torch.randn((100, *small.shape[1:]), generator=gen) * small.std()
        big[POSITIONS] = small
        state[key] = big.contiguous()
    weights = tmp_path / "resnet56_100.safetensors"
    save_file(state, str(weights))
    labels = [f"other_{k}" for k in range(100)]
    for c, pos in enumerate(POSITIONS):
        labels[pos] = names[c]
    names_file = tmp_path / "labels.txt"
    names_file.write_text("\n".join(labels) + "\n")
    return weights, names_file


@needs_weights
def test_a_100_class_teacher_is_mapped_onto_10_named_classes(cifar10_jpeg_root, tmp_path):
    weights, names = superset_files(tmp_path, [n.upper() for n in CIFAR10])  # case does not matter
    teacher_cfg = {"model": SPEC, "weights": str(weights), "classes": {"names_file": str(names)}}
    recipe = recipe_from_dict(recipe_dict(cifar10_jpeg_root, [SPEC, teacher_cfg]))
    runner = RecipeRunner(recipe)
    original, mapped = [runner.prepare_teacher(i, cfg) for i, cfg in enumerate(teacher_configs(recipe))]
    assert mapped.model.num_classes == 100
    assert mapped.class_map == POSITIONS and mapped.source["classes"] == POSITIONS
    x = torch.stack([runner.bundle.val[i][0] for i in range(0, 10000, 1250)])
    with torch.no_grad():
        out = TeacherPool([original, mapped])(x)
        assert out.logits.shape == (2, 8, 10)
        torch.testing.assert_close(out.logits[1], out.logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(mapped.logits(x), original.logits(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(mapped.head(out.features[1]), out.logits[0], rtol=0, atol=1e-5)
    specs = teacher_spec(TeacherPool([original, mapped]))
    assert "classes" not in specs[0] and specs[1]["classes"] == POSITIONS  # the cache key sees the map


@needs_weights
def test_a_label_that_matches_nothing_is_one_error_from_distill_train(cifar10_jpeg_root, tmp_path):
    import yaml

    weights, names = superset_files(tmp_path, [n if n != "automobile" else "automobil" for n in CIFAR10])
    recipe = recipe_dict(cifar10_jpeg_root, [{"model": SPEC, "weights": str(weights),
                                              "classes": {"names_file": str(names)}}])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run_cli(tmp_path, "distill-train", path, "--offline")
    assert_one_line_error(proc, "teachers[0].classes", "automobile", "match no label", "did you mean: automobil")


@pytest.mark.parametrize("classes, message", [
    ([1, 1, 2], "given more than once: 1"),
    ([0, "cat"], "indices only, or label names only"),
    ({"names": "x"}, "{names_file: PATH}"),
    ({"names_file": "/nonexistent/labels.txt"}, "names_file"),
    ("labels", "expected an index list"),
])
def test_bad_class_maps_name_the_field(classes, message):
    raw = {"data": {"dataset": "cifar10"}, "student": "cifar_resnet8",
           "teachers": [{"model": "cifar_resnet20", "pretrained": False, "classes": classes}]}
    with pytest.raises(RecipeError, match="teachers\\[0\\].classes") as info:
        recipe_from_dict(raw)
    assert message in str(info.value)
    raw["teachers"][0].update(classes=list(range(10)), train={"epochs": 1})
    with pytest.raises(RecipeError, match="drop classes: or train:"):
        recipe_from_dict(raw)


@needs_weights
def test_pre_training_check_warns_or_refuses_a_shifted_teacher(cifar10_jpeg_root, tmp_path):
    shifted = shifted_weights_file(tmp_path / "shift3.safetensors")
    recipe = recipe_from_dict(recipe_dict(cifar10_jpeg_root, [SPEC, {"model": SPEC, "weights": str(shifted)}]))
    runner = RecipeRunner(recipe)
    pool = TeacherPool([runner.prepare_teacher(i, cfg) for i, cfg in enumerate(teacher_configs(recipe))])
    said = []
    rng = torch.get_rng_state()
    report = pre_training_check(pool, runner.bundle.train, 32, torch.device("cpu"), None, False, 10, "warn", said.append)
    assert torch.equal(torch.get_rng_state(), rng)  # the training run's randomness is untouched
    assert report["images"] == 128  # max(4 batches of 32, 5 images x 10 classes)
    assert len(said) == 1 and "teacher 1:" in said[0] and "classes: [3, 4, 5, 6, 7, 8, 9, 0, 1, 2]" in said[0]
    assert report["teachers"][1]["permutation"]["top1_after"] == pytest.approx(report["teachers"][0]["top1"])
    with pytest.raises(DistillError, match=r"run.pool_check=strict: teacher 1:.*classes: \[3, 4, 5"):
        pre_training_check(pool, runner.bundle.train, 32, torch.device("cpu"), None, False, 10, "strict", said.append)
    assert pre_training_check(pool, runner.bundle.train, 32, torch.device("cpu"), None, False, 10, "off",
                              said.append) is None


@needs_weights
def test_distill_train_with_strict_pool_check_refuses_before_training(cifar10_jpeg_root, tmp_path, capsys):
    import yaml

    shifted = shifted_weights_file(tmp_path / "shift3.safetensors")
    recipe = recipe_dict(cifar10_jpeg_root, [{"model": SPEC, "weights": str(shifted)}], pool_check="strict")
    recipe["data"].update(train_subset=100, val_subset=100)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = cli.train_main([str(path), f"output_dir={tmp_path / 'run'}", "--offline"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: run.pool_check=strict: teacher 0:") and "classes: [3, 4, 5" in err[-1]
    assert not (tmp_path / "run" / "last.json").exists()


@needs_weights
def test_pre_training_check_reads_a_teacher_cache_as_training_does(cifar10_jpeg_root, tmp_path, monkeypatch):
    from distill.cache.recipes import training_cache

    shifted = shifted_weights_file(tmp_path / "shift3.safetensors")
    raw = recipe_dict(cifar10_jpeg_root, [SPEC, {"model": SPEC, "weights": str(shifted)}], teacher_cache="auto")
    raw["data"].update(train_subset=100, augment="none", fixed_views=1)
    recipe = recipe_from_dict(raw)
    runner = RecipeRunner(recipe)
    pool = TeacherPool([runner.prepare_teacher(i, cfg) for i, cfg in enumerate(teacher_configs(recipe))])
    cpu = torch.device("cpu")
    cache = training_cache(recipe, runner.bundle, pool, cpu, None)
    live_said, cached_said, calls = [], [], []
    live = pre_training_check(pool, runner.bundle.train, 32, cpu, None, False, 10, "warn", live_said.append)
    original = TeacherPool.forward
    monkeypatch.setattr(TeacherPool, "forward", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    cached = pre_training_check(pool, runner.bundle.train, 32, cpu, None, False, 10, "warn", cached_said.append,
                                cache=cache)
    assert calls == []  # the outputs came from the cache
    assert live["images"] == cached["images"] == 100  # max(4 x 32, 5 x 10) capped at the 100 training images
    for a, b in zip(live["teachers"], cached["teachers"]):  # fp16 top-k storage: ties aside, the same top-1
        assert abs(a["top1"] - b["top1"]) <= 1.0
    assert cached["teachers"][1]["permutation"]["classes"] == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    assert len(cached_said) == 1 and "(teacher cache)" in cached_said[0] and "teacher 1:" in cached_said[0]
