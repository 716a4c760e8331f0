"""Per-step cost of each weighting policy against ``aver`` on the same models.

One training step = teachers + student forward, signals, policy weights, loss, backward,
optimiser step and ``policy.observe`` (what engine.Trainer does per batch). All variants are
built on identical models (same initialisation, same batch) and timed *interleaved*: each
round runs one step of every variant, in an order rotated every round, so drifts in machine
speed hit all variants alike. Reported: the median over ``--steps`` rounds after
``--warmup`` rounds. MTKD-RL variants run as in an epoch after the warm-up epoch (the agent
produces the weights); its end-of-epoch agent update (one optimiser step per recorded batch)
is timed separately, per recorded batch, and added to give the amortised per-step cost.

Memory (each variant alone in a fresh process, see :func:`memory_probe`): the peak memory of
the measured steps above what was resident after the warm-up steps (CUDA: allocator peak;
CPU: high-water RSS), and how much stayed resident (the episode buffer grows); also the host
bytes the MTKD-RL episode buffer takes per recorded batch.

    python benchmarks/policy_overhead.py                       # CPU, 3 teachers, CIFAR-100 shapes
    python benchmarks/policy_overhead.py --device cuda --batch 128 --features last_map
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import zoo  # noqa: E402,F401  (registers the zoo models)
from distill.distiller import Distiller  # noqa: E402
from distill.policies import build_policy  # noqa: E402
from distill.registry import DataSpec  # noqa: E402
from distill.taps import parse_feature_tap  # noqa: E402
from distill.teachers import InputAdapter, Teacher, TeacherPool  # noqa: E402

VARIANTS: Dict[str, Tuple[str, dict]] = {
    "aver": ("aver", {}),
    "ebkd": ("ebkd", {}),
    "camkd": ("camkd", {}),
    "mtkd_rl (paper)": ("mtkd_rl", {}),
    "mtkd_rl (paper, running norm, learnable γ)": ("mtkd_rl", {"state_norm": "running", "learnable_gammas": True}),
    "mtkd_rl (official)": ("mtkd_rl", {"variant": "official"}),
    "mixture (static)": ("mixture", {}),
    "mixture (over mtkd_rl)": ("mixture", {"over": "mtkd_rl"}),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="cifar_resnet8")
    p.add_argument("--teachers", nargs="+", default=["cifar_resnet20", "cifar_resnet32", "cifar_wrn_16_2"])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--features", default="pre_logits", help="pre_logits | last_map | <stage>")
    p.add_argument("--steps", type=int, default=30, help="measured rounds (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="subset of: " + ", ".join(VARIANTS))
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory probes")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: run one variant, print peak memory
    return p.parse_args(argv)


def build(args: argparse.Namespace, names: List[str]):
    """Return {variant: (distiller, optimizer)} on identical models, and one fixed batch."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = DataSpec((3, args.size, args.size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    tap = parse_feature_tap(args.features)
    teachers = []
    for i, name in enumerate(args.teachers):
        model = timm.create_model(name, num_classes=args.classes).to(device)
        teachers.append(Teacher(f"{i}:{name}", model, InputAdapter(spec, spec.mean, spec.std), tap, spec.input_size))
    pool = TeacherPool(teachers).to(device)
    student0 = timm.create_model(args.student, num_classes=args.classes).to(device)
    built = {}
    for variant in names:
        policy_name, policy_args = VARIANTS[variant]
        torch.manual_seed(1)  # identical projector init for every variant
        policy = build_policy(policy_name, len(pool), dict(policy_args))
        d = Distiller(copy.deepcopy(student0), pool, policy, tap, spec.input_size).to(device)
        d.trainable.train()
        policy.begin_epoch(1)  # after the warm-up epoch: MTKD-RL's agent drives the weights
        opt = torch.optim.SGD(d.trainable.parameters(), lr=0.01, momentum=0.9)
        built[variant] = (d, opt)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, *spec.input_size, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    return built, x, y


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(d: Distiller, opt: torch.optim.Optimizer, x, y) -> None:
    out = d(x, y)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    d.policy.observe(out.signals, out.weights, out.teachers, out.student, y)


def mtkd_policy(d: Distiller):
    p = d.policy
    return getattr(p, "inner", None) or p if p.name in ("mtkd_rl", "mixture") else None


def time_agent_update(d: Distiller, device: torch.device) -> Tuple[float, int, float]:
    """Return (ms per recorded batch, batches, host bytes per recorded batch) of the epoch-end update."""
    p = mtkd_policy(d)
    if p is None or not hasattr(p, "episodes") or not p.episodes:
        return float("nan"), 0, float("nan")
    n = len(p.episodes)
    nbytes = sum(t.numel() * t.element_size() for e in p.episodes for t in e.values() if isinstance(t, torch.Tensor))
    sync(device)
    start = time.perf_counter()
    d.policy.end_epoch(1)
    sync(device)
    return 1000 * (time.perf_counter() - start) / n, n, nbytes / n


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_probe(args: argparse.Namespace) -> None:
    """Run one variant alone; print the peak memory of its steps above what was resident before.

    CUDA: ``max_memory_allocated`` after a reset. CPU (Linux): the process's high-water RSS is
    reset through ``/proc/self/clear_refs`` after the warm-up steps, and glibc is started with
    ``MALLOC_MMAP_THRESHOLD_=65536`` (set by the parent) so freed tensors leave the RSS at
    once; the peak is ``VmHWM`` minus the ``VmRSS`` before the measured steps.
    """
    device = torch.device(args.device)
    built, x, y = build(args, [args.memory_probe])
    d, opt = built[args.memory_probe]
    for _ in range(args.warmup):
        train_step(d, opt, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _proc_status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    for _ in range(args.steps):
        train_step(d, opt, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak, after = torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.memory_allocated(device) / 2**20
        base /= 2**20
    else:
        peak, after = _proc_status_mib("VmHWM"), _proc_status_mib("VmRSS")
    print(json.dumps({"peak_mb": peak - base, "grown_mb": after - base}))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.memory_probe:
        memory_probe(args)
        return
    device = torch.device(args.device)
    names = list(args.variants)
    if "aver" not in names:
        names.insert(0, "aver")
    built, x, y = build(args, names)
    times: Dict[str, List[float]] = {v: [] for v in names}
    for r in range(args.warmup + args.steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for variant in order:
            d, opt = built[variant]
            sync(device)
            start = time.perf_counter()
            train_step(d, opt, x, y)
            sync(device)
            if r >= args.warmup:
                times[variant].append(1000 * (time.perf_counter() - start))
    updates = {v: time_agent_update(built[v][0], device) for v in names}

    memory: Dict[str, Dict[str, float]] = {}
    if not args.no_memory:
        for variant in names:
            cmd = [sys.executable, __file__, "--memory-probe", variant, "--student", args.student, "--teachers",
                   *args.teachers, "--classes", str(args.classes), "--size", str(args.size), "--batch", str(args.batch),
                   "--features", args.features, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--device", args.device, "--threads", str(args.threads)]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            memory[variant] = json.loads(out.strip().splitlines()[-1])

    base = statistics.median(times["aver"])
    print(f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}; student {args.student}, "
          f"teachers {', '.join(args.teachers)}; C={args.classes}, batch {args.batch}, {args.size}x{args.size}, "
          f"features {args.features}; median of {args.steps} interleaved steps after {args.warmup} warm-up\n")
    head = ["policy", "step ms: median [p25, p75]", "vs aver", "agent update ms / recorded batch",
            "amortised step ms", "vs aver", "buffer KiB / batch"]
    if memory:
        head += ["peak MiB above resident", "Δ vs aver", f"resident growth over {args.steps} steps MiB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for variant in names:
        med = statistics.median(times[variant])
        q1, _, q3 = statistics.quantiles(times[variant], n=4)
        upd, _, nbytes = updates[variant]
        amort = med + (upd if upd == upd else 0.0)
        row = [variant, f"{med:.1f} [{q1:.1f}, {q3:.1f}]", f"{100 * (med / base - 1):+.1f}%", "–" if upd != upd else f"{upd:.2f}",
               f"{amort:.1f}", f"{100 * (amort / base - 1):+.1f}%", "–" if nbytes != nbytes else f"{nbytes / 1024:.0f}"]
        if memory:
            peak, grown = memory[variant]["peak_mb"], memory[variant]["grown_mb"]
            row += [f"{peak:.1f}", f"{peak - memory['aver']['peak_mb']:+.1f}", f"{grown:.1f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
