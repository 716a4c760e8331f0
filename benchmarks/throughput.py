"""Images/s of a full ``distill-train`` epoch (data loading included) against the lower bound.

Catches input-pipeline stalls: ``benchmarks/step_cost.py`` times steps on a batch already in
memory; this runs the real command line (``distill-train``: JPEG decoding, augmentation,
DataLoader workers, host-to-device copy, the Trainer's loop, meter, policy) for one epoch and
compares the epoch's ``images_per_sec`` (``summary.csv``: training images over the training
loop's wall time; evaluation and checkpointing are outside it) with the lower bound on the
same models and batch size (``step_cost.py``'s ``bound``: teachers' forward under
inference_mode + the student's forward / backward / optimiser step on one in-memory batch,
median step, in this process after the run).

Data: CIFAR-10 JPEGs from ``../shared/data/cifar10-jpg.tar.gz`` (``--per-class`` training and
20 test images per class extracted to a temporary folder), else scikit-learn's digits.
Teachers are randomly initialised (``pretrained: false`` without training), the student and
pool are ``step_cost.py``'s ``cpu-small`` setting by default.

    python benchmarks/throughput.py                         # aver, 2 CPU cores, < 5 min
    python benchmarks/throughput.py --policy mtkd_rl --workers 2 --per-class 128
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_cost  # noqa: E402

TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def extract(tarball: Path, dest: Path, train_per_class: int, test_per_class: int) -> None:
    """Write the first files (in archive order) of each ``split/class/`` to ``dest``; regular files only."""
    quota = {"train": train_per_class, "test": test_per_class}
    counts = {}
    with tarfile.open(tarball, mode="r|gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[0] not in quota or ".." in parts:
                continue
            key = parts[:2]
            if counts.get(key, 0) >= quota[parts[0]]:
                continue
            counts[key] = counts.get(key, 0) + 1
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="aver")
    p.add_argument("--setting", default="cpu-small", choices=sorted(step_cost.SETTINGS))
    p.add_argument("--per-class", type=int, default=64, help="training images per CIFAR-10 class")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=1, help="torch threads, in the run and for the bound")
    p.add_argument("--bound-steps", type=int, default=15)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setting = step_cost.SETTINGS[args.setting]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if TARBALL.is_file():
            extract(TARBALL, tmp / "cifar10", args.per_class, 20)
            data = {"dataset": "cifar10", "root": str(tmp / "cifar10"), "download": False}
            classes, source = 10, f"CIFAR-10 JPEG, {10 * args.per_class} training images"
        else:
            data = {"dataset": "digits"}
            classes, source = 10, "digits (CIFAR-10 JPEG tarball not found)"
        data.update(batch_size=setting["batch"], num_workers=args.workers, val_subset=200)
        recipe = {
            "name": "throughput", "seed": 0, "data": data,
            "student": {"model": setting["student"]},
            "teachers": [{"model": t, "pretrained": False} for t in setting["teachers"]],
            "distill": {"policy": args.policy, "features": "pre_logits"},
            "optim": {"name": "sgd", "lr": 0.01},
            "schedule": {"name": "constant", "epochs": 1},
            "run": {"device": args.device, "progress": False},
            "output_dir": str(tmp / "run"),
        }
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "distill.cli", "train", str(path)], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"distill-train failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        with open(tmp / "run" / "summary.csv") as handle:
            row = list(csv.DictReader(handle))[-1]
    train_ips = float(row["images_per_sec"])

    torch.set_num_threads(args.threads)
    bargs = step_cost.parse_args(["--setting", args.setting, "--classes", str(classes), "--device", args.device,
                                  "--variants", "bound"])
    steps, x, y = step_cost.build(bargs, ["bound"])
    times = []
    for i in range(3 + args.bound_steps):
        t0 = time.perf_counter()
        steps["bound"].run(x, y)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    bound_ips = setting["batch"] / statistics.median(times)
    print(f"machine: {step_cost.machine(torch.device(args.device))}; torch {torch.__version__}; {args.threads} "
          f"thread(s), {args.workers} DataLoader worker(s); load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print(f"setting {args.setting}: student {setting['student']}, teachers {', '.join(setting['teachers'])}, "
          f"batch {setting['batch']}; data {source}; policy {args.policy}; distill-train wall {wall:.0f} s\n")
    print("| measure | images/s | × lower bound time |")
    print("|---|---|---|")
    print(f"| lower bound (in-memory batch, median of {args.bound_steps} steps) | {bound_ips:.1f} | 1.000 |")
    print(f"| distill-train epoch ({args.policy}, data loading included) | {train_ips:.1f} | "
          f"{bound_ips / train_ips:.3f} |")


if __name__ == "__main__":
    main()
