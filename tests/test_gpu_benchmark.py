"""benchmarks/gpu.py runs (CPU, tiny models): the real train_step against its lower bound, FLOPs counted."""

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu  # noqa: E402

torch.set_num_threads(1)


def test_cpu_tiny_table(capsys):
    rows = gpu.main(["--cpu-tiny", "--rows", "fp32", "--settings", "cnn-tiny", "--batch", "4", "--steps", "1",
                     "--warmup", "1"])
    out = capsys.readouterr().out
    assert "| cnn-tiny | fp32 |" in out and "GFLOP/step" in out
    (row,) = rows
    assert row["step_img_s"] > 0 and row["bound_img_s"] > 0 and row["ratio"] > 0.5

    setting = gpu.tiny_settings()[1]
    student, teachers = gpu.build_models(setting)
    x = torch.randn(4, *setting.data.input_size)
    with FlopCounterMode(display=False) as forward:
        student(x)
        for t in teachers:
            t(x)
    student_only = FlopCounterMode(display=False)
    with student_only:
        student(x)
    # the step: every teacher's forward + the student's forward and backward (~2x forward)
    assert row["gflop"] * 1e9 >= forward.get_total_flops() + 1.5 * student_only.get_total_flops()
