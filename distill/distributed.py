"""Data-parallel training under ``torchrun``: process group, rank helpers, sharded samplers.

``torchrun --nproc-per-node N -m distill.cli train RECIPE`` sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``; :func:`init_from_env` turns them into a
process group (gloo on CPU, nccl on CUDA with device = local rank). Without them (or with
``WORLD_SIZE=1``) everything here is a no-op and training is single-process.

Decisions (see README "Multi-process training"):

- The recipe's ``data.batch_size`` is the *global* batch; each process takes
  ``batch_size / world_size`` (an error when not divisible).
- :class:`ShardedEpochSampler` cuts the epoch's (seed, epoch) permutation into global
  batches and gives rank ``r`` the ``r``-th slice of each, so every optimiser step sees
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
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

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


class ShardedEpochSampler(Sampler[int]):
    """Rank ``rank``'s share of an :class:`~distill.data.EpochSampler` order, batch-aligned.

    The epoch's order is ``EpochSampler(n, shuffle, seed)`` at ``set_epoch(epoch)``; it is cut
    into global batches of ``global_batch`` (a trailing partial batch is dropped, as the
    single-process loader drops it) and rank ``r`` yields items
    ``[r * b, (r + 1) * b)`` of each, with ``b = global_batch / num_replicas``. Loaded with
    batch size ``b``, step ``k`` of every rank together covers exactly global batch ``k``.
    """

    def __init__(self, n: int, global_batch: int, num_replicas: int, rank: int, shuffle: bool = True,
                 seed: int = 0):
        from .data import EpochSampler

        if global_batch % num_replicas:
            raise DistillError(f"data.batch_size: {global_batch} is not divisible by {num_replicas} processes")
        if n < global_batch:
            raise DistillError(f"data.batch_size: the training set ({n} images) is smaller than one global "
                               f"batch ({global_batch}) in a {num_replicas}-process run")
        self.inner = EpochSampler(n, shuffle, seed)
        self.global_batch, self.num_replicas, self.rank = global_batch, num_replicas, rank
        self.local = global_batch // num_replicas

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (same on every rank)."""
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        order = list(self.inner)
        for start in range(0, len(order) - self.global_batch + 1, self.global_batch):
            lo = start + self.rank * self.local
            yield from order[lo:lo + self.local]

    def __len__(self) -> int:
        return (self.inner.n // self.global_batch) * self.local


class ShardSampler(Sampler[int]):
    """Items ``rank, rank + W, rank + 2W, ...`` of ``0 .. n-1`` in order (sharded evaluation, no padding)."""

    def __init__(self, n: int, num_replicas: int, rank: int):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class RepeatAugEpochSampler(Sampler[int]):
    """Repeated augmentation (DeiT): timm's ``RepeatAugSampler`` seeded per (seed, epoch).

    Each epoch shuffles ``0 .. n-1`` (generator seeded from (seed, epoch), so an epoch is the
    same whatever ran before), repeats every index ``repeats`` times in a row and deals the
    list to the ranks round-robin, so the copies of one image land on different ranks (and
    are augmented independently); each rank yields timm's number of samples per epoch
    (``n // 256 * 256 / num_replicas``), i.e. the epoch length stays about ``n`` images.
    """

    def __init__(self, n: int, repeats: int, num_replicas: int, rank: int, seed: int = 0):
        from timm.data.distributed_sampler import RepeatAugSampler

        self.seed = int(seed)
        self.epoch = 0
        self.repeats, self.num_replicas, self.rank = int(repeats), int(num_replicas), int(rank)
        self.inner = RepeatAugSampler(range(n), num_replicas=num_replicas, rank=rank, shuffle=True,
                                      num_repeats=repeats)

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (same on every rank)."""
        from .data import epoch_order_seed

        self.epoch = int(epoch)
        self.inner.set_epoch(epoch_order_seed(self.seed, self.epoch))

    def __iter__(self) -> Iterator[int]:
        return iter(self.inner)

    def iter_copies(self) -> Iterator[Tuple[int, int]]:
        """Yield ``(index, copy)``: which of an image's ``repeats`` copies each item is (its
        position in timm's repeated list modulo ``repeats``), so that the loader seeds the copies'
        augmentations differently (:class:`distill.data.SeededSampler`)."""
        positions = range(self.rank, self.inner.total_size, self.num_replicas)[:self.inner.num_selected_samples]
        return zip(iter(self.inner), (p % self.repeats for p in positions))

    def __len__(self) -> int:
        return len(self.inner)


def train_sampler(n: int, global_batch: int, seed: int, aug_repeats: int = 0) -> Optional[Sampler]:
    """Return this rank's training sampler, or None for the default (single process, no repeats).

    ``aug_repeats > 1``: :class:`RepeatAugEpochSampler` (also in a single process)."""
    if aug_repeats > 1:
        sampler = RepeatAugEpochSampler(n, aug_repeats, world_size(), rank(), seed)
        sampler.set_epoch(0)
        return sampler
    if not is_distributed():
        return None
    return ShardedEpochSampler(n, global_batch, world_size(), rank(), True, seed)


def eval_sampler(n: int) -> Optional[Sampler]:
    """Return this rank's evaluation shard, or None when not distributed."""
    if not is_distributed():
        return None
    return ShardSampler(n, world_size(), rank())
