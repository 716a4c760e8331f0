"""Every class of fault ends in one line naming the culprit, exit code 2, no traceback.

Each class runs the real console command (``distill-train``, ``distill-eval``) in a
subprocess once; variants of the same class run in-process through ``distill.cli``.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distill import cli
from distill.checkpoint import load_checkpoint
from distill.runlock import run_lock

from .conftest import SHARED_DATA

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "hooks")])  # + tests-only hooks
AKAMASTER = SHARED_DATA / "weights" / "akamaster_resnet_cifar10"
RESNET56 = AKAMASTER / "resnet56-4bfd9763.th"
needs_aka = pytest.mark.skipif(not RESNET56.is_file(), reason=f"shared weights not found: {RESNET56}")


def _command(name: str) -> str:
    """Return the installed console script ``name`` beside this Python (it imports distill via PYTHONPATH)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() else shutil.which(name)


def _env(tmp_path: Path, **extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "DISTILL_HOME": str(tmp_path / "home"),
            **extra}


def run_cli(tmp_path: Path, name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run console command ``name`` with ``args``; return the finished process (text output)."""
    return subprocess.run([_command(name), *map(str, args)], cwd=tmp_path, env=_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert exit 2, no traceback and one ``error:`` line holding every needle; return that line."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def digits_recipe(tmp_path: Path, run_dir: Path, epochs: int = 1, **extra) -> Path:
    raw = {"name": "faults", "output_dir": str(run_dir),
           "data": {"dataset": "digits", "batch_size": 16, "num_workers": 0, "train_subset": 32, "val_subset": 16},
           "student": "cifar_resnet8", "optim": {"lr": 0.05}, "schedule": {"name": "constant", "epochs": epochs},
           "run": {"progress": False, "device": "cpu", "precision": "fp32"}, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def in_process_error(main, args, capsys) -> str:
    """Run a ``distill.cli`` entry point in-process; assert exit 2 and one error line; return it."""
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not line.startswith("dry run [")]  # the dry run's progress lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ----------------------------------------------------------------------------- files the tools read


def test_unreadable_input_files(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert_one_line_error(run_cli(tmp_path, "distill-train", latin1), str(latin1), "not UTF-8")

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert str(empty) in in_process_error(cli.train_main, [empty], capsys)
    assert "is a directory" in in_process_error(cli.train_main, [tmp_path], capsys)
    assert "not found" in in_process_error(cli.train_main, [tmp_path / "nope.yaml"], capsys)

    weights = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, weights)
    weights.write_bytes(weights.read_bytes()[:200])
    err = in_process_error(cli.eval_main, ["cifar_resnet8", "--dataset", "digits", "--weights", weights], capsys)
    assert "w.pth" in err and "truncated" in err
    weights.write_bytes(b"")
    assert "w.pth: weights file is empty" in in_process_error(
        cli.eval_main, ["cifar_resnet8", "--dataset", "digits", "--weights", weights], capsys)


def test_truncated_checkpoint_state_is_named(tmp_path, capsys):
    run_dir = tmp_path / "run"
    recipe = digits_recipe(tmp_path, run_dir)
    assert cli.train_main([str(recipe)]) == 0
    capsys.readouterr()
    state = run_dir / "last.json"
    state.write_bytes(state.read_bytes()[:50])
    err = in_process_error(cli.train_main, [recipe, "--resume"], capsys)
    assert "last.json" in err and "corrupt" in err


# ----------------------------------------------------------------------------- network fetches


@needs_aka
def test_weights_that_cannot_be_fetched(tmp_path, capsys):
    local = tmp_path / "home" / "weights" / RESNET56.name
    recipe = digits_recipe(tmp_path, tmp_path / "run",
                           teachers=[{"model": "cifar_resnet56.akamaster_cifar10", "train": {"epochs": 1}}])
    # the network is unreachable: a proxy on a closed port refuses every connection at once
    proc = run_cli(tmp_path, "distill-train", recipe, https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    assert_one_line_error(proc, "teachers[0]", "cifar_resnet56.akamaster_cifar10", "cannot download",
                          f"put the file at {local}")
    assert not local.parent.exists() or not any(local.parent.iterdir())  # no partial download left behind

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILL_HOME", str(tmp_path / "home"))
        for main, args in ((cli.train_main, [recipe, "--offline"]),
                           (cli.eval_main, ["cifar_resnet56.akamaster_cifar10", "--dataset", "cifar10",
                                            "--no-download"])):
            err = in_process_error(main, args, capsys)
            assert "downloads are off" in err and f"put the file at {local}" in err
        err = in_process_error(cli.eval_main, ["cifar_resnet8", "--dataset", "cifar10", "--offline", "--no-pretrained",
                                               "--data-dir", tmp_path / "nodata"], capsys)
        assert "data.root" in err and "downloads are off" in err


# ----------------------------------------------------------------------------- paths the tools write


def test_output_dir_that_is_a_file(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    recipe = digits_recipe(tmp_path, tmp_path / "run")
    assert_one_line_error(run_cli(tmp_path, "distill-train", recipe, "--output-dir", taken), str(taken),
                          "existing file")
    err = in_process_error(cli.train_main, [recipe, "--output-dir", taken / "below"], capsys)
    assert "existing file" in err and taken.read_text() == "not a folder"


def test_full_disk_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    recipe = digits_recipe(tmp_path, run_dir, epochs=3)
    # the 2nd write of last.safetensors (epoch 2) finds the disk full
    proc = run_cli(tmp_path, "distill-train", recipe, DISTILL_TEST_FAIL_WRITE="last.safetensors@2")
    assert_one_line_error(proc, str(run_dir / "last.safetensors"), "no space left on device", "--resume")
    tensors, state = load_checkpoint(run_dir / "last")
    assert state["epoch"] == 0 and any(k.startswith("student.") for k in tensors)
    assert not list(run_dir.glob(".last*"))  # no temporary left beside it
    assert cli.train_main([str(recipe), "--resume"]) == 0  # space freed: the run resumes from epoch 1
    assert load_checkpoint(run_dir / "last")[1]["epoch"] == 2


# ----------------------------------------------------------------------------- concurrent runs


def test_second_run_on_one_directory_refuses_and_a_crash_releases_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    recipe = digits_recipe(tmp_path, run_dir)
    first = subprocess.Popen([_command("distill-train"), str(recipe)], cwd=tmp_path, text=True,
                             env=_env(tmp_path, DISTILL_TEST_PAUSE_AT="checkpoint-rename", DISTILL_TEST_PAUSE_S="60"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "DISTILL_TEST_PAUSED" not in line:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            line = first.stderr.readline()
        second = run_cli(tmp_path, "distill-train", recipe)
        assert_one_line_error(second, str(run_dir), f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)  # a crash
        first.wait()
    with run_lock(run_dir):  # the kernel released the crashed holder's lock
        pass


# ----------------------------------------------------------------------------- weights that load partly


@needs_aka
def test_weights_file_that_does_not_fit_names_the_keys(tmp_path, capsys):
    proc = run_cli(tmp_path, "distill-eval", "cifar_resnet20", "--dataset", "cifar10", "--weights", RESNET56,
                   "--offline")
    assert_one_line_error(proc, str(RESNET56), "weights do not fit cifar_resnet20", "not in the model: layer1.3.")
    err = in_process_error(cli.eval_main, ["cifar_resnet56", "--dataset", "cifar10", "--weights", RESNET56,
                                           "--offline", "--data-dir", tmp_path / "nodata"], capsys)
    assert "data.root" in err  # the model loaded (10 classes from the file); only the data is missing


@needs_aka
def test_file_loaded_teacher_is_complete_named_after_its_file_with_its_normalisation(tmp_path, capsys):
    from distill.dryrun import dry_run
    from distill.recipe_load import load_recipe

    teacher = {"model": "cifar_resnet56", "model_args": {"num_classes": 10}, "weights": str(RESNET56)}
    recipe = digits_recipe(tmp_path, tmp_path / "run", data={"dataset": "cifar10"}, teachers=[teacher])
    table = dry_run(load_recipe(recipe, check_data=False)).table()
    assert "0:resnet56-4bfd9763.th (cifar_resnet56)" in table
    assert "weights file resnet56-4bfd9763.th (cifar_resnet56), mean/std from the file's config " \
           "(cifar_resnet56.akamaster_cifar10)" in table
    assert "pretrained" not in table.split("teachers", 1)[-1].split("student", 1)[0].replace("resnet56", "")

    bad = digits_recipe(tmp_path, tmp_path / "run",
                        teachers=[{**teacher, "model_args": {"num_classes": 100}}], data={"dataset": "cifar10"})
    err = in_process_error(cli.train_main, [bad, "--dry-run"], capsys)
    assert "fc.weight (10, 64) vs (100, 64)" in err and RESNET56.name in err and "new_keys" in err


# ----------------------------------------------------------------------------- class counts


@needs_aka
def test_class_counts_of_weights_and_data_disagree(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "three"
    for split in ("train", "test"):
        for c in "abc":
            (folder / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32), (10, 20, 30)).save(folder / split / c / "x.png")
    proc = run_cli(tmp_path, "distill-eval", "cifar_resnet56", "--dataset", "imagefolder", "--data-dir", folder,
                   "--weights", RESNET56, "--num-workers", "0")
    assert_one_line_error(proc, "cifar_resnet56", RESNET56.name, "predicts 10 classes", "imagefolder has 3")

    student = {"model": "cifar_resnet56", "weights": str(RESNET56)}
    recipe = digits_recipe(tmp_path, tmp_path / "run", student=student,
                           data={"dataset": "imagefolder", "root": str(folder), "num_workers": 0, "input_size": 32})
    err = in_process_error(cli.train_main, [recipe], capsys)
    assert "student" in err and "predicts 10 classes" in err and "new_keys: [fc.*]" in err
    raw = yaml.safe_load(recipe.read_text())
    raw["student"]["new_keys"] = ["fc.*"]
    raw["schedule"]["epochs"] = 1
    recipe.write_text(yaml.safe_dump(raw))
    assert cli.train_main([str(recipe), "run.device=cpu"]) == 0  # a fresh 3-class head, the rest from the file


# ----------------------------------------------------------------------------- Ctrl-C with DataLoader workers


class _WorkerPids(torch.utils.data.Dataset):
    """64 items, each the pid of the process that loaded it."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        return torch.tensor([os.getpid()]), 0


def _interrupt_workers_midway(loader) -> int:
    """Send SIGINT to the loader's workers (as Ctrl-C does to the whole process group under torchrun)
    after two batches; return how many batches arrived in all."""
    batches = iter(loader)
    first = [next(batches)[0], next(batches)[0]]
    for pid in {int(p) for b in first for p in b.flatten()}:
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    return 2 + sum(1 for _ in batches)


def test_dataloader_workers_ignore_ctrl_c():
    from torch.utils.data import DataLoader

    from distill.data import build_loader

    assert _interrupt_workers_midway(build_loader(_WorkerPids(), 4, False, 2, 0)) == 16  # the main process decides
    with pytest.raises(RuntimeError, match="exited unexpectedly"):  # without the worker init: the workers die
        _interrupt_workers_midway(DataLoader(_WorkerPids(), batch_size=4, num_workers=2))
