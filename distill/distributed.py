"""Data-parallel training under ``torchrun``: the process group and rank helpers.

``torchrun --nproc-per-node N -m distill.cli train RECIPE`` sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``; :func:`init_from_env` turns them into a
process group (gloo on CPU, nccl on CUDA with device = local rank). Without them (or with
``WORLD_SIZE=1``) everything here is a no-op and training is single-process.

Decisions (see README "Multi-process training"):

- The recipe's ``data.batch_size`` is the *global* batch; each process takes
  ``batch_size / world_size`` (an error when not divisible).
- :class:`~distill.data.ShardedEpochSampler` (:mod:`distill.data.sampling`) cuts the
  epoch's (seed, epoch) permutation into global batches and gives rank ``r`` the ``r``-th
  slice of each, so every optimiser step sees
  exactly the images a single-process run with the same global batch sees (DDP averages
  the per-rank mean gradients = the global mean gradient).
- Evaluation is sharded (rank ``r`` takes images ``r, r + W, ...``, no padding) and the
  sums are all-reduced, so every rank gets the exact full-set metrics.
- Teachers are pre-trained on all ranks (with DDP, like the student); only rank 0 writes
  files and every rank waits at a barrier after each write before reading it back.
"""

from __future__ import annotations

import datetime
import os
from typing import List

import torch
import torch.distributed as dist

from .errors import DistillError


def env_world_size() -> int:
    """Return ``WORLD_SIZE`` from the environment (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_distributed() -> bool:
    """Return True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Return this process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Return the number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Return ``LOCAL_RANK`` (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    """Return True on the process that writes files and prints (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def init_from_env(device: str = "auto") -> bool:
    """Initialise the process group from torchrun's environment; return True if distributed.

    Backend: nccl when the run uses CUDA (``run.device`` auto / cuda and CUDA available),
    gloo otherwise. On CUDA the current device becomes ``cuda:LOCAL_RANK``.
    """
    if env_world_size() <= 1 or is_distributed():
        return is_distributed()
    if not dist.is_available():
        raise DistillError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank())
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistillError(f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} not set; launch with torchrun")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return True


def shutdown() -> None:
    """Destroy the process group if this module started one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensors: List[torch.Tensor]) -> None:
    """Sum each tensor in place across ranks (no-op when not distributed)."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t)


def local_batch_size(global_batch: int) -> int:
    """Return the per-process batch for the recipe's global ``data.batch_size``."""
    world = world_size()
    if global_batch % world:
        raise DistillError(f"data.batch_size: the global batch {global_batch} is not divisible by the "
                           f"{world} processes (WORLD_SIZE)")
    return global_batch // world
