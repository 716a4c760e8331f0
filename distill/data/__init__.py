"""Data: the dataset registry, transforms (replayable views, augment kinds, mixup), samplers and loaders.

- :mod:`distill.data.datasets`: ``build_data(recipe.data)`` -> :class:`DataBundle`; the
  registered datasets (:data:`distill.registries.DATASETS`) with their class count, size, mean/std.
- :mod:`distill.data.hfds`: Hugging Face datasets (``hfds/NAME[:config]``), read offline.
- :mod:`distill.data.images`: in-memory tensors, class-balanced subsets, image folders, CIFAR files.
- :mod:`distill.data.transforms`: view records (:class:`ViewAugment`), augment kinds
  (:data:`distill.registries.AUGMENTS`), :func:`image_transforms`, :func:`build_mixup`.
- :mod:`distill.data.sampling`: item seeds, epoch / sharded / repeated samplers, :func:`build_loader`.

This package imports neither the cache, the engine nor the pipeline.
"""

from ..registries import AUGMENTS, DATASETS
from . import hfds  # noqa: F401  (registers hfds/NAME[:config])
from .datasets import (IMAGENET_MEAN, IMAGENET_STD, DataBundle, DatasetInfo, build_data, dataset_info,
                       dataset_key)
from .images import LabeledSubset, TensorImageDataset, balanced_subset, dataset_targets, load_image, take_subset
from .sampling import (EpochSampler, RepeatAugEpochSampler, SeededDataset, SeededSampler, ShardedEpochSampler,
                       ShardSampler, build_loader, epoch_order_seed, eval_sampler, ignore_interrupts, item_seed,
                       seeded_rngs, train_sampler)
from .transforms import (PARAMS, AugmentSetting, PadCrop, ResizedCrop, ViewAugment, build_mixup, image_transforms,
                         timm_transform_args, timm_view_augment)

__all__ = [
    "AUGMENTS", "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "DataBundle", "DatasetInfo", "build_data",
    "dataset_info", "dataset_key", "LabeledSubset", "TensorImageDataset", "balanced_subset", "dataset_targets",
    "load_image", "take_subset", "EpochSampler", "RepeatAugEpochSampler", "SeededDataset", "SeededSampler",
    "ShardedEpochSampler", "ShardSampler", "build_loader", "epoch_order_seed", "eval_sampler", "ignore_interrupts",
    "item_seed", "seeded_rngs", "train_sampler", "PARAMS", "AugmentSetting", "PadCrop", "ResizedCrop",
    "ViewAugment", "build_mixup", "image_transforms", "timm_transform_args", "timm_view_augment",
]
