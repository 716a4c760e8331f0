"""Training items as the cache sees them: raw images, their view records, replayed views.

:func:`load_view` opens item ``index`` of a training dataset built by :mod:`distill.data`
(an ImageFolder, torchvision's CIFAR, an in-memory :class:`~distill.data.TensorImageDataset`,
or a subset of one) and either augments it live, returning the record of the view it drew,
or replays a stored record. :class:`ViewItems` is what the cache build loads (items seeded
exactly as a training loader seeds epoch ``v``); :class:`CachedViews` with
:class:`ViewSampler` is what training from the cache loads: in epoch ``e`` item ``i`` shows
view ``e mod K``, replayed in the DataLoader workers, with key ``i * K + v``.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, Subset

from ..data import PARAMS, TensorImageDataset, ViewAugment, dataset_targets, item_seed


def leaf_item(dataset: Dataset, index: int) -> Tuple[Dataset, int]:
    """Return ``(underlying dataset, its index)`` of item ``index`` through any Subset layers."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    return dataset, int(index)


def _raw(leaf: Dataset, index: int) -> Tuple[Any, Optional[Any]]:
    """Return ``(unaugmented image, the dataset's training transform)`` of a leaf dataset."""
    if isinstance(leaf, TensorImageDataset):
        return leaf.images[index], leaf.augment
    if hasattr(leaf, "raw_image"):  # distill.data.hfds.HFImageDataset
        return leaf.raw_image(index), leaf.transform
    if hasattr(leaf, "samples") and hasattr(leaf, "loader"):  # torchvision ImageFolder
        return leaf.loader(leaf.samples[index][0]), leaf.transform
    if hasattr(leaf, "data") and hasattr(leaf, "transform"):  # torchvision CIFAR10 / CIFAR100
        from PIL import Image

        return Image.fromarray(leaf.data[index]), leaf.transform
    raise TypeError(f"the teacher cache cannot replay items of {type(leaf).__name__}")


def load_view(dataset: Dataset, index: int, record: Optional[Tensor] = None) -> Tuple[Tensor, int, Tensor]:
    """Return ``(x (C, H, W) normalised, label, record int64 (PARAMS,))`` of item ``index``.

    Without ``record`` the item is augmented live from the global RNGs (exactly what
    ``dataset[index]`` gives under the same seeding) and the record of that view is
    returned; with it the stored view is replayed. A dataset without random augmentation
    gives a record of zeros.
    """
    leaf, j = leaf_item(dataset, index)
    target = int(leaf.targets[j])
    image, augment = _raw(leaf, j)
    if isinstance(augment, ViewAugment):
        if record is None:
            x, record = augment.sample(image)
        else:
            x = augment.replay(image, record)
    else:  # no random augmentation: the item is its own only view
        x = augment(image) if augment is not None else image
        record = torch.zeros(PARAMS, dtype=torch.int64)
    if isinstance(leaf, TensorImageDataset):
        x = (x - leaf.mean) / leaf.std
    return x, target, record


class ViewItems(Dataset):
    """Items ``(x, record, index)`` of a training dataset, augmented live (the build's input)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor, int]:
        x, _, record = load_view(self.dataset, index)
        return x, record, index


class CachedViews(Dataset):
    """The training set replayed from stored view records ``(N, K, PARAMS)``.

    ``records`` is a tensor or the cache's :class:`~distill.cache.shards.ShardedArray`
    (``TeacherCache.records``: each item's record read from its shard when the item loads).

    Indexed by key ``i * K + v``; items are ``(x (C, H, W), label, key)``.
    """

    def __init__(self, dataset: Dataset, records: Tensor):
        if records.shape[0] != len(dataset):
            raise ValueError(f"{records.shape[0]} view records for a dataset of {len(dataset)} items")
        self.dataset = dataset
        self.records = records
        self.targets = dataset_targets(dataset)
        self.classes = getattr(dataset, "classes", None)

    @property
    def num_views(self) -> int:
        """Return K, the number of stored views per item."""
        return self.records.shape[1]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> Tuple[Tensor, int, int]:
        index, view = divmod(int(key), self.num_views)
        x, target, _ = load_view(self.dataset, index, self.records[index, view])
        return x, target, int(key)


class ViewSampler(Sampler[int]):
    """Yields key ``i * K + (epoch mod K)`` for each index ``i`` of an inner epoch sampler.

    Epoch ``e < K`` therefore shows every item exactly as a live training loader does in
    epoch ``e`` (same order, same augmentation); later epochs cycle through the views.
    """

    def __init__(self, inner: Sampler, num_views: int):
        self.inner, self.num_views = inner, int(num_views)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order and view of ``epoch``."""
        self.epoch = int(epoch)
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        view = self.epoch % self.num_views
        return (int(i) * self.num_views + view for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def shard_ranges(n: int, shard_images: int) -> List[Tuple[int, int]]:
    """Return the ``[start, stop)`` image ranges of the shards of an ``n``-image cache."""
    return [(start, min(start + shard_images, n)) for start in range(0, n, shard_images)]


def seeded_keys(indices: Sequence[int], seed: int, view: int) -> List[Tuple[int, int]]:
    """Return ``(index, item seed)`` keys: item ``index`` seeded as a loader of ``seed`` seeds epoch ``view``."""
    return [(int(i), item_seed(seed, view, int(i))) for i in indices]
