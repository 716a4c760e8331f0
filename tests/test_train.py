"""End to end on the bundled digits data: distill-train, resume, distill-eval, distill-zoo."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill import cli
from distill.engine import Trainer
from distill.errors import DistillError
from distill.pipeline import RecipeRunner
from distill.recipe_load import recipe_from_dict, teacher_configs

torch.set_num_threads(1)


def _raw(run_dir: Path, epochs: int = 2) -> dict:
    return {
        "name": "tiny",
        "output_dir": str(run_dir),
        "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0, "train_subset": 256},
        "student": "cifar_resnet8",
        "teachers": [{"model": "cifar_resnet14", "pretrained": False, "train": {"epochs": 1, "lr": 0.1}}],
        "optim": {"lr": 0.05},
        "schedule": {"name": "multistep", "epochs": epochs, "milestones": [1] if epochs > 1 else []},
        "run": {"progress": False},
    }


def test_train_writes_run_files_and_eval_reads_them(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path / "run", epochs=1)))
    assert cli.train_main([str(path), "run.baseline=true"]) == 0
    out = capsys.readouterr().out
    assert "teacher 0:cifar_resnet14" in out and "(distilled)" in out and "(alone)" in out
    run = tmp_path / "run"
    for name in ("recipe.yaml", "summary.csv", "results.json", "last.safetensors", "last.json",
                 "best.safetensors", "best.json", "baseline/last.safetensors", "teachers/0-cifar_resnet14/last.json"):
        assert (run / name).is_file(), name
    header = (run / "summary.csv").read_text().splitlines()[0].split(",")
    for column in ("epoch", "lr", "train_loss", "train_ce", "train_kd", "train_feat", "val_top1", "val_top5",
                   "images_per_sec", "w_logit_mean/0:cifar_resnet14"):
        assert column in header
    assert yaml.safe_load((run / "recipe.yaml").read_text())["schedule"]["epochs"] == 1
    results = json.loads((run / "results.json").read_text())

    assert cli.eval_main([str(run), "--dataset", "digits", "--num-workers", "0"]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    top1 = float(last_line.split()[0].split("=")[1])
    assert last_line.startswith("top1=") and " top5=" in last_line
    assert top1 == pytest.approx(results["student"]["best_top1"], abs=0.01)


def test_resume_reproduces_an_uninterrupted_run(tmp_path, monkeypatch):
    full = RecipeRunner(recipe_from_dict(_raw(tmp_path / "full"))).run()

    original = Trainer._save

    def crash_after_first_epoch(self, name, epoch):
        original(self, name, epoch)
        if self.label == "distill" and name == "last" and epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        RecipeRunner(recipe_from_dict(_raw(tmp_path / "cut"))).run()
    monkeypatch.setattr(Trainer, "_save", original)
    assert json.loads((tmp_path / "cut" / "last.json").read_text())["epoch"] == 0
    stored = json.loads((tmp_path / "cut" / "teacher_metrics.json").read_text())
    assert len(stored) == 1  # one teacher, measured before the crash

    def not_again(self, teacher):
        raise AssertionError(f"{teacher.name} evaluated again on resume")

    monkeypatch.setattr(RecipeRunner, "evaluate_teacher", not_again)  # the resumed run reads the stored metrics
    resumed = RecipeRunner(recipe_from_dict(_raw(tmp_path / "cut")), resume=True).run()
    monkeypatch.undo()
    assert [{k: t[k] for k in ("top1", "top5", "loss")} for t in resumed.teachers] == list(stored.values())
    assert resumed.teachers[0]["top1"] == full.teachers[0]["top1"]

    a = load_file(str(tmp_path / "full" / "last.safetensors"))
    b = load_file(str(tmp_path / "cut" / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.student["final_top1"] == full.student["final_top1"]
    rows = (tmp_path / "cut" / "summary.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 epochs, no duplicate row from the resumed epoch


def test_teacher_metrics_are_measured_again_when_the_teacher_or_the_test_set_changes(tmp_path, monkeypatch):
    runner = RecipeRunner(recipe_from_dict(_raw(tmp_path / "run")))
    cfg = teacher_configs(runner.recipe)[0]
    teacher = runner.prepare_teacher(0, cfg)
    calls = []
    monkeypatch.setattr(RecipeRunner, "evaluate_teacher",
                        lambda self, t: calls.append(t.name) or {"top1": 50.0, "top5": 90.0, "loss": 1.5})
    assert runner.teacher_metrics([teacher], [cfg]) == [{"top1": 50.0, "top5": 90.0, "loss": 1.5}]
    assert runner.teacher_metrics([teacher], [cfg]) == [{"top1": 50.0, "top5": 90.0, "loss": 1.5}]
    assert len(calls) == 1  # stored and reused
    teacher.source = dict(teacher.source, sha256="0" * 64)  # other weights
    runner.teacher_metrics([teacher], [cfg])
    assert len(calls) == 2
    other = RecipeRunner(recipe_from_dict({**_raw(tmp_path / "run"), "data": {**_raw(tmp_path)["data"], "val_subset": 64}}))
    other.teacher_metrics([teacher], [cfg])  # another test set: the stored entry does not apply
    assert len(calls) == 3
    path = tmp_path / "run" / "teacher_metrics.json"
    key = other.teacher_key(teacher, cfg)
    path.write_text(json.dumps({key: {"top1": float("nan"), "top5": 90.0, "loss": 1.5}}))
    other.teacher_metrics([teacher], [cfg])  # a non-finite record is measured again, not trusted
    assert len(calls) == 4 and json.loads(path.read_text())[key]["top1"] == 50.0
    path.write_text("[1, 2]")
    with pytest.raises(DistillError, match="teacher_metrics.json: not a teacher-metrics file"):
        other.teacher_metrics([teacher], [cfg])


def _trained_recipe(tmp_path: Path, capsys, **changes) -> Path:
    """Return the path of a one-epoch recipe (``_raw`` updated with ``changes``) trained once."""
    raw = dict(_raw(tmp_path / "run", epochs=1), **changes)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.train_main([str(path)]) == 0
    capsys.readouterr()
    return path


def test_resume_with_another_teacher_pool_is_an_error(tmp_path, capsys):
    path = _trained_recipe(tmp_path, capsys)
    assert cli.train_main([str(path), "--resume", "teachers.0.model=cifar_resnet8"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "teachers" in err


def test_resume_with_other_policy_arguments_is_an_error(tmp_path, capsys):
    path = _trained_recipe(tmp_path, capsys, distill={"policy": "mtkd_rl", "policy_args": {"max_grad_norm": 1.0}})
    assert cli.train_main([str(path), "--resume", "distill.policy_args.max_grad_norm=5.0"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "max_grad_norm" in err and "5.0" in err
    assert cli.train_main([str(path), "--resume"]) == 0  # the same recipe resumes (nothing left to do)


def test_zoo_lists_models_and_pools(capsys):
    assert cli.zoo_main([]) == 0
    out = capsys.readouterr().out
    assert "cifar_resnet56" in out and "akamaster_cifar10" in out
    assert "cifar100_cnn4" in out and "imagenet_vit3" in out
