"""Datasets, transforms and loaders: ``build_data(recipe.data)`` -> :class:`DataBundle`.

Supported datasets (:data:`DATASETS`):

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

Items are ``(float32 tensor (C, H, W), normalised; int label)``. ``data.train_subset`` /
``data.val_subset`` keep a deterministic, class-balanced subset (:func:`balanced_subset`).

Loaders (:func:`build_loader`) make augmentation reproducible: a training item's random
transform is seeded from (loader seed, epoch, dataset index), so an epoch gives the same
batches whatever the number of workers, whether they persist, and whether the run was
resumed.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler, Subset, get_worker_info
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from .cache.views import PadCrop, ViewAugment, timm_view_augment
from .errors import DistillError
from .fetch import dataset_hint, is_offline
from .paths import datasets_dir

SPLIT_SEED = 0  # the digits train/test split
SUBSET_SEED = 0  # the class-balanced subsets of data.train_subset / data.val_subset
DIGITS_TEST_FRACTION = 0.2

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # == timm.data.IMAGENET_DEFAULT_MEAN / _STD
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Fixed facts about a supported dataset."""

    name: str
    num_classes: Optional[int]  # None: read from the folders
    input_size: int  # native (or default) square resolution
    channels: int
    mean: Optional[Tuple[float, ...]]  # None: computed from the training split (digits)
    std: Optional[Tuple[float, ...]]
    augment: str  # what augment='auto' means: none | cifar | timm
    label: str  # human-readable name for messages
    torchvision_folder: Optional[str] = None  # torchvision's extracted folder under root


DATASETS: Dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 8, 1, None, None, "none", "digits"),
    "cifar10": DatasetInfo("cifar10", 10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           "cifar", "CIFAR-10", "cifar-10-batches-py"),
    "cifar100": DatasetInfo("cifar100", 100, 32, 3, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
                            "cifar", "CIFAR-100", "cifar-100-python"),
    "imagefolder": DatasetInfo("imagefolder", None, 224, 3, IMAGENET_MEAN, IMAGENET_STD, "timm", "image folder"),
}

AUGMENTS = ("auto", "none", "cifar", "timm")


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


# ----------------------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """Images held in memory as a float tensor (N, C, H, W) in [0, 1] with int labels.

    Items are ``((augment(image) - mean) / std, label)``; ``augment`` (optional) acts on the
    [0, 1] tensor, so padding is black as for image files.
    """

    def __init__(self, images: torch.Tensor, targets: Sequence[int], mean: Sequence[float],
                 std: Sequence[float], augment: Optional[Callable] = None, classes: Optional[List[str]] = None):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = classes
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self._normalised = None if augment is not None else (images - self.mean) / self.std

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if self._normalised is not None:
            return self._normalised[index], self.targets[index]
        image = self.augment(self.images[index])
        return (image - self.mean) / self.std, self.targets[index]


class LabeledSubset(Subset):
    """A :class:`~torch.utils.data.Subset` that keeps ``targets`` and ``classes``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        super().__init__(dataset, list(indices))
        base = dataset_targets(dataset)
        self.targets = [base[i] for i in self.indices]
        self.classes = getattr(dataset, "classes", None)


def dataset_targets(dataset: Dataset) -> List[int]:
    """Return the int labels of ``dataset`` in order, without decoding any image."""
    if isinstance(dataset, Subset) and not hasattr(dataset, "targets"):
        base = dataset_targets(dataset.dataset)
        return [base[i] for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(f"{type(dataset).__name__} has no .targets; cannot read its labels cheaply")
    if isinstance(targets, torch.Tensor):
        return [int(t) for t in targets.tolist()]
    return [int(t) for t in targets]


def balanced_subset(targets: Sequence[int], n: int, seed: int = SUBSET_SEED) -> List[int]:
    """Return ``n`` indices chosen class-balanced and deterministically, sorted.

    Each class's indices are shuffled by a generator seeded with ``seed``; then one
    index per class is taken in turn (class order), round after round, until ``n``.
    Classes that run out drop out of the rotation.
    """
    by_class: Dict[int, List[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    gen = torch.Generator().manual_seed(seed)
    queues = []
    for label in sorted(by_class):
        idx = by_class[label]
        queues.append([idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()])
    chosen: List[int] = []
    depth = 0
    while len(chosen) < n:
        for q in queues:
            if depth < len(q):
                chosen.append(q[depth])
                if len(chosen) == n:
                    break
        depth += 1
        if depth > max(len(q) for q in queues):
            break
    return sorted(chosen)


def _subset(dataset: Dataset, n: Optional[int], field: str) -> Dataset:
    if n is None:
        return dataset
    if n < 1:
        raise DistillError(f"{field}: must be >= 1, got {n}")
    if n >= len(dataset):
        return dataset
    return LabeledSubset(dataset, balanced_subset(dataset_targets(dataset), n))


# ----------------------------------------------------------------------------- transforms


def timm_transform_args(cfg: Any) -> Dict[str, Any]:
    """Return the ``create_transform`` training kwargs of a DataConfig (RandAugment, erasing, ...)."""
    args: Dict[str, Any] = {"auto_augment": getattr(cfg, "auto_augment", None),
                            "re_prob": getattr(cfg, "re_prob", 0.0),
                            "interpolation": getattr(cfg, "interpolation", "bilinear")}
    if getattr(cfg, "color_jitter", None) is not None:
        args["color_jitter"] = cfg.color_jitter
    return args


def build_mixup(cfg: Any, num_classes: int) -> Optional[Callable]:
    """Return a ``timm.data.Mixup`` for a DataConfig, or None when it mixes nothing.

    With mixup / cutmix off but ``label_smoothing`` > 0 it still returns a Mixup with
    ``prob=0`` so that targets become smoothed one-hot ``(B, C)``. The returned callable
    maps ``(x, y) -> (x', soft targets (B, C))`` and needs an even batch size.
    """
    mixup, cutmix = getattr(cfg, "mixup", 0.0), getattr(cfg, "cutmix", 0.0)
    smoothing = getattr(cfg, "label_smoothing", 0.0)
    if mixup <= 0 and cutmix <= 0 and smoothing <= 0:
        return None
    from timm.data import Mixup

    prob = getattr(cfg, "mixup_prob", 1.0) if (mixup > 0 or cutmix > 0) else 0.0
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob,
                 switch_prob=getattr(cfg, "mixup_switch_prob", 0.5), mode="batch",
                 label_smoothing=smoothing, num_classes=num_classes)


def image_transforms(info: DatasetInfo, size: int, augment: str, mean: Tuple[float, ...],
                     std: Tuple[float, ...], timm_args: Optional[Dict[str, Any]] = None) -> Tuple[Callable, Callable]:
    """Return (train, eval) transforms from a PIL image to a normalised tensor."""
    from torchvision import transforms as T

    finish = [T.ToTensor(), T.Normalize(mean, std)]
    if info.name == "imagefolder":  # image files of any size: timm's eval (resize + centre crop)
        from timm.data import create_transform

        eval_tf = create_transform((3, size, size), is_training=False, mean=mean, std=std)
        geometry = [T.Resize(size), T.CenterCrop(size)]
    else:  # fixed-size images, resized only when asked
        geometry = [T.Resize(size)] if size != info.input_size else []
        eval_tf = T.Compose(geometry + finish)
    if augment == "none":
        train_tf = eval_tf
    elif augment == "cifar":  # RandomCrop(size, padding=size // 8) + RandomHorizontalFlip, as a replayable view
        train_tf = ViewAugment(PadCrop(size, size // 8), 0.5, T.Compose(finish),
                               pre=T.Compose(geometry) if geometry else None)
    elif augment == "timm":
        from timm.data import create_transform

        train_tf = timm_view_augment(
            create_transform((3, size, size), is_training=True, mean=mean, std=std, **(timm_args or {})))
    else:
        raise DistillError(f"data.augment: {augment!r} is not one of {', '.join(AUGMENTS)}")
    return train_tf, eval_tf


# ----------------------------------------------------------------------------- builders


def build_data(cfg: Any) -> DataBundle:
    """Return the :class:`DataBundle` described by a :class:`~distill.recipe.DataConfig`.

    Raises :class:`DistillError` (naming the recipe field, file or folder) when the data
    cannot be found or is malformed.
    """
    if cfg.dataset not in DATASETS:
        raise DistillError(f"data.dataset: unknown dataset {cfg.dataset!r}; known: {', '.join(sorted(DATASETS))}")
    if cfg.augment not in AUGMENTS:
        raise DistillError(f"data.augment: {cfg.augment!r} is not one of {', '.join(AUGMENTS)}")
    if (cfg.mean is None) != (cfg.std is None):
        raise DistillError("data.mean: give both data.mean and data.std, or neither")
    if cfg.input_size is not None and cfg.input_size < 1:
        raise DistillError(f"data.input_size: must be >= 1, got {cfg.input_size}")
    info = DATASETS[cfg.dataset]
    if cfg.mean is not None and not (len(cfg.mean) == len(cfg.std) == info.channels):
        raise DistillError(f"data.mean: {cfg.dataset} images have {info.channels} channel(s); got "
                           f"{len(cfg.mean)} mean and {len(cfg.std)} std values")
    if info.name == "digits":
        bundle = _build_digits(cfg, info)
    else:
        bundle = _build_images(cfg, info)
    bundle.train = _subset(bundle.train, cfg.train_subset, "data.train_subset")
    bundle.val = _subset(bundle.val, cfg.val_subset, "data.val_subset")
    return bundle


def _build_digits(cfg: Any, info: DatasetInfo) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    targets = torch.from_numpy(digits.target).long()
    size = cfg.input_size or info.input_size
    if size != info.input_size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=size < info.input_size).clamp_(0.0, 1.0)
    train_idx, test_idx = _stratified_split(targets.tolist(), DIGITS_TEST_FRACTION, SPLIT_SEED)
    train_images = images[train_idx]
    if cfg.mean is not None:
        mean, std = tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std)
    else:
        mean, std = (float(train_images.mean()),), (float(train_images.std()),)
    augment = info.augment if cfg.augment == "auto" else cfg.augment
    if augment == "timm":
        raise DistillError("data.augment: 'timm' augmentation needs image files; digits supports none or cifar")
    train_aug = None
    if augment == "cifar":  # RandomCrop(size, padding) + RandomHorizontalFlip, as a replayable view
        train_aug = ViewAugment(PadCrop(size, max(1, size // 8)), 0.5)
    names = [str(int(n)) for n in digits.target_names]
    train = TensorImageDataset(train_images, targets[train_idx].tolist(), mean, std, train_aug, names)
    val = TensorImageDataset(images[test_idx], targets[test_idx].tolist(), mean, std, None, names)
    return DataBundle(train, val, 10, names, (1, size, size), mean, std)


def _stratified_split(targets: Sequence[int], test_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Return sorted (train, test) indices: round(fraction * n_c) random items of each class to test."""
    gen = torch.Generator().manual_seed(seed)
    by_class: Dict[int, List[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    train, test = [], []
    for label in sorted(by_class):
        idx = by_class[label]
        perm = torch.randperm(len(idx), generator=gen).tolist()
        n_test = int(round(test_fraction * len(idx)))
        test += [idx[j] for j in perm[:n_test]]
        train += [idx[j] for j in perm[n_test:]]
    return sorted(train), sorted(test)


def _build_images(cfg: Any, info: DatasetInfo) -> DataBundle:
    size = cfg.input_size or info.input_size
    if cfg.mean is not None:
        mean, std = tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std)
    else:
        mean, std = info.mean, info.std
    augment = info.augment if cfg.augment == "auto" else cfg.augment
    train_tf, eval_tf = image_transforms(info, size, augment, mean, std, timm_transform_args(cfg))

    if info.name == "imagefolder":
        if not cfg.root:
            raise DistillError("data.root: an imagefolder dataset needs data.root (a folder with train/ and test/)")
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise DistillError(f"data.root: folder not found: {root}")
        train, val = _image_folders(root, train_tf, eval_tf, require_tree=True)
    else:
        root = Path(cfg.root).expanduser() if cfg.root else datasets_dir() / info.name
        layouts = (f"an ImageFolder tree ({root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg) "
                   f"or torchvision's files ({root}/{info.torchvision_folder}/)")
        tree = _image_folders(root, train_tf, eval_tf, require_tree=False)
        if tree is not None:
            train, val = tree
        elif (root / info.torchvision_folder).is_dir():
            train, val = _torchvision_cifar(info, root, train_tf, eval_tf, download=False)
        elif cfg.download and not is_offline():
            train, val = _torchvision_cifar(info, root, train_tf, eval_tf, download=True)
        else:
            off = "downloads are off (--offline / --no-download / HF_HUB_OFFLINE)" if is_offline() \
                else "data.download is false"
            raise DistillError(f"data.root: no {info.label} data in {root} and {off}; "
                               f"put {layouts} there, or allow the download")

    classes = list(train.classes)
    if info.num_classes is None and getattr(cfg, "num_classes", None) and len(classes) != cfg.num_classes:
        raise DistillError(f"data.num_classes: the recipe expects {cfg.num_classes} classes but {_where(train)} "
                           f"holds {len(classes)} class folders")
    if info.num_classes is not None and len(classes) != info.num_classes:
        raise DistillError(f"data.root: {info.label} has {info.num_classes} classes but {_where(train)} holds "
                           f"{len(classes)} class folders")
    if list(val.classes) != classes:
        missing = sorted(set(classes) - set(val.classes))
        extra = sorted(set(val.classes) - set(classes))
        raise DistillError(f"data.root: the class folders of {_where(val)} differ from {_where(train)}"
                           + (f"; missing: {', '.join(missing)}" if missing else "")
                           + (f"; extra: {', '.join(extra)}" if extra else ""))
    return DataBundle(train, val, len(classes), classes, (3, size, size), tuple(mean), tuple(std))


def _where(dataset: Any) -> str:
    return str(getattr(dataset, "root", "?"))


def _image_folders(root: Path, train_tf: Callable, eval_tf: Callable, require_tree: bool):
    """Return (train, val) ImageFolders of ``root``, or None when it has no tree (and none is required)."""
    train_dir = root / "train"
    val_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if not train_dir.is_dir() and val_dir is None and not require_tree:
        return None
    if not train_dir.is_dir():
        raise DistillError(f"data.root: no train/ folder in {root} (expected {root}/train/<class>/<image>)")
    if val_dir is None:
        raise DistillError(f"data.root: no test/ (or val/) folder in {root} (expected {root}/test/<class>/<image>)")
    return _image_folder(train_dir, train_tf), _image_folder(val_dir, eval_tf)


def is_hidden(path: Path, root: Path) -> bool:
    """Return whether ``path`` or any folder between ``root`` and it has a name starting with '.'
    (``.ipynb_checkpoints``, ``.DS_Store``, ``.git``): such entries are never classes or images."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


class VisibleImageFolder(ImageFolder):
    """torchvision's ImageFolder without hidden class folders, subfolders or files (see :func:`is_hidden`)."""

    def __init__(self, root: str, transform: Optional[Callable] = None, loader: Callable = default_loader):
        folder = Path(root)
        super().__init__(root, transform=transform, loader=loader, is_valid_file=lambda path: (
            path.lower().endswith(IMG_EXTENSIONS) and not is_hidden(Path(path), folder)))

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        """Return the sorted visible class-folder names and their indices."""
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}


def _image_folder(folder: Path, transform: Callable):
    try:
        return VisibleImageFolder(str(folder), transform=transform, loader=load_image)
    except FileNotFoundError as exc:
        empty = _empty_class_folders(folder)
        if empty:
            raise DistillError(f"data.root: no image files in class folder(s) {', '.join(map(str, empty))}") from None
        raise DistillError(f"data.root: cannot read image folder {folder}: {exc}") from None


def load_image(path: str):
    """Return the RGB PIL image at ``path``; an unreadable or truncated file is a DistillError naming it."""
    import io

    from PIL import Image

    try:
        with open(path, "rb") as handle:
            data = handle.read()  # one read: PIL parsing a file handle issues dozens of small ones
        image = Image.open(io.BytesIO(data))
        return image.convert("RGB")  # decodes the whole file: truncation shows here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DistillError(f"{path}: unreadable image ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def _empty_class_folders(folder: Path) -> List[Path]:
    empty = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        has_image = any(name.lower().endswith(IMG_EXTENSIONS) and not is_hidden(Path(where) / name, folder)
                        for where, _, names in os.walk(entry.path, followlinks=True) for name in names)
        if not has_image:
            empty.append(folder / entry.name)
    return empty


def _torchvision_cifar(info: DatasetInfo, root: Path, train_tf: Callable, eval_tf: Callable, download: bool):
    from torchvision import datasets

    cls = datasets.CIFAR10 if info.name == "cifar10" else datasets.CIFAR100
    try:
        if download:
            root.mkdir(parents=True, exist_ok=True)
        train = cls(str(root), train=True, transform=train_tf, download=download)
        val = cls(str(root), train=False, transform=eval_tf, download=download)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; RuntimeError: not found or corrupted
        what = "download" if download else "read"
        hint = f"; {dataset_hint(info.label, root)}" if download else ""
        raise DistillError(f"data.root: cannot {what} {info.label} in {root}: {exc}{hint}") from None
    return train, val


# ----------------------------------------------------------------------------- loaders


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
        if get_worker_info() is not None:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            return self.dataset[index]
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        try:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            return self.dataset[index]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)

    def __getattr__(self, name: str) -> Any:  # targets, classes, ... of the wrapped dataset
        if name == "dataset" or name.startswith("__"):  # never forward __getitems__ & co
            raise AttributeError(name)
        return getattr(self.dataset, name)


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int,
                 sampler: Optional[Sampler] = None) -> DataLoader:
    """Return a DataLoader over ``dataset``.

    Training loaders visit the dataset in the order of ``sampler`` (default: an
    :class:`EpochSampler` with ``shuffle=True`` and ``seed``) and drop the last partial
    batch (kept only when the dataset is smaller than one batch, so there is always one
    step). Each training item's random augmentation is seeded with a mix of (seed, epoch,
    index) (the dataset is wrapped; ``loader.dataset`` forwards ``targets`` and friends), so
    it does not depend on ``num_workers``, worker persistence, the global RNG or resuming.
    Evaluation loaders keep the dataset order and every sample (or follow ``sampler``).

    The caller calls ``loader.sampler.set_epoch(epoch)`` before iterating each epoch (the
    engine does that, and also seeds the global torch RNG per epoch for model-side
    randomness; the workers' base seeds derive from it but the data no longer depends on
    them). ``pin_memory`` is on when CUDA is available; workers persist across epochs
    when ``num_workers > 0``; they ignore SIGINT (:func:`ignore_interrupts`).
    """
    if train:
        inner = sampler if sampler is not None else EpochSampler(len(dataset), shuffle=True, seed=seed)
        loader_sampler: Sampler = SeededSampler(inner, seed)
        loader_dataset: Dataset = SeededDataset(dataset)
        drop_last = len(inner) >= batch_size
    else:
        loader_sampler = sampler if sampler is not None else SequentialSampler(dataset)
        loader_dataset = dataset
        drop_last = False
    return DataLoader(loader_dataset, batch_size=batch_size, sampler=loader_sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, worker_init_fn=ignore_interrupts)


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT, so Ctrl-C (sent to the whole process group,
    e.g. under torchrun) reaches only the main process, which stops cleanly and ends the workers."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
