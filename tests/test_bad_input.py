"""Bad input gives one line naming the file and the problem, exit code 2, nothing overwritten.

Cases already covered elsewhere (not repeated here): empty class folder and class-folder
mismatches (tests/test_data.py), teacher class-count mismatch (tests/test_recipe.py),
mismatched / truncated checkpoint pair (tests/test_checkpoint.py), code-carrying pickles as
weights (tests/test_resolve.py) and from the Hub (tests/test_hub.py).
"""

import pickle
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image

from distill import cli
from distill.checkpoint import load_checkpoint, save_checkpoint
from distill.errors import DistillError
from distill.resolve import resolve_model

torch.set_num_threads(1)


def _recipe(tmp_path, run_dir, **data) -> str:
    raw = {"name": "bad", "output_dir": str(run_dir),
           "data": {"dataset": "digits", "batch_size": 16, "num_workers": 0, "train_subset": 32,
                    "val_subset": 16, **data},
           "student": "cifar_resnet8", "optim": {"lr": 0.05}, "schedule": {"name": "constant", "epochs": 1},
           "run": {"progress": False, "device": "cpu"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_jpeg_hit_while_training_names_the_file(tmp_path, capsys, workers):
    root = tmp_path / "imgs"
    for split, cls in [("train", "a"), ("train", "b"), ("test", "a"), ("test", "b")]:
        (root / split / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / cls / f"{i}.jpg")
    bad = root / "train" / "b" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:30])  # truncated JPEG: the header parses, decoding fails
    path = _recipe(tmp_path, tmp_path / "run", dataset="imagefolder", root=str(root), input_size=8,
                   num_workers=workers, train_subset=None, val_subset=None, batch_size=4)
    assert cli.train_main([path]) == 2
    err = _error_line(capsys)
    assert str(bad) in err and "unreadable image" in err and "Traceback" not in err


def test_corrupt_resume_checkpoint_is_named_and_kept(tmp_path, capsys):
    path = _recipe(tmp_path, tmp_path / "run")
    assert cli.train_main([path]) == 0
    last = tmp_path / "run" / "last.json"
    last.write_text(last.read_text()[:100])  # a JSON cut short (cannot happen through save_checkpoint)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").glob("last*")}
    capsys.readouterr()
    assert cli.train_main([path, "--resume"]) == 2
    err = _error_line(capsys)
    assert str(last) in err and "corrupt checkpoint state" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").glob("last*")} == before


def test_checkpoint_loading_never_unpickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    save_checkpoint(tmp_path / "last", {"w": torch.zeros(1)}, {"epoch": 0}, {})
    (tmp_path / "last.safetensors").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(DistillError, match="last.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path / "last")


def test_truncated_weights_files_are_named(tmp_path):
    model = timm.create_model("cifar_resnet8", num_classes=10)
    pth = tmp_path / "w.pth"
    torch.save(model.state_dict(), pth)
    pth.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(DistillError, match="w.pth: cannot load weights"):
        resolve_model("cifar_resnet8", weights=str(pth))
    st = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(st))
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(DistillError, match="w.safetensors"):
        resolve_model("cifar_resnet8", weights=str(st))


def test_checkpoint_of_another_student_architecture(tmp_path, capsys):
    path = _recipe(tmp_path, tmp_path / "run")
    assert cli.train_main([path]) == 0
    ckpt = tmp_path / "run" / "last.safetensors"
    with pytest.raises(DistillError, match="a distill checkpoint of cifar_resnet8, not of cifar_resnet20"):
        resolve_model("cifar_resnet20", weights=str(ckpt))
    capsys.readouterr()
    before = ckpt.read_bytes()
    assert cli.train_main([path, "--resume", "student.model=cifar_resnet14"]) == 2
    err = _error_line(capsys)
    assert "cannot resume" in err and "student" in err and "last" in err
    assert ckpt.read_bytes() == before


def test_default_mtkd_rl_on_a_student_without_a_linear_head_names_the_fix(tmp_path, capsys):
    """The default held-out reward reads the student's linear classifier; head dropout breaks z = W h + b."""
    raw = yaml.safe_load(Path(_recipe(tmp_path, tmp_path / "run")).read_text())
    raw["teachers"] = [{"model": "cifar_resnet8", "pretrained": False}]
    raw["distill"] = {"policy": "mtkd_rl", "features": "pre_logits"}
    raw["student"] = {"model": "cifar_resnet8", "model_args": {"drop_rate": 0.1}}
    path = tmp_path / "head.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.train_main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()  # the dry run's progress lines, then one error line
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: policy 'mtkd_rl': reward heldout "
                                                                      "(the default) needs a student")
    assert "give policy_args: {reward: align}" in err.splitlines()[-1]
    assert cli.train_main([str(path), "--dry-run", "distill.policy_args={reward: align}"]) == 0
