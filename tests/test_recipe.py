"""Recipe schema: every bad-input class is an error naming the field, exit code 2, no traceback."""

from pathlib import Path

import pytest
import torch
import yaml

from distill import cli
from distill.errors import RecipeError
from distill.recipe_load import load_recipe, recipe_from_dict

torch.set_num_threads(1)

GOOD = {
    "name": "t",
    "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0},
    "student": "cifar_resnet8",
    "teachers": [{"model": "cifar_resnet14", "pretrained": False, "train": {"epochs": 1}}],
    "schedule": {"name": "cosine", "epochs": 2},
}


def _error(raw, overrides=None) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, overrides)
    return str(info.value)


def test_good_recipe_and_overrides():
    recipe = recipe_from_dict(GOOD, ["optim.lr=0.2", "teachers.0.train.epochs=3", "distill.policy=aver",
                                     "schedule.milestones=[1]"])
    assert recipe.optim.lr == 0.2
    assert recipe.teachers[0].train.epochs == 3
    assert recipe.student.model == "cifar_resnet8" and recipe.student.pretrained is False
    assert recipe.teachers[0].pretrained is False
    assert recipe.distill.alpha == 1.0 and recipe.distill.beta == 5.0 and recipe.distill.temperature == 4.0


def test_quickstart_recipe_loads():
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    assert recipe.data.dataset == "digits" and recipe.run.baseline


@pytest.mark.parametrize("override, field, words", [
    ("optim.lrr=0.1", "optim.lrr", "did you mean: lr"),
    ("optim.lr=abc", "optim.lr", "expected a number"),
    ("optim.lr=-1", "optim.lr", "must be > 0"),
    ("schedule.epochs=2.5", "schedule.epochs", "expected an integer"),
    ("optim.name=adam", "optim.name", "did you mean: adamw"),
    ("student.model=cifar_resnet9", "student.model", "unknown model"),
    ("teachers.0.model=resnet5O", "teachers[0].model", "unknown model"),
    ("teachers.0.weights=/no/such/file.pth", "teachers[0].weights", "file not found"),
    ("pool=cifar10_resnet5", "pool", "did you mean: cifar10_resnet4"),
    ("distill.policy=avr", "distill.policy", "did you mean: aver"),
    ("distill.policy_args={foo: 1}", "distill.policy_args", "takes no argument"),
    ("distill.features=middle", "distill.features", "pre_logits"),
    ("data.dataset=cifar11", "data.dataset", "did you mean: cifar10"),
    ("run.baseline=yes please", "run.baseline", "expected true or false"),
    ("teachers.5.model=x", "teachers.5", "no list item"),
])
def test_bad_fields_are_named(override, field, words):
    message = _error(GOOD, [override])
    assert f"'{field}'" in message and words in message


def test_multistep_default_milestones_follow_epochs_and_written_ones_are_checked():
    from distill.recipe_load import recipe_from_dict

    assert recipe_from_dict(GOOD, ["schedule.name=multistep", "schedule.epochs=240"]).schedule.decay_epochs() \
        == [150, 180, 210]  # the paper's
    assert recipe_from_dict(GOOD, ["schedule.name=multistep", "schedule.epochs=30"]).schedule.decay_epochs() \
        == [19, 22, 26]  # never past the schedule (the fuzz test's falsifying example: name removed, epochs 30)
    assert recipe_from_dict(GOOD, ["schedule.name=multistep", "schedule.epochs=1"]).schedule.decay_epochs() == []
    message = _error(GOOD, ["schedule.name=multistep", "schedule.milestones=[1, 40]"])
    assert "'schedule.milestones'" in message and "strictly between" in message


def test_unknown_top_level_key_and_missing_student():
    assert "did you mean: teachers" in _error({**GOOD, "teacher": []})
    raw = dict(GOOD)
    del raw["student"]
    assert "'student.model'" in _error(raw)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "optim": {"lr": "fast"}}))
    assert cli.train_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: recipe field 'optim.lr': expected a number, got 'fast'"]
    assert cli.train_main([str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
    path.write_text("a: [1, 2")
    assert cli.train_main([str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_teacher_class_count_mismatch_is_a_clear_error(tmp_path, capsys):
    import timm

    from distill.checkpoint import STUDENT_PREFIX, prefixed, save_checkpoint
    from distill.registry import DataSpec, student_metadata

    model = timm.create_model("cifar_resnet8", num_classes=5, in_chans=1)
    data = DataSpec((1, 8, 8), (0.5,), (0.5,))
    save_checkpoint(tmp_path / "five", prefixed(model.state_dict(), STUDENT_PREFIX), {"epoch": 0},
                    student_metadata("cifar_resnet8", model, {"in_chans": 1}, data))
    raw = {**GOOD, "teachers": [str(tmp_path / "five.safetensors")], "output_dir": str(tmp_path / "run")}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli.train_main([str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: teachers[0]") and "predicts 5 classes but dataset digits has 10" in err
