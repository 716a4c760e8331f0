"""GPU throughput of the real training step: images/s, peak memory and model FLOP utilisation.

For (a) ``recipes/deit_tiny.yaml``'s models (DeiT-Tiny student; CaiT-S24, DeiT-S, DeiT-B
teachers) and (b) ``recipes/resnet18.yaml``'s (ResNet-18; ``imagenet_cnn4``), all at random
init on a synthetic 224-px batch, with each recipe's features, loss and policy, this times

- the ``TrainStep`` (built by ``distill.build.build_train_step``, the trainer's step)
  under fp32 / bf16 / bf16 + compile / bf16 + compile + channels_last (channels-last for
  the CNN setting only: ViTs have no 4-D activations past the patch embedding), and
- the plain-PyTorch lower bound of the same step in the same precision and compile mode:
  every teacher's ``model(x)`` under ``torch.inference_mode()``, the student's forward,
  cross-entropy, backward and the optimiser step. Nothing else.

Reported per row: median images/s over ``--steps`` timed steps after ``--warmup`` (compile
happens in the warm-up), the step's time over the bound's, peak memory
(``torch.cuda.max_memory_allocated`` over the timed steps; not measured on CPU) and MFU:
the step's FLOPs (``torch.utils.flop_counter.FlopCounterMode`` over one eager step: teachers'
forward, student forward + backward) per second over the chip's dense bf16 peak (H100 /
H200: 989 TFLOP/s; ``--peak-tflops`` for others).

    python benchmarks/gpu.py                       # CUDA: both settings, all rows (< 8 min on one H100 / H200)
    python benchmarks/gpu.py --cpu-tiny            # CPU, tiny models: checks the script itself in seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import timm  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # noqa: E402
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD  # noqa: E402

import zoo  # noqa: E402,F401  (registers the zoo models)
import lower_bound  # noqa: E402  (benchmarks/lower_bound.py)
from distill.build import build_train_step  # noqa: E402
from distill.runtime import PRECISIONS  # noqa: E402
from distill.pipeline import make_teacher  # noqa: E402
from distill.recipe import DistillConfig, OptimConfig, RunConfig, TeacherConfig  # noqa: E402
from distill.recipe_load import load_recipe, teacher_configs  # noqa: E402
from distill.resolve import DataSpec, ResolvedModel  # noqa: E402
from distill.taps import parse_feature_tap  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, per chip
# rows: name -> (precision, compile, channels_last)
ROWS: Dict[str, Tuple[str, bool, bool]] = {
    "fp32": ("fp32", False, False),
    "bf16": ("bf16", False, False),
    "bf16+compile": ("bf16", True, False),
    "bf16+compile+channels_last": ("bf16", True, True),
}


@dataclasses.dataclass
class Setting:
    """Models and loss of one benchmark setting."""

    name: str
    student: str
    student_args: Dict
    teachers: List[str]
    teacher_args: Dict
    data: DataSpec
    classes: int
    distill: DistillConfig
    optim: OptimConfig
    cnn: bool  # channels-last applies


def recipe_setting(name: str, path: str) -> Setting:
    """Return the setting of a recipe's student, teachers, features, loss and optimiser (random init)."""
    recipe = load_recipe(ROOT / path, check_data=False)
    size = recipe.data.input_size or 224
    data = DataSpec((3, size, size), IMAGENET_MEAN, IMAGENET_STD)
    return Setting(name, recipe.student.model, dict(recipe.student.model_args),
                   [t.model for t in teacher_configs(recipe)], {}, data, recipe.data.num_classes or 1000,
                   recipe.distill, recipe.optim, cnn="resnet" in recipe.student.model)


def tiny_settings() -> List[Setting]:
    """Return CPU-sized settings with the same structure (a ViT pool and a CNN pool)."""
    vit = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    data = DataSpec((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return [
        Setting("vit-tiny", "vit_tiny_patch16_224", vit, ["vit_tiny_patch16_224", "vit_tiny_patch16_224"], vit, data, 10,
                DistillConfig(features="last_map", policy="mtkd_rl"), OptimConfig(name="adamw", lr=1e-3), False),
        Setting("cnn-tiny", "cifar_resnet8", {}, ["cifar_resnet14", "cifar_wrn_16_1"], {}, data, 10,
                DistillConfig(features="last_map", policy="mtkd_rl"), OptimConfig(name="sgd", lr=0.1), True),
    ]


def build_models(setting: Setting):
    """Return (student, teacher models) at random init, seeded (the same in every row)."""
    torch.manual_seed(0)
    teachers = [timm.create_model(t, pretrained=False, num_classes=setting.classes, **setting.teacher_args)
                .eval().requires_grad_(False) for t in setting.teachers]
    student = timm.create_model(setting.student, pretrained=False, num_classes=setting.classes,
                                **setting.student_args)
    return student, teachers


def real_step(setting: Setting, row: str, device: torch.device) -> Callable:
    """Return the ``TrainStep`` (the trainer's step, its builder) in ``row``'s settings."""
    precision, compile_, channels_last = ROWS[row]
    student, models = build_models(setting)
    tap = parse_feature_tap(setting.distill.features)
    teachers = [make_teacher(f"{i}:{n}", TeacherConfig(model=n), ResolvedModel(m, n, None), setting.data, tap)
                for i, (n, m) in enumerate(zip(setting.teachers, models))]
    run = RunConfig(device=str(device), precision=precision, compile=compile_, channels_last=channels_last)
    step = build_train_step(student, teachers, tap, setting.data.input_size, setting.distill, setting.optim, run,
                            device, wrap_ddp=False)
    step.trainable.train()
    if step.task.policy is not None:
        step.task.policy.begin_epoch(1)  # past any warm-up epoch: the policy's full step
    return step


def bound_step(setting: Setting, row: str, device: torch.device) -> Callable:
    """Return the plain-PyTorch lower bound of the step for ``row`` (same precision / compile / layout)."""
    precision, compile_, channels_last = ROWS[row]
    student, models = build_models(setting)
    student.to(device).train()
    models = [m.to(device) for m in models]
    if channels_last:
        student.to(memory_format=torch.channels_last)
        models = [m.to(memory_format=torch.channels_last) for m in models]
    if compile_:
        student.compile()
        for m in models:
            m.compile()
    opt = (torch.optim.AdamW(student.parameters(), lr=setting.optim.lr) if setting.optim.name == "adamw"
           else torch.optim.SGD(student.parameters(), lr=setting.optim.lr, momentum=0.9))
    return lower_bound.bound_step(models, student, opt, device, PRECISIONS[precision], channels_last)


def step_flops(setting: Setting, device: torch.device, x, y) -> int:
    """Return the FLOPs of one eager fp32 ``train_step`` (FlopCounterMode: teachers' forward,
    student forward + backward; the optimiser's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    step = real_step(setting, "fp32", device)
    step(x, y)
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = GlobalOnly()  # totals only: its module tracker's hooks refuse a reward's autograd.grad
    with counter:
        step(x, y)
    return counter.get_total_flops()


class GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: every op counts towards 'Global' only.
    The tracker's backward hooks raise inside ``torch.autograd.grad`` calls, which a policy's
    reward makes in the step (MTKD-RL's per-sample alignment), and only the total is read here."""

    parents = {"Global"}

    def __enter__(self) -> "GlobalOnly":
        return self

    def __exit__(self, *exc) -> None:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable, x, y, device: torch.device, warmup: int, steps: int) -> Tuple[float, float]:
    """Return (median seconds per step, peak MiB over the timed steps; nan on CPU)."""
    for _ in range(warmup):
        step(x, y)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x, y)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def chip_peak(device: torch.device, override: Optional[float]) -> Optional[float]:
    """Return the chip's dense bf16 peak in FLOP/s, or None when unknown."""
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-tiny", action="store_true", help="CPU, tiny models: check the script in seconds")
    p.add_argument("--batch", type=int, help="per-step batch (default 256; --cpu-tiny 8)")
    p.add_argument("--steps", type=int, help="timed steps (default 10; --cpu-tiny 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first, compile included (default 3; --cpu-tiny 1)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--settings", nargs="+", help="subset of the setting names")
    p.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak (default: known chips)")
    args = p.parse_args(argv)
    tiny = args.cpu_tiny
    args.batch = args.batch or (8 if tiny else 256)
    args.steps = args.steps or (2 if tiny else 10)
    args.warmup = args.warmup or (1 if tiny else 3)
    return args


def main(argv=None) -> List[Dict]:
    """Run the benchmark; print the table and return its rows."""
    args = parse_args(argv)
    if args.cpu_tiny:
        device = torch.device("cpu")
        settings = tiny_settings()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/gpu.py: no CUDA device; use --cpu-tiny to check the script on CPU")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are fp32
        settings = [recipe_setting("deit_tiny", "recipes/deit_tiny.yaml"),
                    recipe_setting("resnet18", "recipes/resnet18.yaml")]
    if args.settings:
        settings = [s for s in settings if s.name in args.settings]
    peak = chip_peak(device, args.peak_tflops)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}, timm {timm.__version__}; batch {args.batch}, median of "
          f"{args.steps} steps after {args.warmup} warm-up; bf16 peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s\n")
    print("| setting | row | step img/s | bound img/s | step / bound time | step peak MiB | bound peak MiB | "
          "GFLOP/step | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for setting in settings:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, *setting.data.input_size, generator=g).to(device)
        y = torch.randint(0, setting.classes, (args.batch,), generator=g).to(device)
        flops = step_flops(setting, device, x, y)
        for row in args.rows:
            if ROWS[row][2] and not setting.cnn:
                continue  # channels-last: CNNs only
            t_step, m_step = time_step(real_step(setting, row, device), x, y, device, args.warmup, args.steps)
            t_bound, m_bound = time_step(bound_step(setting, row, device), x, y, device, args.warmup, args.steps)
            mfu = flops / t_step / peak if peak else float("nan")
            r = {"setting": setting.name, "row": row, "step_img_s": args.batch / t_step,
                 "bound_img_s": args.batch / t_bound, "ratio": t_step / t_bound, "step_peak_mib": m_step,
                 "bound_peak_mib": m_bound, "gflop": flops / 1e9, "mfu": mfu}
            results.append(r)
            print(f"| {setting.name} | {row} | {r['step_img_s']:.1f} | {r['bound_img_s']:.1f} | {r['ratio']:.3f} | "
                  f"{m_step:.0f} | {m_bound:.0f} | {r['gflop']:.3g} | "
                  + ("–" if mfu != mfu else f"{100 * mfu:.1f}%") + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
