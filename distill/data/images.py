"""Image items in memory and on disk: tensors, class-balanced subsets, image folders, CIFAR files.

Items are ``(float32 tensor (C, H, W), normalised; int label)``. :func:`take_subset` keeps a
deterministic, class-balanced subset (:func:`balanced_subset`); :func:`image_folders` reads
``train/<class>/...`` and ``test/<class>/...`` (or ``val/``) trees and
:func:`torchvision_cifar` torchvision's CIFAR files; errors name the recipe field and the
file or folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from ..errors import DistillError
from ..fetch import dataset_hint

SUBSET_SEED = 0  # the class-balanced subsets of data.train_subset / data.val_subset


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


def take_subset(dataset: Dataset, n: Optional[int], field: str) -> Dataset:
    """Return ``dataset`` cut to ``n`` class-balanced items (itself when ``n`` is None or covers it)."""
    if n is None:
        return dataset
    if n < 1:
        raise DistillError(f"{field}: must be >= 1, got {n}")
    if n >= len(dataset):
        return dataset
    return LabeledSubset(dataset, balanced_subset(dataset_targets(dataset), n))


def stratified_split(targets: Sequence[int], test_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
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


def dataset_root(dataset: Any) -> str:
    """Return where a dataset was read from, for messages ('?' when unknown)."""
    return str(getattr(dataset, "root", "?"))


def image_folders(root: Path, train_tf: Callable, eval_tf: Callable, require_tree: bool):
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
    try:
        with open(path, "rb") as handle:
            data = handle.read()  # one read: PIL parsing a file handle issues dozens of small ones
    except OSError as exc:
        raise unreadable(path, exc) from None
    return decode_image(data, path)


def decode_image(data: bytes, where: str):
    """Return the RGB PIL image encoded in ``data``; undecodable bytes are a DistillError naming ``where``."""
    import io

    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        return image.convert("RGB")  # decodes the whole file: truncation shows here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise unreadable(where, exc) from None


def unreadable(where: str, exc: Exception) -> DistillError:
    """Return the one-line error for an image at ``where`` that failed with ``exc``."""
    return DistillError(f"{where}: unreadable image ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")


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


def torchvision_cifar(info: Any, root: Path, train_tf: Callable, eval_tf: Callable,
                      download: bool) -> Tuple[Dataset, Dataset]:
    """Return torchvision's (train, test) CIFAR-10/100 of ``root`` (downloaded there when ``download``)."""
    from torchvision import datasets

    cls = getattr(datasets, info.torchvision_class)
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
