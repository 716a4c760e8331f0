"""The cache as a teacher source: the teachers' outputs arrive with the batch.

A step's teachers come from one of two sources, both giving a
:class:`~distill.signals.TeacherOutputs` for the batch: the live pool (the Distiller runs
it on ``x`` when the batch carries no outputs) or the cache. For the cache, the training
loader replays the stored views (:class:`~distill.cache.items.CachedViews`, key
``i * K + v`` per item) and its collate function, which runs in the loader's workers,
looks the batch's keys up (:meth:`~distill.cache.store.TeacherCache.lookup`): batches are
``(x, y, TeacherOutputs)`` on the host (pinned when CUDA is available), and the training
loop moves them to the device without blocking. Keys never leave the workers; the step
never waits on the host.

A run without teachers has nothing to cache but can still train on the same stored views
(:func:`view_train_loader`): they are a function of the view seed, so it draws them live.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .. import distributed
from ..data import EpochSampler, build_loader, train_sampler
from ..signals import TeacherOutputs
from .items import CachedViews, ViewSampler
from .recipes import view_seed
from .store import TeacherCache


class CachedTeacherBatches:
    """Collate function: ``(x, label, key)`` items -> ``(x (B, C, H, W), y (B,), TeacherOutputs)``."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def __call__(self, items: List[Tuple[Tensor, int, int]]) -> Tuple[Tensor, Tensor, TeacherOutputs]:
        x, y, keys = default_collate(items)
        return x, y, self.cache.lookup(keys)


def _order(recipe: Any, train: Dataset) -> Sampler:
    inner = train_sampler(len(train), recipe.data.batch_size, recipe.seed)
    return inner if inner is not None else EpochSampler(len(train), shuffle=True, seed=recipe.seed)


def cached_train_loader(recipe: Any, train: Dataset, cache: TeacherCache) -> DataLoader:
    """Return the training loader replaying the cache's views (view ``epoch mod K``) with the
    teachers' outputs: ``(x, y, TeacherOutputs)`` batches."""
    inner = _order(recipe, train)
    return build_loader(CachedViews(train, cache.records), distributed.local_batch_size(recipe.data.batch_size),
                        True, recipe.data.num_workers, recipe.seed, sampler=ViewSampler(inner, cache.num_views),
                        collate_fn=CachedTeacherBatches(cache))


def view_train_loader(recipe: Any, train: Dataset) -> DataLoader:
    """Return the ``(x, y)`` training loader of a run without teachers that shows, in epoch
    ``e``, view ``e mod K`` of the views a teacher cache of the recipe (``data.fixed_views``
    K, ``run.teacher_cache_view_seed``) stores, in the order a cached run of the same seed
    visits them: the student-alone row of a study sees the images its cached rows see."""
    return build_loader(train, distributed.local_batch_size(recipe.data.batch_size), True, recipe.data.num_workers,
                        recipe.seed, sampler=_order(recipe, train), views=(view_seed(recipe), recipe.data.fixed_views))
