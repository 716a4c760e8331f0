"""Repeated augmentation (data.aug_repeats): timm RepeatAugSampler semantics, seeded per (seed, epoch)."""

from collections import Counter

import pytest
import torch

from distill.data import RepeatAugEpochSampler, SeededSampler, train_sampler


def _epoch(n, repeats, world, epoch, seed=0):
    ranks = []
    for rank in range(world):
        s = RepeatAugEpochSampler(n, repeats, world, rank, seed)
        s.set_epoch(epoch)
        ranks.append(list(s))
        assert len(ranks[-1]) == len(s)
    return ranks


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_index_repeats_times_across_ranks(world):
    n, repeats = 1536, 3
    ranks = _epoch(n, repeats, world, epoch=2)
    assert all(len(r) == n // world for r in ranks)  # timm: the epoch stays n images (n // 256 * 256 / world)
    counts = Counter(i for r in ranks for i in r)
    assert sum(counts.values()) == n
    full = [c for c in counts.values() if c == repeats]
    assert len(full) >= len(counts) - 1 and max(counts.values()) == repeats  # only the cut-off last index has fewer
    assert len(counts) == -(-n // repeats)  # n / repeats distinct images
    if world >= repeats:  # the copies of one image go to different ranks
        for r in ranks:
            assert len(set(r)) == len(r)
        for a in range(world):
            for b in range(a + 1, world):
                shared = set(ranks[a]) & set(ranks[b])
                assert all(counts[i] >= 2 for i in shared)  # overlap only through the repeats


def test_order_is_seeded_per_epoch():
    a = _epoch(768, 3, 2, epoch=1, seed=7)
    assert a == _epoch(768, 3, 2, epoch=1, seed=7)  # whatever ran before
    assert a != _epoch(768, 3, 2, epoch=2, seed=7)
    assert a != _epoch(768, 3, 2, epoch=1, seed=8)


def test_copies_get_different_augmentation_seeds():
    """The loader seeds each item from (seed, epoch, index, copy): the copies of an image differ."""
    world, repeats = 3, 3
    seeds = {}
    for rank in range(world):
        inner = RepeatAugEpochSampler(768, repeats, world, rank, seed=0)
        loader_sampler = SeededSampler(inner, seed=0)
        loader_sampler.set_epoch(1)
        for index, item_seed in loader_sampler:
            seeds.setdefault(index, []).append(item_seed)
    assert all(len(set(s)) == len(s) for s in seeds.values())
    assert sum(len(s) == repeats for s in seeds.values()) >= len(seeds) - 1


def test_train_sampler_uses_repeats_in_one_process():
    assert train_sampler(512, 32, 0) is None
    sampler = train_sampler(512, 32, 0, aug_repeats=3)
    assert isinstance(sampler, RepeatAugEpochSampler) and len(sampler) == 512
    counts = Counter(sampler)
    assert max(counts.values()) == 3 and torch.tensor(list(counts.values())).float().mean() > 2.9
