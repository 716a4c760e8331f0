"""Fixed augmented views: each training image is augmented K times once, and every epoch
shows one of those K views per image.

With ``data.fixed_views: K`` the training set is materialised as a tensor
``(N, K, C, H, W)`` of normalised images. View ``v`` of image ``i`` is exactly the
augmentation image ``i`` receives in epoch ``v`` of an ordinary run with the same seed
(the per-item seeding of :func:`distill.data.build_loader`), so ``K`` at least the number
of epochs reproduces ordinary training. In each epoch item ``i`` shows view
``randint(K)`` drawn from that item's seeded RNG (reproducible, worker-independent).

Items are ``(x, y, key)`` with ``key = i * K + v``: the row under which
:class:`distill.teacher_cache.TeacherOutputCache` keeps the teachers' outputs for that
exact input, so frozen teachers run once per view instead of once per epoch.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .data import EpochSampler, SeededDataset, SeededSampler, dataset_targets


class FixedViews(Dataset):
    """A training set of ``K`` pre-made views per image; items are ``(x (C, H, W), y, key)``."""

    def __init__(self, views: Tensor, targets: Sequence[int], classes: Optional[List[str]] = None):
        if views.ndim != 5:
            raise ValueError(f"views must be (N, K, C, H, W), got shape {tuple(views.shape)}")
        self.views = views
        self.targets = [int(t) for t in targets]
        self.classes = classes

    @property
    def num_views(self) -> int:
        """Return K, the number of views per image."""
        return self.views.shape[1]

    def __len__(self) -> int:
        return self.views.shape[0]

    def __getitem__(self, index: int) -> Tuple[Tensor, int, int]:
        view = int(torch.randint(self.num_views, ()))  # the loader seeds this item's RNG
        return self.views[index, view], self.targets[index], index * self.num_views + view

    def flat_views(self) -> Tensor:
        """Return every view ``(N * K, C, H, W)``; row ``key`` is the image of that key."""
        return self.views.flatten(0, 1)


def materialise_views(dataset: Dataset, num_views: int, seed: int, num_workers: int = 0,
                      batch_size: int = 256) -> FixedViews:
    """Return ``dataset`` as :class:`FixedViews`: view ``v`` is its epoch-``v`` augmentation.

    ``dataset`` yields ``(normalised image (C, H, W), label)`` with random augmentation;
    each item is seeded with (``seed``, ``v``, index) as a training loader of that seed
    would seed it in epoch ``v``.
    """
    if num_views < 1:
        raise ValueError(f"data.fixed_views: must be >= 1, got {num_views}")
    n = len(dataset)
    sampler = SeededSampler(EpochSampler(n, shuffle=False), seed)
    loader = DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    views: Optional[Tensor] = None
    for view in range(num_views):
        sampler.set_epoch(view)
        start = 0
        for x, _ in loader:
            if views is None:
                views = torch.empty(n, num_views, *x.shape[1:], dtype=x.dtype)
            views[start:start + x.shape[0], view] = x
            start += x.shape[0]
    assert views is not None  # n >= 1: datasets are never empty here
    return FixedViews(views, dataset_targets(dataset), getattr(dataset, "classes", None))
