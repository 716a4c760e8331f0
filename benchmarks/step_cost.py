"""Per-step cost of multi-teacher distillation against its lower bound (time and memory).

Variants, all built on the same models (same teacher weights, same student initialisation,
same projector initialisation, same batch) and timed *interleaved* in one process: each
round runs one step of every variant, in an order rotated every round, so drifts in machine
speed hit all variants alike. Reported: the median over ``--steps`` rounds after
``--warmup`` rounds.

``bound`` (the lower bound, the issue's definition), plain PyTorch written here:
    every teacher's ``model(x)`` under ``torch.inference_mode()``, then the student's
    forward, cross-entropy, backward and optimiser step. Nothing else.
``bound+kd`` (informative): ``bound`` plus the loss of Equ.(2) with equal weights written
    inline, vectorised: teacher logits stacked ``(M, B, C)``, Hinton KD over all teachers in
    one call, one linear projector per teacher and FitNet MSE on the pre-logit features
    (the teachers' forward then returns features too: ``forward_features`` +
    ``forward_head``, the same FLOPs as ``model(x)``).
``aver``, ``camkd``, ``mtkd_rl``, ``mixture`` (and any extra ``--variants``): the step
    ``engine.Trainer`` runs, built by the trainer's builder (``distill.build.build_train_step``,
    SGD with momentum 0.9 as the bound, fp32) and run by the same call, ``step(x, y)``
    (``distill.step.TrainStep``: forward, backward, optimiser step, ``policy.observe``),
    followed by the Trainer's per-step meter update (``EpochMeter.update``). MTKD-RL runs as after its warm-up epoch
    (the agent produces the weights and every step is recorded); its end-of-epoch agent update
    (one agent optimiser step per recorded batch) is timed after the rounds and reported per
    recorded batch, i.e. amortised per step, in its own column.

Memory, two measures (``--no-memory`` skips the second):

``saved MiB``: bytes of the distinct tensor storages autograd saves for backward during one
    step (``distill.step.saved_activation_bytes``; parameters excluded, they are resident
    anyway). Deterministic, device-independent: the activation memory a step holds at its peak.
``peak MiB``: each variant alone in a fresh process, above what was resident before the
    measured steps (``benchmarks/peak_memory.py``: CUDA allocator peak, CPU high-water RSS).
    This includes workspace and transient buffers that ``saved MiB`` does not see, and
    allocator noise of ~1 MiB.
The MTKD-RL episode buffer also grows by a fixed number of host bytes per recorded batch
until the epoch-end update empties it (``buffer KiB/step``).

Settings: ``--setting table1`` is the CIFAR-100 Table 1 setting (student
``cifar_shufflenetv2``, pool ``cifar100_cnn4`` randomly initialised, batch 64, 32 px);
``--setting cpu-small`` is ``cifar_resnet8`` with three small zoo teachers. The default is
``table1`` on CUDA and ``cpu-small`` on CPU (one Table 1 step takes 3-17 s on 2 CPU cores depending on load, so
20+ interleaved rounds of 6 variants do not fit in minutes).

    python benchmarks/step_cost.py                                  # CPU: cpu-small, < 5 min
    python benchmarks/step_cost.py --setting table1 --steps 20      # the Table 1 setting
    python benchmarks/step_cost.py --device cuda                    # GPU: table1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402

import zoo  # noqa: E402,F401  (registers the zoo models)
import lower_bound  # noqa: E402  (benchmarks/lower_bound.py)
import peak_memory  # noqa: E402  (benchmarks/peak_memory.py)
from zoo.pools import get_pool  # noqa: E402
from distill.build import build_train_step  # noqa: E402
from distill.engine import EpochMeter  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.recipe import DistillConfig, OptimConfig, RunConfig  # noqa: E402
from distill.resolve import DataSpec  # noqa: E402
from distill.step import TrainStep, saved_activation_bytes  # noqa: E402
from distill.taps import parse_feature_tap  # noqa: E402
from distill.teachers import InputAdapter, Teacher  # noqa: E402

SETTINGS = {
    "table1": dict(student="cifar_shufflenetv2", teachers=list(get_pool("cifar100_cnn4").teachers), classes=100,
                   size=32, batch=64),
    "cpu-small": dict(student="cifar_resnet8", teachers=["cifar_resnet14", "cifar_resnet20", "cifar_wrn_16_1"],
                      classes=100, size=32, batch=64),
}
POLICY_VARIANTS: Dict[str, Tuple[str, dict]] = {
    "aver": ("aver", {}),
    "camkd": ("camkd", {}),
    "mtkd_rl": ("mtkd_rl", {}),
    "mixture": ("mixture", {}),
    "ebkd": ("ebkd", {}),
    "mtkd_rl-align-mix": ("mtkd_rl", {"reward": "align", "fusion": "mix"}),  # the default until 2026-12-05
    "mtkd_rl-align-refine": ("mtkd_rl", {"reward": "align", "fusion": "refine", "prior": "confidence"}),
    "mtkd_rl-heldout-mix": ("mtkd_rl", {"reward": "heldout", "fusion": "mix"}),
    "mtkd_rl-confidence": ("mtkd_rl", {"prior": "confidence"}),  # the default until 2026-12-05 (prior c)
    "mtkd_rl-official": ("mtkd_rl", {"variant": "official"}),
    "mtkd_rl-running-learnable": ("mtkd_rl", {"state_norm": "running", "learnable_gammas": True, "fusion": "mix"}),
    "mixture-over-mtkd_rl": ("mixture", {"over": "mtkd_rl"}),
}
BOUNDS = ("bound", "bound+kd")
DEFAULT_VARIANTS = ["bound", "bound+kd", "aver", "camkd", "mtkd_rl", "mixture"]
ALPHA, BETA, T = 1.0, 5.0, 4.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), help="default: table1 on CUDA, cpu-small on CPU")
    p.add_argument("--student")
    p.add_argument("--teachers", nargs="+")
    p.add_argument("--classes", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=20, help="measured rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least sensitive to other load)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="subset of: " + ", ".join([*BOUNDS, *POLICY_VARIANTS]))
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory processes")
    p.add_argument("--memory-steps", type=int, default=3, help="measured steps in each memory process")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--breakdown", action="store_true",
                   help="also print the CPU ms of signals / policy / observe / meter per step, models excluded")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one variant, print its peak memory
    args = p.parse_args(argv)
    setting = args.setting or ("table1" if args.device.startswith("cuda") else "cpu-small")
    args.setting = setting
    for key, value in SETTINGS[setting].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [v for v in args.variants if v not in BOUNDS and v not in POLICY_VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}")
    for needed in ("bound", "aver"):
        if needed not in args.variants:
            args.variants.insert(0, needed)
    return args


# ----------------------------------------------------------------------------- the variants


class Step:
    """One variant: ``run(x, y)`` is one full training step."""

    def __init__(self, name: str, run: Callable, module: nn.Module, optimizer, train: TrainStep = None,
                 meter: EpochMeter = None):
        self.name, self.run, self.module, self.optimizer = name, run, module, optimizer
        self.train, self.meter = train, meter  # the toolkit's TrainStep and the trainer's meter (policy variants)


def build(args: argparse.Namespace, names: List[str]):
    """Return ({variant: Step}, x, y), every variant on identical models."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = DataSpec((3, args.size, args.size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    tap = parse_feature_tap("pre_logits")
    models = [timm.create_model(n, num_classes=args.classes).to(device).eval().requires_grad_(False)
              for n in args.teachers]
    student0 = timm.create_model(args.student, num_classes=args.classes).to(device)
    teachers = None
    steps: Dict[str, Step] = {}
    for name in names:
        torch.manual_seed(1)  # identical projector init everywhere
        student = copy.deepcopy(student0).train()
        if name == "bound":
            opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
            steps[name] = Step(name, lower_bound.bound_step(models, student, opt, device), student, opt)
        elif name == "bound+kd":
            d_s = student.num_features
            projectors = nn.ModuleList(nn.Linear(d_s, m.num_features) for m in models).to(device)
            module = nn.ModuleDict({"student": student, "projectors": projectors})
            opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
            steps[name] = Step(name, _bound_kd_step(models, student, projectors, opt), module, opt)
        else:
            if teachers is None:
                teachers = [Teacher(f"{i}:{n}", m, InputAdapter(spec, spec.mean, spec.std), tap, spec.input_size)
                            for i, (n, m) in enumerate(zip(args.teachers, models))]
            policy_name, policy_args = POLICY_VARIANTS[name]
            train = build_train_step(student, teachers, tap, spec.input_size,
                                     DistillConfig(alpha=ALPHA, beta=BETA, temperature=T, policy=policy_name,
                                                   policy_args=dict(policy_args)),
                                     OptimConfig(name="sgd", lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0),
                                     RunConfig(device=str(device), precision="fp32"), device, wrap_ddp=False)
            train.trainable.train()
            train.task.policy.begin_epoch(1)  # after the warm-up epoch: MTKD-RL's agent drives the weights
            meter = EpochMeter(device, len(train.task.pool))
            steps[name] = Step(name, _trainer_batch(train, meter), train.trainable, train.optimizer, train, meter)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, *spec.input_size, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    return steps, x, y


def _bound_kd_step(models, student, projectors, opt):
    def run(x, y):
        with torch.inference_mode():
            t_feats = [m.forward_head(m.forward_features(x), pre_logits=True) for m in models]
            t_logits = torch.stack([m.get_classifier()(f) for m, f in zip(models, t_feats)])  # (M, B, C)
        t_logits = t_logits.clone()
        t_feats = [f.clone() for f in t_feats]
        feat = student.forward_head(student.forward_features(x), pre_logits=True)
        logits = student.get_classifier()(feat)
        ce = F.cross_entropy(logits, y)
        log_p_s = F.log_softmax(logits / T, dim=-1)
        log_p_t = F.log_softmax(t_logits / T, dim=-1)
        kd = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * T * T  # mean over (M, B)
        fit = sum((p(feat) - f).pow(2).mean() for p, f in zip(projectors, t_feats)) / len(models)
        loss = ce + ALPHA * kd + BETA * fit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def _trainer_batch(train: TrainStep, meter: EpochMeter):
    def run(x, y):
        meter.update(train(x, y), y)  # what the Trainer does per batch
    return run


# ----------------------------------------------------------------------------- measures


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(step: Step, x, y) -> int:
    """Return the bytes of distinct non-parameter storages autograd saves during one step."""
    return saved_activation_bytes(lambda: step.run(x, y), step.module.parameters())[1]


def agent_update_ms(step: Step, device: torch.device) -> Tuple[float, float, float]:
    """Return (epoch-end agent update wall ms and CPU ms per recorded batch, buffer host bytes per recorded batch)."""
    nan = float("nan")
    if step.train is None:
        return nan, nan, nan
    p = step.train.task.policy
    p = getattr(p, "inner", None) or p
    if not hasattr(p, "buffer") or not p.buffer.entries:
        return nan, nan, nan
    n = len(p.buffer.entries)
    nbytes = sum(t.numel() * t.element_size() for e in p.buffer.entries for t in e.values() if isinstance(t, torch.Tensor))
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        step.train.task.policy.end_epoch(1)
    except DistillError:  # the paper objective diverges when replaying one batch; the time is what counts
        pass
    sync(device)
    return 1000 * (time.perf_counter() - start) / n, 1000 * (time.process_time() - cpu) / n, nbytes / n


def breakdown(steps: Dict[str, Step], x, y, reps: int = 50) -> None:
    """Print the CPU ms per step of the toolkit's own work outside the models' forward passes,
    timed inside ``reps`` real steps: the task's loss head, the policy's observe and the meter
    update get CPU-timing wrappers on their instances, removed afterwards."""
    print(f"\ntoolkit work per step outside the models (CPU ms, mean of {reps} real steps; forward only: "
          "the loss head's backward is in the step times):\n")
    print("| variant | signals + weights + loss | policy.observe | meter.update |\n|---|---|---|---|")
    for name, step in [(n, s) for n, s in steps.items() if s.train is not None]:
        spent: Dict[str, float] = {}
        owners = [(step.train.task, "loss_head"), (step.train.task.policy, "observe"), (step.meter, "update")]
        for owner, attr in owners:
            def timed(*args, _original=getattr(owner, attr), _key=attr, **kwargs):
                start = time.process_time()
                try:
                    return _original(*args, **kwargs)
                finally:
                    spent[_key] = spent.get(_key, 0.0) + time.process_time() - start
            setattr(owner, attr, timed)
        try:
            step.run(x, y)  # warm
            spent.clear()
            for _ in range(reps):
                step.run(x, y)
        finally:
            for owner, attr in owners:
                delattr(owner, attr)  # the class's method again
        ms = [1000 * spent.get(attr, 0.0) / reps for _, attr in owners]
        print(f"| {name} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} |")


def memory_probe(args: argparse.Namespace) -> None:
    """Run one variant alone; print the peak memory of its steps above what was resident before."""
    steps, x, y = build(args, [args.memory_probe])
    step = steps[args.memory_probe]
    peak_memory.report(peak_memory.peak_mib(lambda: step.run(x, y), args.warmup, args.memory_steps,
                                            torch.device(args.device)))


def probe_memory(args: argparse.Namespace, variant: str) -> float:
    return peak_memory.run_probe([
        sys.executable, __file__, "--memory-probe", variant, "--setting", args.setting, "--student", args.student,
        "--teachers", *args.teachers, "--classes", str(args.classes), "--size", str(args.size),
        "--batch", str(args.batch), "--warmup", str(args.warmup), "--memory-steps", str(args.memory_steps),
        "--device", args.device, "--threads", str(args.threads)])


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return
    device = torch.device(args.device)
    names = list(dict.fromkeys(args.variants))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    steps, x, y = build(args, names)
    wall: Dict[str, List[float]] = {v: [] for v in names}
    cpu: Dict[str, List[float]] = {v: [] for v in names}
    for r in range(args.warmup + args.steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name].run(x, y)
            sync(device)
            if r >= args.warmup:
                wall[name].append(1000 * (time.perf_counter() - t0))
                cpu[name].append(1000 * (time.process_time() - c0))
    saved = {v: saved_bytes(steps[v], x, y) / 2**20 for v in names}
    updates = {v: agent_update_ms(steps[v], device) for v in names}
    load_mid = os.getloadavg()[0]
    peak = {v: probe_memory(args, v) for v in names} if not args.no_memory else {}
    load_after = os.getloadavg()[0]

    def stats(series):
        med = {v: statistics.median(series[v]) for v in names}
        quart = {v: statistics.quantiles(series[v], n=4) for v in names}
        return med, quart

    mw, qw = stats(wall)
    mc, qc = stats(cpu)
    nan = float("nan")
    add = lambda a, b: a + (b if b == b else 0.0)  # noqa: E731
    amort_w = {v: add(mw[v], updates[v][0]) for v in names}
    amort_c = {v: add(mc[v], updates[v][1]) for v in names}
    print(f"machine: {machine(device)}; device {device}, {torch.get_num_threads()} torch thread(s); torch "
          f"{torch.__version__}, timm {timm.__version__}; load average (1 min) {load_before:.2f} before, "
          f"{load_mid:.2f} after the timed rounds, {load_after:.2f} at the end; {time.perf_counter() - started:.0f} s")
    print(f"setting {args.setting}: student {args.student}; teachers {', '.join(args.teachers)}; C={args.classes}, "
          f"batch {args.batch}, {args.size}x{args.size}, pre_logits features; median of {args.steps} interleaved "
          f"steps after {args.warmup} warm-up; wall = perf_counter, CPU = process CPU time\n")
    head = ["variant", "wall ms [p25, p75]", "× bound", "CPU ms [p25, p75]", "× bound", "× bound+kd",
            "agent update CPU ms/step", "amortised × bound (wall / CPU)", "saved MiB", "× bound"]
    if peak:
        head += ["peak MiB", "× bound"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = {}
    for v in names:
        upd_w, upd_c, nbytes = updates[v]
        row = [v, f"{mw[v]:.1f} [{qw[v][0]:.1f}, {qw[v][2]:.1f}]", f"{mw[v] / mw['bound']:.3f}",
               f"{mc[v]:.1f} [{qc[v][0]:.1f}, {qc[v][2]:.1f}]", f"{mc[v] / mc['bound']:.3f}",
               f"{mc[v] / mc['bound+kd']:.3f}" if "bound+kd" in mc else "–",
               "–" if upd_c != upd_c else f"{upd_c:.2f}",
               f"{amort_w[v] / mw['bound']:.3f} / {amort_c[v] / mc['bound']:.3f}",
               f"{saved[v]:.2f}", f"{saved[v] / saved['bound']:.3f}"]
        if peak:
            row += [f"{peak[v]:.1f}", f"{peak[v] / peak['bound']:.3f}"]
        print("| " + " | ".join(row) + " |")
        rows[v] = {"wall_median_ms": mw[v], "cpu_median_ms": mc[v], "agent_update_wall_ms_per_step": upd_w,
                   "agent_update_cpu_ms_per_step": upd_c, "saved_mib": saved[v], "peak_mib": peak.get(v, nan),
                   "buffer_bytes_per_step": nbytes, "wall_ms": wall[v], "cpu_ms": cpu[v]}
    print()
    for v in [n for n in names if n.startswith("mtkd_rl")]:
        pk = f", peak {peak[v] / peak['aver']:.3f}×" if peak else ""
        print(f"{v} / aver: time {mw[v] / mw['aver']:.3f}× wall, {mc[v] / mc['aver']:.3f}× CPU (amortised with the "
              f"agent update {amort_w[v] / mw['aver']:.3f}× / {amort_c[v] / mc['aver']:.3f}×); saved memory "
              f"{saved[v] / saved['aver']:.3f}×{pk}; episode buffer {updates[v][2] / 1024:.1f} KiB per recorded "
              "step (host, freed at the epoch-end update)")
    if args.breakdown:
        breakdown(steps, x, y)
    if args.json:
        Path(args.json).write_text(json.dumps({"setting": args.setting, "args": vars(args), "torch": torch.__version__,
                                               "machine": machine(device), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
