"""Every class of fault ends in one line naming the culprit, exit code 2, no traceback.

Each class runs the real console command (``distill-train``, ``distill-eval``) in a
subprocess once; variants of the same class run in-process through ``distill.cli``.
"""

import os
import re
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


# ----------------------------------------------------------------------------- --help and usage errors


def _console_scripts() -> list:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return [line.split("=")[0].strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines()
            if line.strip()]


def test_help_of_every_command_and_subcommand_exits_0(tmp_path):
    scripts = _console_scripts()
    assert {"distill-train", "distill-cache"} <= set(scripts)
    for name in scripts:
        proc = run_cli(tmp_path, name, "--help")
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {name} "), (name, proc.stderr)
    top = run_cli(tmp_path, "distill-cache", "--help").stdout
    for sub in ("build", "info"):  # each subcommand on one line with its description
        assert re.search(rf"^    {sub} +\w.+$", top, re.M), top
        proc = run_cli(tmp_path, "distill-cache", sub, "--help")
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: distill-cache {sub} "), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "--help"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True)
    assert proc.returncode == 0
    for sub in ("train", "eval", "zoo", "plot", "push", "cache"):
        assert re.search(rf"^    {sub} +\w.+$", proc.stdout, re.M), proc.stdout


def test_usage_errors_name_only_what_is_missing(tmp_path):
    line = assert_one_line_error(run_cli(tmp_path, "distill-train"), "required: recipe")
    assert "overrides" not in line
    assert_one_line_error(run_cli(tmp_path, "distill-cache"), "a command is required: build, info")
    assert_one_line_error(run_cli(tmp_path, "distill-cache", "bild"), "unknown command 'bild'", "did you mean: build")
    line = assert_one_line_error(run_cli(tmp_path, "distill-cache", "info"), "required: target")
    assert "overrides" not in line


# ----------------------------------------------------------------------------- non-finite tensors


def _digits_net(seed: int = 0):
    import timm

    import zoo  # noqa: F401  (registers the CIFAR archs)

    torch.manual_seed(seed)
    return timm.create_model("cifar_resnet8", num_classes=10, in_chans=1).eval()


def test_non_finite_weights_files_are_refused_naming_file_and_tensor(tmp_path, capsys):
    from safetensors.torch import save_file

    state = _digits_net().state_dict()
    conv = "layer1.0.conv1.weight"  # (16, 16, 3, 3): one output channel is 144 values
    nan_teacher = tmp_path / "teacher_nan.pth"
    torch.save({"state_dict": {**state, conv: state[conv].clone().index_fill_(0, torch.tensor([3]), float("nan"))}},
               nan_teacher)
    recipe = digits_recipe(tmp_path, tmp_path / "run", teachers=[{"model": "cifar_resnet8", "weights": str(nan_teacher)}])
    assert_one_line_error(run_cli(tmp_path, "distill-train", recipe), str(nan_teacher), f"tensor '{conv}'",
                          "non-finite values (144 NaN, 0 infinite of 2304)")

    inf_student = tmp_path / "student_inf.safetensors"
    fc = state["fc.weight"].clone()
    fc[0, 0] = float("inf")
    save_file({**state, "fc.weight": fc}, str(inf_student))
    recipe = digits_recipe(tmp_path, tmp_path / "run2", student={"model": "cifar_resnet8", "weights": str(inf_student)})
    err = in_process_error(cli.train_main, [recipe], capsys)
    assert str(inf_student) in err and "tensor 'fc.weight'" in err and "(0 NaN, 1 infinite of 640)" in err


def test_teacher_with_non_finite_outputs_is_named_before_training(tmp_path):
    state = _digits_net().state_dict()
    huge = tmp_path / "teacher_huge.pth"  # finite weights whose logits overflow float32
    torch.save({**state, "fc.weight": state["fc.weight"].sign() * 3e38}, huge)
    recipe = digits_recipe(tmp_path, tmp_path / "run", teachers=[
        {"model": "cifar_resnet8", "pretrained": False, "train": {"epochs": 1}},
        {"model": "cifar_resnet8", "weights": str(huge)}])
    assert_one_line_error(run_cli(tmp_path, "distill-train", recipe), "teacher 1", "cifar_resnet8",
                          "logits are not finite")


def test_non_finite_checkpoint_is_refused_by_eval_and_resume(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from distill.checkpoint import read_metadata

    recipe = digits_recipe(tmp_path, tmp_path / "run")
    assert cli.train_main([str(recipe)]) == 0
    last = tmp_path / "run" / "last.safetensors"
    tensors = load_file(str(last))
    name = next(k for k in sorted(tensors) if k.endswith("conv1.weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(last), metadata=read_metadata(last))
    assert_one_line_error(run_cli(tmp_path, "distill-eval", last, "--dataset", "digits", "--num-workers", "0"),
                          str(last), f"tensor '{name}'", "non-finite")
    err = in_process_error(cli.train_main, [recipe, "schedule.epochs=2", "--resume"], capsys)
    assert str(last) in err and f"tensor '{name}'" in err


def test_non_finite_hub_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from .test_hub import add_snapshot, hub_files

    files = hub_files(_digits_net(), tmp_path, "nan")
    weights = tmp_path / "nan" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["bn1.running_var"][2] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    files["model.safetensors"] = weights.read_bytes()
    cache = tmp_path / "hf" / "hub"
    add_snapshot(cache, "org/nan", "a" * 40, files, refs=["main"])
    proc = run_cli(tmp_path, "distill-eval", "hf-hub:org/nan", "--dataset", "digits", "--num-workers", "0",
                   HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    assert_one_line_error(proc, "hf-hub:org/nan", "model.safetensors", "tensor 'bn1.running_var'", "1 NaN")


# ----------------------------------------------------------------------------- hidden folders


def test_jupyter_checkpoint_folders_are_not_classes(tmp_path):
    from PIL import Image

    folder = tmp_path / "two"
    for split in ("train", "test"):
        for c in ("a", "b", ".ipynb_checkpoints", "a/.ipynb_checkpoints"):
            (folder / split / c).mkdir(parents=True, exist_ok=True)
        for c in ("a", "b"):
            for i in range(4):
                Image.new("RGB", (8, 8), (60 * i, 20, 30 if c == "a" else 200)).save(folder / split / c / f"{i}.png")
        Image.new("RGB", (8, 8)).save(folder / split / "a" / ".ipynb_checkpoints" / "0-checkpoint.png")
    recipe = digits_recipe(tmp_path, tmp_path / "run", data={"dataset": "imagefolder", "root": str(folder),
                                                              "batch_size": 4, "num_workers": 0, "input_size": 8})
    proc = run_cli(tmp_path, "distill-train", recipe)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "test accuracy on imagefolder (8 images)" in proc.stdout, proc.stdout


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


class _CtrlCInWorker(torch.utils.data.Dataset):
    """64 items; loading item 20 sends SIGINT to the loading worker itself, as Ctrl-C does to the whole
    process group under torchrun. The signal is sent from inside the worker, synchronously, so what
    follows depends only on the worker's SIGINT disposition, never on timing: ignored, every batch
    arrives; not ignored, the worker dies before it returns batch 5 and the loader must say so."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        if index == 20 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGINT)
        return index, 0


def _batches(loader) -> int:
    """Return how many batches ``loader`` delivers in all (the batch with item 20 included)."""
    return sum(1 for _ in loader)


def test_dataloader_workers_ignore_ctrl_c():
    from torch.utils.data import DataLoader

    from distill.data import build_loader

    # The workers fork from this process and inherit its SIGINT handling: make it Python's default
    # (KeyboardInterrupt), as in a terminal. A shell that starts the tests in the background (`&`)
    # hands them SIGINT ignored, and the control below would then get every batch like build_loader.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert _batches(build_loader(_CtrlCInWorker(), 4, False, 2, 0)) == 16  # the main process decides
        with pytest.raises(RuntimeError, match="exited unexpectedly"):  # without the worker init: the worker dies
            # (collate_fn=list: plain Python batches, no tensors in the dead worker's shared memory)
            _batches(DataLoader(_CtrlCInWorker(), batch_size=4, num_workers=2, collate_fn=list))
    finally:
        signal.signal(signal.SIGINT, previous)
