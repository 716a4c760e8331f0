"""End to end on CPU: every policy through RecipeRunner on the digits dataset, the weights plot,
and an interrupted-then-resumed MTKD-RL run that equals the uninterrupted one bit for bit."""

import csv
import json
import math
import shutil

import pytest
import torch

torch.set_num_threads(1)

from distill import cli  # noqa: E402
from distill.checkpoint import load_checkpoint, load_tensors  # noqa: E402
from distill.engine import Trainer  # noqa: E402
from distill.pipeline import RecipeRunner  # noqa: E402
from distill.recipe_load import recipe_from_dict, teacher_configs  # noqa: E402

BATCHES_PER_EPOCH = 8  # train_subset 256 / batch 32


def make_recipe(run_dir, policy="aver", policy_args=None, epochs=2, **extra):
    distill = {"policy": policy, "policy_args": policy_args or {}}
    distill.update(extra.pop("distill", {}))
    raw = {"name": "tiny", "seed": 0, "output_dir": str(run_dir),
           "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0, "train_subset": 256, "val_subset": 64},
           "student": "cifar_resnet8",
           "teachers": [{"model": "cifar_resnet8", "pretrained": False, "train": {"epochs": 1, "lr": 0.1}},
                        {"model": "cifar_wrn_16_1", "pretrained": False, "train": {"epochs": 1, "lr": 0.1}}],
           "distill": distill, "optim": {"lr": 0.05}, "schedule": {"name": "cosine", "epochs": epochs},
           "run": {"device": "cpu", "progress": False, **extra.pop("run", {})}}
    assert not extra
    return recipe_from_dict(raw)


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory):
    """The two small teachers, trained once (1 epoch) and copied into every run directory."""
    run_dir = tmp_path_factory.mktemp("teacher_cache") / "run"
    recipe = make_recipe(run_dir)
    runner = RecipeRunner(recipe)
    for i, cfg in enumerate(teacher_configs(recipe)):
        runner.prepare_teacher(i, cfg)
    return run_dir / "teachers"


def start_run(run_dir, teacher_cache):
    shutil.copytree(teacher_cache, run_dir / "teachers")
    return run_dir


def read_rows(run_dir):
    with open(run_dir / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


TEACHERS = ("0:cifar_resnet8", "1:cifar_wrn_16_1")
CASES = {
    "ebkd": ("ebkd", {}, {}),
    "camkd": ("camkd", {}, {}),
    "mtkd_rl": ("mtkd_rl", {}, {}),
    "mtkd_rl_official": ("mtkd_rl", {"variant": "official", "learnable_gammas": True, "state_norm": "running",
                                     "update_every": 3, "buffer": 2}, {}),
    "mtkd_rl_dist": ("mtkd_rl", {"buffer": 4}, {"logit_loss": "dist"}),
    "mixture": ("mixture", {"weights": [0.7, 0.3]}, {}),
    "mixture_over_mtkd_rl": ("mixture", {"over": "mtkd_rl"}, {"logit_loss": "dist"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_policy_end_to_end(case, tmp_path, teacher_cache):
    policy, args, distill = CASES[case]
    run_dir = start_run(tmp_path / case, teacher_cache)
    report = RecipeRunner(make_recipe(run_dir, policy, args, distill=distill, run={"plot": True})).run()
    assert math.isfinite(report.student["final_top1"])
    rows = read_rows(run_dir)
    assert len(rows) == 2
    for row in rows:
        for level in ("logit", "feat"):
            total = sum(float(row[f"w_{level}_mean/{t}"]) for t in TEACHERS)
            official_warmup = case == "mtkd_rl_official" and row["epoch"] == "1"
            camkd_first = case == "camkd" and level == "feat" and row["epoch"] == "1"  # no feature loss yet
            assert total == pytest.approx(2.0 if official_warmup else 0.0 if camkd_first else 1.0, abs=1e-5)
    if case == "mixture":
        assert float(rows[-1]["w_logit_mean/0:cifar_resnet8"]) == pytest.approx(0.7, abs=1e-6)
    if policy == "mtkd_rl" or "over" in args:
        updates = [float(r["policy/agent_updates"]) for r in rows]
        expected = {"mtkd_rl": BATCHES_PER_EPOCH, "mtkd_rl_official": 2 + 2 + 2,  # update_every 3, buffer 2
                    "mtkd_rl_dist": 4, "mixture_over_mtkd_rl": BATCHES_PER_EPOCH}[case]
        if case == "mtkd_rl_official":
            assert updates == [expected, expected]
        else:  # variant align: the trust region may end an epoch's updates early, never before the first
            stops = [float(r["policy/trust_stops"]) for r in rows]
            assert all(u == expected if s == 0 else 1 <= u < expected for u, s in zip(updates, stops))
            for r in rows:
                assert 0 <= float(r["policy/entropy_logit"]) <= math.log(2) + 1e-6
                assert float(r["policy/agent_param_norm"]) > 0
                assert all(-1 <= float(r[f"policy/reward_{lv}/{m}"]) <= 1 for lv in ("logit", "feat") for m in (0, 1))
        assert all(math.isfinite(float(r["policy/reward"])) for r in rows)
        # epoch 1 is the warm-up (equal weights); epoch 2 uses the agent: weights vary per sample
        assert float(rows[0]["w_logit_std/0:cifar_resnet8"]) == 0.0
        assert float(rows[1]["w_logit_std/0:cifar_resnet8"]) > 0.0
        _, state = load_checkpoint(run_dir / "last")
        prefix = "inner." if "over" in args else ""
        assert state["policy"][f"{prefix}agent.trunk.weight"].shape[0] == 128
    assert (run_dir / "weights.png").stat().st_size > 10_000


def test_distill_plot_cli(tmp_path, teacher_cache, capsys):
    run_dir = start_run(tmp_path / "run", teacher_cache)
    RecipeRunner(make_recipe(run_dir, "camkd", epochs=1)).run()
    assert cli.plot_main([str(run_dir)]) == 0
    assert (run_dir / "weights.png").is_file()
    assert cli.plot_main([str(tmp_path / "missing")]) == 2
    assert "summary.csv" in capsys.readouterr().err


class Interrupted(Exception):
    pass


RESUME_ARGS = {  # a buffer smaller than an epoch: reservoir sampling draws random numbers
    # the default variant: momentum, running state statistics, trust-region metrics
    "align": {"buffer": 5},
    # the paper variant with learnable gammas
    "paper": {"variant": "paper", "buffer": 5, "momentum": 0.9, "state_norm": "running", "learnable_gammas": True},
}


@pytest.mark.parametrize("variant", list(RESUME_ARGS))
def test_mtkd_rl_resume_is_bit_identical(variant, tmp_path, teacher_cache, monkeypatch):
    # everything the agent carries has to survive the checkpoint
    args = RESUME_ARGS[variant]
    run_a = start_run(tmp_path / "a", teacher_cache)
    RecipeRunner(make_recipe(run_a, "mtkd_rl", args, epochs=3)).run()

    run_b = start_run(tmp_path / "b", teacher_cache)
    original_save = Trainer._save

    def save_then_stop(self, name, epoch):
        original_save(self, name, epoch)
        if self.label == "distill" and name == "last" and epoch == 1:
            raise Interrupted  # after epoch 2's checkpoint is on disk

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save", save_then_stop)
        with pytest.raises(Interrupted):
            RecipeRunner(make_recipe(run_b, "mtkd_rl", args, epochs=3)).run()
    assert json.loads((run_b / "last.json").read_text())["epoch"] == 1  # 0-based: two epochs done
    RecipeRunner(make_recipe(run_b, "mtkd_rl", args, epochs=3), resume=True).run()

    a, b = load_tensors(run_a / "last.safetensors"), load_tensors(run_b / "last.safetensors")
    assert a.keys() == b.keys()
    assert any(k.startswith("state.policy.agent.") for k in a)
    assert any(k.startswith("student.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a, rows_b = read_rows(run_a), read_rows(run_b)
    skip = ("epoch_time", "images_per_sec")
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k not in skip} == {k: v for k, v in rb.items() if k not in skip}
