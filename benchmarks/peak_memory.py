"""Peak memory of a few steps above what was resident before them (one variant per process).

CUDA: ``torch.cuda.max_memory_allocated``. CPU (Linux): high-water RSS (``VmHWM``, reset
through ``/proc/self/clear_refs``) minus the RSS before the steps; the process should start
with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` (:func:`run_probe` sets it) so freed tensors
leave the RSS at once.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Callable, List

import torch


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_mib(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Return the peak MiB of ``steps`` calls of ``step`` (after ``warmup`` calls) above the resident memory."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = _status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20 - base
    return _status_mib("VmHWM") - base


def report(peak: float) -> None:
    """Print a probe's result (the last line of its output) for :func:`run_probe`."""
    print(json.dumps({"peak_mib": peak}))


def run_probe(cmd: List[str]) -> float:
    """Run a probe command in a fresh process (glibc returning freed memory at once); return its peak MiB."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]
