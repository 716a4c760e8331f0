import json

import pytest
import torch

from distill.checkpoint import flatten_state, load_checkpoint, save_checkpoint, unflatten_state
from distill.errors import DistillError

torch.set_num_threads(1)


def test_roundtrip_with_nested_tensors(tmp_path):
    state = {"epoch": 3, "optimizer": {"state": {0: {"momentum_buffer": torch.arange(4.0)}},
                                       "param_groups": [{"lr": 0.1, "params": [0]}]}}
    save_checkpoint(tmp_path / "last", {"student.w": torch.ones(2, 2)}, state, {"distill.arch": "x"})
    tensors, loaded = load_checkpoint(tmp_path / "last")
    assert torch.equal(tensors["student.w"], torch.ones(2, 2))
    assert loaded["epoch"] == 3
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], torch.arange(4.0))  # int key kept
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_flatten_unflatten_inverse():
    tensors = {}
    obj = {"a": [torch.zeros(1), {"b": torch.ones(2)}], "c": "text"}
    flat = flatten_state(obj, "s", tensors)
    json.dumps(flat)  # plain JSON
    back = unflatten_state(flat, tensors)
    assert torch.equal(back["a"][1]["b"], torch.ones(2)) and back["c"] == "text"


def test_mismatched_pair_and_truncated_file_are_errors(tmp_path):
    save_checkpoint(tmp_path / "a", {"w": torch.zeros(1)}, {"epoch": 0}, {})
    save_checkpoint(tmp_path / "b", {"w": torch.zeros(1)}, {"epoch": 1}, {})
    (tmp_path / "a.json").write_text((tmp_path / "b.json").read_text())
    with pytest.raises(DistillError, match="different checkpoints"):
        load_checkpoint(tmp_path / "a")
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DistillError, match="b.safetensors"):
        load_checkpoint(tmp_path / "b")
