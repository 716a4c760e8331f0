"""Crash safety with real processes: SIGKILL mid-epoch and mid-checkpoint, SIGTERM, non-finite loss.

A tiny digits recipe runs as ``python -m distill.cli train`` in a subprocess. Tests-only
environment hooks slow it down or pause it at a point of the checkpoint write
(``DISTILL_TEST_STEP_DELAY``, ``DISTILL_TEST_PAUSE_AT``: tests/hooks/sitecustomize.py); the kills are real signals.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from distill import cli
from distill.checkpoint import load_checkpoint
from distill.pipeline import RecipeRunner
from distill.recipe_load import recipe_from_dict

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "hooks")])  # + tests-only hooks


def _raw(run_dir: Path, epochs: int = 2) -> dict:
    return {
        "name": "crash",
        "output_dir": str(run_dir),
        "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0, "train_subset": 128, "val_subset": 64},
        "student": "cifar_resnet8",
        "teachers": [{"model": "cifar_resnet14", "pretrained": False, "train": {"epochs": 1, "lr": 0.1}}],
        "optim": {"lr": 0.05},
        "schedule": {"name": "multistep", "epochs": epochs, "milestones": [1] if epochs > 1 else []},
        "run": {"progress": False, "device": "cpu", "precision": "fp32", "deterministic": True},
    }


def _start(recipe: Path, *args: str, **env: str) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH, **env}
    return subprocess.Popen([sys.executable, "-m", "distill.cli", "train", str(recipe), *args], cwd=ROOT,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the process")
        time.sleep(0.05)


def _epoch_of(run: Path):
    try:
        return json.loads((run / "last.json").read_text())["epoch"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def _paused(proc: subprocess.Popen) -> bool:
    line = proc.stderr.readline()  # blocks until the marker (or another line) arrives
    return line.startswith("DISTILL_TEST_PAUSED")


def _paused_or_training(proc: subprocess.Popen) -> bool:
    line = proc.stderr.readline()  # the step-delay hook announces the first step
    return line.startswith("DISTILL_TEST_STEP")


def _checkpoints_load(run: Path) -> None:
    for stem in (run / "last", run / "best", next((run / "teachers").iterdir()) / "last"):
        load_checkpoint(stem)


def test_sigkill_mid_epoch_and_mid_checkpoint_then_resume_equals_uninterrupted(tmp_path):
    RecipeRunner(recipe_from_dict(_raw(tmp_path / "full"))).run()
    run = tmp_path / "cut"
    recipe = tmp_path / "crash.yaml"
    recipe.write_text(yaml.safe_dump(_raw(run)))

    # 1. SIGKILL in the middle of epoch 2 (4 steps; the step delay makes an epoch last ~2 s)
    proc = _start(recipe, DISTILL_TEST_STEP_DELAY="0.3")
    _wait_for(lambda: _epoch_of(run) == 0, proc)
    time.sleep(0.6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _epoch_of(run) == 0
    _checkpoints_load(run)

    # 2. resume, SIGKILL with the committed tensors moved aside and the new ones not yet in place
    proc = _start(recipe, "--resume", DISTILL_TEST_PAUSE_AT="checkpoint-rename")
    _wait_for(lambda: _paused(proc), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "last.safetensors").exists() and (run / "last.prev.safetensors").is_file()
    assert load_checkpoint(run / "last")[1]["epoch"] == 0  # the previous tensors match the JSON

    # 3. resume, SIGKILL with the new tensors renamed in but the JSON (the commit) not yet
    proc = _start(recipe, "--resume", DISTILL_TEST_PAUSE_AT="checkpoint-commit")
    _wait_for(lambda: _paused(proc), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "last.safetensors").is_file()
    assert load_checkpoint(run / "last")[1]["epoch"] == 0

    # 4. resume, SIGTERM mid-epoch: finishes the step, writes nothing, exits 143 with one line
    proc = _start(recipe, "--resume", DISTILL_TEST_STEP_DELAY="0.3")
    _wait_for(lambda: _paused_or_training(proc), proc)
    time.sleep(0.6)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM in epoch 2" in err and "--resume" in err
    assert _epoch_of(run) == 0
    _checkpoints_load(run)

    # 5. resume to the end: identical to the uninterrupted run; no leftover temporaries
    proc = _start(recipe, "--resume")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    a, b = load_file(str(tmp_path / "full" / "last.safetensors")), load_file(str(run / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    _checkpoints_load(run)
    assert not list(run.glob(".*")), "temporary files left behind"
    assert len((run / "summary.csv").read_text().splitlines()) == 3


def test_non_finite_loss_stops_with_the_step_and_parts_and_keeps_last(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path / "run", epochs=1)))
    assert cli.train_main([str(path)]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").glob("last*")}
    capsys.readouterr()
    assert cli.train_main([str(path), "optim.lr=1.0e+10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "non-finite loss" in err and "epoch 1 step" in err and "ce=" in err and "kd=" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").glob("last*")} == before
