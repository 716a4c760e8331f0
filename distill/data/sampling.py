"""Seeds, samplers and loaders: every training item's randomness is a function of
(seed, epoch, index).

- :func:`epoch_order_seed` / :func:`item_seed`: the seeds of an epoch's order and of one
  item's augmentation; :func:`seeded_rngs` runs a block under one seed.
- :class:`EpochSampler` (one process), :class:`ShardedEpochSampler` (rank ``r``'s slice of
  each global batch under ``torchrun``), :class:`ShardSampler` (sharded evaluation) and
  :class:`RepeatAugEpochSampler` (DeiT's repeated augmentation); :func:`train_sampler` /
  :func:`eval_sampler` pick this rank's.
- :class:`SeededSampler` + :class:`SeededDataset`: the loader passes ``(index, item seed)``
  keys and the dataset runs each item under its seed; :func:`build_loader` wires them, so an
  epoch gives the same batches whatever the number of workers, whether they persist, and
  whether the run was resumed.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler, get_worker_info

from .. import distributed
from ..errors import DistillError


def _mix(*values: int) -> int:
    """Return a 63-bit seed mixing ``values`` (splitmix64 steps); distinct inputs rarely collide."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state >> 1


def epoch_order_seed(seed: int, epoch: int) -> int:
    """Return the seed of the training order of ``epoch`` (a function of (seed, epoch) only)."""
    return _mix(seed, epoch)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Return the seed a training loader of ``seed`` gives item ``index`` in ``epoch`` (63-bit int)."""
    return _mix(seed, epoch, index)


@contextlib.contextmanager
def seeded_rngs(seed: int, numpy: bool = True) -> Iterator[None]:
    """Run the block with the torch CPU, Python and NumPy RNGs seeded with ``seed``.

    In a DataLoader worker the RNGs serve this loader only and are left as the block leaves
    them; in the main process they are restored afterwards. ``numpy=False`` leaves NumPy's
    global RNG alone in the main process (saving it costs ~100 us; a worker seeds it anyway).
    """
    if get_worker_info() is not None:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        yield
        return
    states = torch.get_rng_state(), random.getstate(), np.random.get_state() if numpy else None
    try:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        if numpy:
            np.random.seed(seed & 0xFFFFFFFF)
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        if numpy:
            np.random.set_state(states[2])


class EpochSampler(Sampler[int]):
    """Index sampler whose order is a function of (seed, epoch) only.

    Same API as :class:`~torch.utils.data.distributed.DistributedSampler`: call
    ``set_epoch(epoch)`` before each epoch. With ``shuffle`` the order is
    ``torch.randperm(n)`` drawn from a generator seeded with a mix of (seed, epoch), so
    epoch ``e`` gives the same order whatever ran before (a resumed run matches an
    uninterrupted one); without it the order is ``0 .. n-1``.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0):
        self.n = int(n)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        gen = torch.Generator().manual_seed(epoch_order_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class ShardedEpochSampler(Sampler[int]):
    """Rank ``rank``'s share of an :class:`EpochSampler` order, batch-aligned.

    The epoch's order is ``EpochSampler(n, shuffle, seed)`` at ``set_epoch(epoch)``; it is cut
    into global batches of ``global_batch`` (a trailing partial batch is dropped, as the
    single-process loader drops it) and rank ``r`` yields items
    ``[r * b, (r + 1) * b)`` of each, with ``b = global_batch / num_replicas``. Loaded with
    batch size ``b``, step ``k`` of every rank together covers exactly global batch ``k``.
    """

    def __init__(self, n: int, global_batch: int, num_replicas: int, rank: int, shuffle: bool = True,
                 seed: int = 0):
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
        self.epoch = int(epoch)
        self.inner.set_epoch(epoch_order_seed(self.seed, self.epoch))

    def __iter__(self) -> Iterator[int]:
        return iter(self.inner)

    def iter_copies(self) -> Iterator[Tuple[int, int]]:
        """Yield ``(index, copy)``: which of an image's ``repeats`` copies each item is (its
        position in timm's repeated list modulo ``repeats``), so that the loader seeds the copies'
        augmentations differently (:class:`SeededSampler`)."""
        positions = range(self.rank, self.inner.total_size, self.num_replicas)[:self.inner.num_selected_samples]
        return zip(iter(self.inner), (p % self.repeats for p in positions))

    def __len__(self) -> int:
        return len(self.inner)


def train_sampler(n: int, global_batch: int, seed: int, aug_repeats: int = 0) -> Optional[Sampler]:
    """Return this rank's training sampler, or None for the default (single process, no repeats).

    ``aug_repeats > 1``: :class:`RepeatAugEpochSampler` (also in a single process)."""
    if aug_repeats > 1:
        sampler = RepeatAugEpochSampler(n, aug_repeats, distributed.world_size(), distributed.rank(), seed)
        sampler.set_epoch(0)
        return sampler
    if not distributed.is_distributed():
        return None
    return ShardedEpochSampler(n, global_batch, distributed.world_size(), distributed.rank(), True, seed)


def eval_sampler(n: int) -> Optional[Sampler]:
    """Return this rank's evaluation shard, or None when not distributed."""
    if not distributed.is_distributed():
        return None
    return ShardSampler(n, distributed.world_size(), distributed.rank())


class SeededSampler(Sampler):
    """Yields ``(index, item_seed)`` from an inner sampler; item_seed mixes (seed, epoch, index)
    (and the copy number, for a repeated-augmentation sampler's second and later copies)."""

    def __init__(self, inner: Sampler, seed: int):
        self.inner = inner
        self.seed = int(seed)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return int(getattr(self.inner, "epoch", 0))

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        if hasattr(self.inner, "iter_copies"):  # repeated augmentation: each copy its own augmentation
            for index, copy in self.inner.iter_copies():
                yield index, (_mix(self.seed, epoch, index, copy) if copy else item_seed(self.seed, epoch, index))
            return
        for index in self.inner:
            yield index, item_seed(self.seed, epoch, index)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # shuffle, num_replicas, rank, ... of the inner sampler
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class ViewSeededSampler(SeededSampler):
    """A :class:`SeededSampler` whose epoch ``e`` shows view ``e mod K`` of each item: the
    augmentation a loader of ``view_seed`` gives it in epoch ``e mod K``, i.e. exactly the
    views a teacher cache of that view seed and K views stores (:mod:`distill.cache.items`).
    The order still follows ``inner`` (the training seed)."""

    def __init__(self, inner: Sampler, view_seed: int, num_views: int):
        super().__init__(inner, view_seed)
        self.num_views = int(num_views)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        view = self.epoch % self.num_views
        for index in self.inner:
            yield index, item_seed(self.seed, view, index)


class SeededDataset(Dataset):
    """Runs ``dataset[index]`` with the RNGs seeded by the item seed of ``(index, seed)`` keys.

    In a worker process the CPU torch, Python and NumPy RNGs are seeded (they serve this
    loader only). In the main process (``num_workers=0``) the torch CPU and Python RNGs are
    seeded and restored afterwards, so model-side randomness is untouched; NumPy's global
    RNG is left alone there (saving it costs ~100 us an item, and none of the transforms
    built here draws from it).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with seeded_rngs(seed, numpy=False):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # targets, classes, ... of the wrapped dataset
        if name == "dataset" or name.startswith("__"):  # never forward __getitems__ & co
            raise AttributeError(name)
        return getattr(self.dataset, name)


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int,
                 sampler: Optional[Sampler] = None, collate_fn: Optional[Callable] = None,
                 views: Optional[Tuple[int, int]] = None) -> DataLoader:
    """Return a DataLoader over ``dataset`` (batches made by ``collate_fn``, default torch's).

    Training loaders visit the dataset in the order of ``sampler`` (default: an
    :class:`EpochSampler` with ``shuffle=True`` and ``seed``) and drop the last partial
    batch (kept only when the dataset is smaller than one batch, so there is always one
    step). Each training item's random augmentation is seeded with a mix of (seed, epoch,
    index) (the dataset is wrapped; ``loader.dataset`` forwards ``targets`` and friends), so
    it does not depend on ``num_workers``, worker persistence, the global RNG or resuming;
    ``views=(view_seed, K)`` shows K fixed views instead (:class:`ViewSeededSampler`).
    Evaluation loaders keep the dataset order and every sample (or follow ``sampler``).

    The caller calls ``loader.sampler.set_epoch(epoch)`` before iterating each epoch (the
    engine does that, and also seeds the global torch RNG per epoch for model-side
    randomness; the workers' base seeds derive from it but the data no longer depends on
    them). ``pin_memory`` is on when CUDA is available; workers persist across epochs
    when ``num_workers > 0``; they ignore SIGINT (:func:`ignore_interrupts`).
    """
    if train:
        inner = sampler if sampler is not None else EpochSampler(len(dataset), shuffle=True, seed=seed)
        loader_sampler: Sampler = SeededSampler(inner, seed) if views is None else ViewSeededSampler(inner, *views)
        loader_dataset: Dataset = SeededDataset(dataset)
        drop_last = len(inner) >= batch_size
    else:
        loader_sampler = sampler if sampler is not None else SequentialSampler(dataset)
        loader_dataset = dataset
        drop_last = False
    return DataLoader(loader_dataset, batch_size=batch_size, sampler=loader_sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, worker_init_fn=ignore_interrupts, collate_fn=collate_fn)


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT, so Ctrl-C (sent to the whole process group,
    e.g. under torchrun) reaches only the main process, which stops cleanly and ends the workers."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
