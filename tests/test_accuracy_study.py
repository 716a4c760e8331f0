"""benchmarks/accuracy.py: a recipes x policies x seeds sweep, its tables, plot and resume."""

import csv
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("accuracy", REPO / "benchmarks" / "accuracy.py")
accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accuracy)


def _config(tmp_path: Path) -> Path:
    study = {
        "name": "digits_study",
        "seeds": [0, 1],
        "reference": "aver",
        "recipes": [{
            "name": "digits8",
            "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0, "train_subset": 160,
                     "augment": "cifar", "fixed_views": 2},
            "student": "cifar_resnet8",
            "teachers": [{"model": "cifar_resnet8", "pretrained": False}, {"model": "cifar_resnet14", "pretrained": False}],
            "schedule": {"name": "cosine", "epochs": 2},
            "run": {"device": "cpu", "teacher_cache": "auto"},
        }],
        "policies": {"none": {"teachers": []}, "aver": {"distill.policy": "aver"},
                     "camkd": {"distill.policy": "camkd", "distill.temperature": 2.0}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _rows(out: Path):
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_writes_rows_tables_and_plot_and_resumes(tmp_path, capsys):
    config, out = _config(tmp_path), tmp_path / "out"
    assert accuracy.main([str(config), "--out", str(out), "--seeds", "0"]) == 0
    assert len(_rows(out)) == 3  # a slice: seed 0 only
    assert accuracy.main([str(config), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("done, skipped") == 3  # seed 0 was not rerun

    rows = _rows(out)
    assert [(r["policy"], r["seed"]) for r in rows] == [
        ("none", "0"), ("aver", "0"), ("camkd", "0"), ("none", "1"), ("aver", "1"), ("camkd", "1")]
    for r in rows:
        run = out / "digits8" / r["policy"] / f"seed{r['seed']}"
        results = json.loads((run / "results.json").read_text())
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        assert recipe["seed"] == int(r["seed"])
        assert float(r["final_top1"]) == pytest.approx(results["student"]["final_top1"])
        assert float(r["best_top1"]) == pytest.approx(results["student"]["best_top1"])
        assert int(r["epochs"]) == 2 and float(r["wall_time_s"]) > 0
        assert len(results["teachers"]) == (0 if r["policy"] == "none" else 2)
        assert recipe["distill"]["policy"] == ("camkd" if r["policy"] == "camkd" else "aver")
    # seeds change the run; the policy changes the run
    final = {(r["policy"], r["seed"]): float(r["final_top1"]) for r in rows}
    summaries = {k: (out / "digits8" / k[0] / f"seed{k[1]}" / "summary.csv").read_text() for k in final}
    assert summaries[("aver", "0")] != summaries[("aver", "1")]
    assert summaries[("aver", "0")] != summaries[("camkd", "0")]

    table = (out / "results.md").read_text()
    aver = [final[("aver", "0")], final[("aver", "1")]]
    camkd = [final[("camkd", "0")], final[("camkd", "1")]]
    diffs = [c - a for c, a in zip(camkd, aver)]
    assert f"{statistics.mean(aver):.2f} ± {statistics.stdev(aver):.2f}" in table
    assert f"| {statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} |" in table
    assert table.count("| teacher ") == 2
    assert (out / "val_top1.png").stat().st_size > 10_000


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path, capsys):
    config, out = _config(tmp_path), tmp_path / "out"
    assert accuracy.main([str(config), "--out", str(out), "--seeds", "0", "--policies", "aver"]) == 0
    run = out / "digits8" / "aver" / "seed0"
    before = (run / "summary.csv").read_text()
    (run / "results.json").unlink()  # as if killed after the last checkpoint, before the report
    assert accuracy.main([str(config), "--out", str(out), "--seeds", "0", "--policies", "aver"]) == 0
    assert (run / "summary.csv").read_text() == before  # nothing retrained
    assert _rows(out)[0]["resumed"] == "True"
    assert "[distill] epoch" not in capsys.readouterr().out.split("aver seed 0\n", 2)[-1]


def test_bad_study_configs_fail_before_training(tmp_path, capsys):
    config = _config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["policies"]["typo"] = {"distill.polcy": "aver"}
    config.write_text(yaml.safe_dump(raw))
    assert accuracy.main([str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "policy 'typo'" in err and "distill.polcy" in err
    assert not (tmp_path / "out").exists()
    raw["policies"].pop("typo")
    config.write_text(yaml.safe_dump(raw))
    assert accuracy.main([str(config), "--policies", "mtkd"]) == 2
    assert "--policies: 'mtkd'" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["cifar10_converged.yaml", "cifar10_cpu.yaml", "cifar10_full.yaml"])
def test_every_run_of_the_shipped_study_configs_is_a_valid_recipe(config):
    study = accuracy.Study(REPO / "benchmarks" / "configs" / config)
    runs = [study.recipe(name, label, study.seeds[0], check_data=False)
            for name in study.recipes for label in study.policies]
    assert len(runs) == len(study.recipes) * len(study.policies) >= 4
