"""The dataset registry: ``build_data(recipe.data)`` -> :class:`DataBundle`.

Each dataset is a :class:`DatasetInfo` subclass registered in
:data:`distill.registries.DATASETS`, carrying its class count, native image size,
channels, mean/std and default augmentation (what the dry run reads without the data),
and building its train / val datasets:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes,
  offline), held in memory as tensors. A fixed stratified split (20% of each class,
  seed :data:`SPLIT_SEED`, independent of the recipe seed) gives 1,438 train / 359 test
  images. Pixels are scaled to [0, 1] and normalised with the mean/std of the training
  split, computed when the bundle is built and recorded in it (about 0.3059 / 0.3765 at
  8x8).
- ``cifar10`` / ``cifar100``: from ``data.root`` (default ``$DISTILL_HOME/datasets/<name>``),
  either an ImageFolder tree of image files (``train/<class>/*.jpg`` and
  ``test/<class>/*.jpg``; alphabetical class order = label order) or torchvision's own
  files (``cifar-10-batches-py/`` / ``cifar-100-python/``), downloaded there by torchvision
  when ``data.download`` is true.
- ``imagefolder``: any ``data.root`` holding ``train/<class>/...`` and ``test/<class>/...``
  (or ``val/``); 224x224 and ImageNet mean/std by default.
- ``hfds/NAME[:config]``: a Hugging Face image dataset read offline from the local cache
  (:mod:`distill.data.hfds`); defaults as for ``imagefolder``.

Items are ``(float32 tensor (C, H, W), normalised; int label)``. ``data.train_subset`` /
``data.val_subset`` keep a deterministic, class-balanced subset
(:func:`~distill.data.images.balanced_subset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch.utils.data import Dataset

from ..errors import DistillError, RecipeError
from ..fetch import is_offline
from ..paths import datasets_dir
from ..registries import AUGMENTS, DATASETS
from .images import (TensorImageDataset, dataset_root, image_folders, stratified_split, take_subset,
                     torchvision_cifar)
from .transforms import AugmentSetting, image_transforms, timm_transform_args

SPLIT_SEED = 0  # the digits train/test split
DIGITS_TEST_FRACTION = 0.2


@dataclass
class DataBundle:
    """The train / val datasets of a recipe and what the models need to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: List[str]
    input_size: Tuple[int, int, int]  # (C, H, W)
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


class DatasetInfo:
    """A registered dataset: fixed facts (class attributes) and :meth:`build`.

    An instance is made per recipe by :func:`dataset_info` with the recipe's
    ``data.dataset`` string as ``spec``.
    """

    label: str = "dataset"  # human-readable name for messages
    num_classes: Optional[int] = None  # None: read from the data
    input_size: int = 224  # native (or default) square resolution
    channels: int = 3
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    stats_from_data: bool = False  # mean/std above are nominal: the bundle computes them from the training split
    augment: str = "timm"  # the augment kind 'auto' stands for
    fixed_size: bool = False  # every image is input_size (resized only when asked, no eval crop)
    class_unit: str = "class folders"  # what holds the classes, for messages
    train_size: int = 1_281_167  # training images before the data is read (dry run step counts; ImageNet's)

    def __init__(self, spec: str):
        self.spec = spec

    def check(self, cfg: Any, check_data: bool = True) -> None:
        """Raise RecipeError for settings this dataset cannot work with (without reading it;
        ``check_data=False``: nothing on disk is looked at either)."""

    def build(self, cfg: Any) -> DataBundle:
        """Return the (train, val) :class:`DataBundle` of a DataConfig (subsets not yet taken)."""
        raise NotImplementedError

    def resolved_stats(self, cfg: Any) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """Return (mean, std): the recipe's when given, else this dataset's."""
        if cfg.mean is not None:
            return tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std)
        return tuple(self.mean), tuple(self.std)


def dataset_key(spec: str) -> str:
    """Return the registry key of a ``data.dataset`` value (``hfds/NAME[:config]`` -> ``hfds``)."""
    return str(spec).split("/", 1)[0] if str(spec).startswith("hfds/") else str(spec)


def dataset_info(spec: str, field: str = "data.dataset") -> DatasetInfo:
    """Return the registered dataset of a ``data.dataset`` value; unknown: one RecipeError naming ``field``."""
    return DATASETS.get(dataset_key(spec), field)(spec)


def build_data(cfg: Any) -> DataBundle:
    """Return the :class:`DataBundle` described by a :class:`~distill.recipe.DataConfig`.

    Raises :class:`DistillError` (naming the recipe field, file or folder) when the data
    cannot be found or is malformed.
    """
    info = dataset_info(cfg.dataset)
    AUGMENTS.get(cfg.augment, "data.augment")  # an unknown kind fails before any data is read
    if (cfg.mean is None) != (cfg.std is None):
        raise DistillError("data.mean: give both data.mean and data.std, or neither")
    if cfg.input_size is not None and cfg.input_size < 1:
        raise DistillError(f"data.input_size: must be >= 1, got {cfg.input_size}")
    if cfg.mean is not None and not (len(cfg.mean) == len(cfg.std) == info.channels):
        raise DistillError(f"data.mean: {cfg.dataset} images have {info.channels} channel(s); got "
                           f"{len(cfg.mean)} mean and {len(cfg.std)} std values")
    bundle = info.build(cfg)
    bundle.train = take_subset(bundle.train, cfg.train_subset, "data.train_subset")
    bundle.val = take_subset(bundle.val, cfg.val_subset, "data.val_subset")
    return bundle


@DATASETS.register("digits")
class Digits(DatasetInfo):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, offline)."""

    label, num_classes, input_size, channels, train_size = "digits", 10, 8, 1, 1438
    mean, std, stats_from_data = (0.3059,), (0.3765,), True  # what the bundle computes at 8x8
    augment, fixed_size = "none", True

    def build(self, cfg: Any) -> DataBundle:
        """Return the digits bundle: in-memory tensors, stratified split, training-split mean/std."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
        targets = torch.from_numpy(digits.target).long()
        size = cfg.input_size or self.input_size
        if size != self.input_size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=size < self.input_size).clamp_(0.0, 1.0)
        train_idx, test_idx = stratified_split(targets.tolist(), DIGITS_TEST_FRACTION, SPLIT_SEED)
        train_images = images[train_idx]
        if cfg.mean is not None:
            mean, std = self.resolved_stats(cfg)
        else:
            mean, std = (float(train_images.mean()),), (float(train_images.std()),)
        setting = AugmentSetting(size, mean, std, self.augment, self.label, tensor=True)
        train_aug = AUGMENTS.get(cfg.augment, "data.augment")(setting)
        names = [str(int(n)) for n in digits.target_names]
        train = TensorImageDataset(train_images, targets[train_idx].tolist(), mean, std, train_aug, names)
        val = TensorImageDataset(images[test_idx], targets[test_idx].tolist(), mean, std, None, names)
        return DataBundle(train, val, 10, names, (1, size, size), mean, std)


class ImageFiles(DatasetInfo):
    """Datasets of images decoded per item: transforms, then a (train, val) pair of datasets."""

    def build(self, cfg: Any) -> DataBundle:
        """Return the bundle of :meth:`read` with the recipe's transforms, its classes checked."""
        size = cfg.input_size or self.input_size
        mean, std = self.resolved_stats(cfg)
        train_tf, eval_tf = image_transforms(self, size, cfg.augment, mean, std, timm_transform_args(cfg))
        train, val = self.read(cfg, train_tf, eval_tf)
        classes = list(train.classes)
        if self.num_classes is None and getattr(cfg, "num_classes", None) and len(classes) != cfg.num_classes:
            raise DistillError(f"data.num_classes: the recipe expects {cfg.num_classes} classes but "
                               f"{dataset_root(train)} holds {len(classes)} {self.class_unit}")
        if self.num_classes is not None and len(classes) != self.num_classes:
            raise DistillError(f"data.root: {self.label} has {self.num_classes} classes but {dataset_root(train)} "
                               f"holds {len(classes)} {self.class_unit}")
        if list(val.classes) != classes:
            missing = sorted(set(classes) - set(val.classes))
            extra = sorted(set(val.classes) - set(classes))
            raise DistillError(f"data.root: the {self.class_unit} of {dataset_root(val)} differ from "
                               f"{dataset_root(train)}"
                               + (f"; missing: {', '.join(missing)}" if missing else "")
                               + (f"; extra: {', '.join(extra)}" if extra else ""))
        return DataBundle(train, val, len(classes), classes, (3, size, size), tuple(mean), tuple(std))

    def read(self, cfg: Any, train_tf: Any, eval_tf: Any) -> Tuple[Dataset, Dataset]:
        """Return the (train, val) datasets with these transforms; each has ``.classes`` and ``.targets``."""
        raise NotImplementedError


class Cifar(ImageFiles):
    """CIFAR as an ImageFolder tree or torchvision's files under ``data.root``."""

    input_size, train_size, augment, fixed_size = 32, 50_000, "cifar", True
    torchvision_folder = ""  # torchvision's extracted folder under root
    torchvision_class = ""  # its torchvision.datasets class

    def read(self, cfg: Any, train_tf: Any, eval_tf: Any) -> Tuple[Dataset, Dataset]:
        """Return (train, test): the ImageFolder tree if there is one, else torchvision's files."""
        root = Path(cfg.root).expanduser() if cfg.root else datasets_dir() / self.spec
        layouts = (f"an ImageFolder tree ({root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg) "
                   f"or torchvision's files ({root}/{self.torchvision_folder}/)")
        tree = image_folders(root, train_tf, eval_tf, require_tree=False)
        if tree is not None:
            return tree
        if (root / self.torchvision_folder).is_dir():
            return torchvision_cifar(self, root, train_tf, eval_tf, download=False)
        if cfg.download and not is_offline():
            return torchvision_cifar(self, root, train_tf, eval_tf, download=True)
        off = "downloads are off (--offline / --no-download / HF_HUB_OFFLINE)" if is_offline() \
            else "data.download is false"
        raise DistillError(f"data.root: no {self.label} data in {root} and {off}; "
                           f"put {layouts} there, or allow the download")


@DATASETS.register("cifar10")
class Cifar10(Cifar):
    """CIFAR-10: 32x32 colour images, 10 classes (50,000 train / 10,000 test)."""

    label, num_classes = "CIFAR-10", 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    torchvision_folder, torchvision_class = "cifar-10-batches-py", "CIFAR10"


@DATASETS.register("cifar100")
class Cifar100(Cifar):
    """CIFAR-100: 32x32 colour images, 100 classes (50,000 train / 10,000 test)."""

    label, num_classes = "CIFAR-100", 100
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    torchvision_folder, torchvision_class = "cifar-100-python", "CIFAR100"


@DATASETS.register("imagefolder")
class ImageFolderDataset(ImageFiles):
    """Any data.root with train/<class>/... and test/<class>/... (or val/); 224 px, ImageNet mean/std."""

    label = "image folder"

    def check(self, cfg: Any, check_data: bool = True) -> None:
        """Require ``data.root`` (and, with ``check_data``, that it is a folder)."""
        if not cfg.root:
            raise RecipeError("data.root", "an imagefolder dataset needs data.root (a folder with train/ and test/)")
        if check_data and not Path(cfg.root).is_dir():
            raise RecipeError("data.root", f"folder not found: {cfg.root}")

    def read(self, cfg: Any, train_tf: Any, eval_tf: Any) -> Tuple[Dataset, Dataset]:
        """Return the (train, test) ImageFolders of ``data.root``."""
        if not cfg.root:
            raise DistillError("data.root: an imagefolder dataset needs data.root (a folder with train/ and test/)")
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise DistillError(f"data.root: folder not found: {root}")
        return image_folders(root, train_tf, eval_tf, require_tree=True)
