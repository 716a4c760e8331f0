"""distill.data and distill.paths: datasets, subsets, transforms, samplers, loaders, errors."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from PIL import Image  # noqa: E402

from distill import data, paths  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.recipe import DataConfig  # noqa: E402

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _tree(root: Path, layout: dict) -> Path:
    """Write tiny PNGs: layout maps 'split/class' to a number of images (0: an empty folder)."""
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 30 % 256, 100, 200)).save(root / folder / f"{i}.png")
    return root


# ----------------------------------------------------------------------------- paths


def test_paths_follow_distill_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    assert paths.distill_home() == tmp_path / "home"
    assert paths.weights_dir() == tmp_path / "home" / "weights"
    assert paths.datasets_dir() == tmp_path / "home" / "datasets"
    assert not (tmp_path / "home").exists()  # created lazily, by callers
    monkeypatch.delenv("DISTILL_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert paths.distill_home() == tmp_path / "user" / ".cache" / "distill"


# ----------------------------------------------------------------------------- digits


def test_digits_bundle_shapes_sizes_and_fixed_split():
    torch.manual_seed(1)
    a = data.build_data(DataConfig(dataset="digits"))
    torch.manual_seed(2)  # the split must not depend on the global RNG (nor the recipe seed)
    b = data.build_data(DataConfig(dataset="digits"))
    assert a.num_classes == 10 and a.class_names == [str(i) for i in range(10)]
    assert a.input_size == (1, 8, 8)
    assert (len(a.train), len(a.val)) == (1438, 359)
    x, y = a.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(a.train.images, b.train.images) and a.train.targets == b.train.targets
    assert torch.equal(a.val.images, b.val.images) and a.val.targets == b.val.targets
    # stratified: every class has ~20% of its images in the test split
    counts = collections.Counter(a.val.targets)
    assert sorted(counts) == list(range(10)) and all(35 <= c <= 37 for c in counts.values())
    # the two splits are disjoint: no test image appears among the training images
    train_rows = {tuple(r) for r in a.train.images.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in a.val.images.flatten(1).tolist())
    assert overlap <= 5  # (a handful of digits are pixel-identical duplicates in the dataset)


def test_digits_normalised_with_training_statistics():
    bundle = data.build_data(DataConfig(dataset="digits"))
    x = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3
    assert abs(bundle.mean[0] - 0.3059) < 1e-3 and abs(bundle.std[0] - 0.3765) < 1e-3
    raw = bundle.train.images[0]  # [0, 1] pixels
    assert float(raw.min()) >= 0.0 and float(raw.max()) <= 1.0
    custom = data.build_data(DataConfig(dataset="digits", mean=[0.5], std=[0.25]))
    assert custom.mean == (0.5,) and custom.std == (0.25,)
    assert torch.allclose(custom.train[0][0], (raw - 0.5) / 0.25)


def test_digits_input_size_and_augment():
    bundle = data.build_data(DataConfig(dataset="digits", input_size=16, augment="cifar"))
    assert bundle.input_size == (1, 16, 16) and bundle.train[0][0].shape == (1, 16, 16)
    draws = [bundle.train[3][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random crop / flip
    assert torch.equal(bundle.val[3][0], bundle.val[3][0])
    with pytest.raises(DistillError, match="data.augment"):
        data.build_data(DataConfig(dataset="digits", augment="timm"))


# ----------------------------------------------------------------------------- cifar10 from JPEGs


def test_cifar10_from_jpeg_tree(cifar10_jpeg_root):
    bundle = data.build_data(DataConfig(dataset="cifar10", root=str(cifar10_jpeg_root), download=False))
    assert bundle.num_classes == 10 and bundle.class_names == CIFAR10_CLASSES
    assert bundle.input_size == (3, 32, 32)
    assert bundle.mean == (0.4914, 0.4822, 0.4465) and bundle.std == (0.2470, 0.2435, 0.2616)
    assert (len(bundle.train), len(bundle.val)) == (2000, 10000)
    path = cifar10_jpeg_root / "test" / "cat" / "0000.jpg"
    index = [p for p, _ in bundle.val.samples].index(str(path))
    x, y = bundle.val[index]
    assert y == 3 and x.shape == (3, 32, 32) and x.dtype == torch.float32
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    expected = (pixels - torch.tensor(bundle.mean).view(3, 1, 1)) / torch.tensor(bundle.std).view(3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-5)
    truck = [p for p, t in bundle.val.samples if t == 9]
    assert len(truck) == 1000 and all("/truck/" in p for p in truck)


def test_cifar_augment_is_random_and_eval_deterministic(cifar10_jpeg_root):
    bundle = data.build_data(DataConfig(dataset="cifar10", root=str(cifar10_jpeg_root), augment="auto"))
    torch.manual_seed(0)
    draws = [bundle.train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert all(d.shape == (3, 32, 32) for d in draws)
    plain = data.build_data(DataConfig(dataset="cifar10", root=str(cifar10_jpeg_root), augment="none"))
    assert torch.equal(plain.train[0][0], plain.train[0][0])
    assert torch.equal(bundle.val[5][0], bundle.val[5][0])
    big = data.build_data(DataConfig(dataset="cifar10", root=str(cifar10_jpeg_root), input_size=48, val_subset=10))
    assert big.input_size == (3, 48, 48) and big.train[0][0].shape == (3, 48, 48) and big.val[0][0].shape == (3, 48, 48)


def test_subset_is_balanced_deterministic_and_decodes_nothing(cifar10_jpeg_root, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded while choosing the subset")

    cfg = DataConfig(dataset="cifar10", root=str(cifar10_jpeg_root), train_subset=50, val_subset=95)
    with monkeypatch.context() as m:
        m.setattr(Image, "open", no_decoding)
        torch.manual_seed(0)
        a = data.build_data(cfg)
        torch.manual_seed(1)
        b = data.build_data(cfg)
    assert isinstance(a.train, torch.utils.data.Subset) and len(a.train) == 50 and len(a.val) == 95
    assert a.train.indices == b.train.indices and a.val.indices == b.val.indices
    assert collections.Counter(data.dataset_targets(a.train)) == {c: 5 for c in range(10)}
    assert sorted(collections.Counter(data.dataset_targets(a.val)).values()) == [9] * 5 + [10] * 5
    assert a.num_classes == 10 and a.class_names == CIFAR10_CLASSES
    assert a.train.indices != list(range(50))  # shuffled within classes, not the first files
    x, y = a.val[0]
    assert x.shape == (3, 32, 32) and y == a.val.targets[0]


def test_balanced_subset_with_uneven_classes():
    targets = [0] * 3 + [1] * 10 + [2] * 10
    chosen = data.balanced_subset(targets, 15)
    counts = collections.Counter(targets[i] for i in chosen)
    assert counts == {0: 3, 1: 6, 2: 6} and len(set(chosen)) == 15
    assert data.balanced_subset(targets, 15) == chosen


# ----------------------------------------------------------------------------- errors


def test_missing_root_without_download_names_data_root(tmp_path):
    root = tmp_path / "nothing_here"
    with pytest.raises(DistillError) as err:
        data.build_data(DataConfig(dataset="cifar10", root=str(root), download=False))
    message = str(err.value)
    assert "data.root" in message and str(root) in message
    assert "cifar-10-batches-py" in message and "train" in message and "test" in message


def test_default_root_is_under_distill_home():
    with pytest.raises(DistillError) as err:
        data.build_data(DataConfig(dataset="cifar100", download=False))
    assert str(paths.datasets_dir() / "cifar100") in str(err.value)


def test_download_failure_and_corrupt_torchvision_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    calls = []

    def offline(url, root, **kwargs):
        calls.append((url, root))
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DistillError, match="cannot download CIFAR-10.*network unreachable"):
        data.build_data(DataConfig(dataset="cifar10", download=True))
    assert calls and "cifar-10-python.tar.gz" in calls[0][0]
    assert Path(calls[0][1]) == paths.datasets_dir() / "cifar10"  # the default root, under DISTILL_HOME

    root = tmp_path / "c100"
    (root / "cifar-100-python").mkdir(parents=True)  # torchvision's folder, but no valid files
    with pytest.raises(DistillError, match="cannot read CIFAR-100") as err:
        data.build_data(DataConfig(dataset="cifar100", root=str(root), download=False))
    assert str(root) in str(err.value)


def test_empty_class_folder_is_named(tmp_path):
    root = _tree(tmp_path / "imgs", {"train/a": 2, "train/b": 0, "test/a": 1, "test/b": 1})
    with pytest.raises(DistillError) as err:
        data.build_data(DataConfig(dataset="imagefolder", root=str(root)))
    assert str(root / "train" / "b") in str(err.value)


def test_missing_split_folder_is_named(tmp_path):
    root = _tree(tmp_path / "imgs", {"train/a": 1, "train/b": 1})
    with pytest.raises(DistillError, match="test/"):
        data.build_data(DataConfig(dataset="imagefolder", root=str(root)))


def test_wrong_class_count_for_cifar10(tmp_path):
    root = _tree(tmp_path / "c10", {f"{split}/{c}": 1 for split in ("train", "test") for c in "abc"})
    with pytest.raises(DistillError, match=r"10 classes.*3 class folders"):
        data.build_data(DataConfig(dataset="cifar10", root=str(root), download=False))


def test_mismatched_class_folders(tmp_path):
    root = _tree(tmp_path / "imgs", {"train/a": 1, "train/b": 1, "val/a": 1, "val/c": 1})
    with pytest.raises(DistillError, match="missing: b; extra: c"):
        data.build_data(DataConfig(dataset="imagefolder", root=str(root)))


def test_imagefolder_tree(tmp_path):
    root = _tree(tmp_path / "imgs", {"train/cat": 3, "train/dog": 2, "val/cat": 1, "val/dog": 1})
    bundle = data.build_data(DataConfig(dataset="imagefolder", root=str(root), input_size=16))
    assert bundle.num_classes == 2 and bundle.class_names == ["cat", "dog"]
    assert bundle.input_size == (3, 16, 16) and bundle.mean == data.IMAGENET_MEAN
    assert bundle.train[4][0].shape == (3, 16, 16) and bundle.train[4][1] == 1
    assert bundle.val[0][0].shape == (3, 16, 16)


def test_imagefolder_skips_hidden_folders_and_files(tmp_path):
    root = _tree(tmp_path / "imgs", {"train/cat": 3, "train/dog": 2, "val/cat": 1, "val/dog": 1,
                                     "train/.ipynb_checkpoints": 0, "train/cat/.ipynb_checkpoints": 4,
                                     "val/.git/objects": 2})
    Image.new("RGB", (8, 8)).save(root / "train" / "dog" / ".hidden.png")
    bundle = data.build_data(DataConfig(dataset="imagefolder", root=str(root), input_size=16))
    assert bundle.class_names == ["cat", "dog"] and len(bundle.train) == 5 and len(bundle.val) == 2
    assert [Path(p).name for p, _ in bundle.train.samples] == ["0.png", "1.png", "2.png", "0.png", "1.png"]


# ----------------------------------------------------------------------------- samplers and loaders


def test_epoch_sampler_orders():
    a, b = data.EpochSampler(100, shuffle=True, seed=7), data.EpochSampler(100, shuffle=True, seed=7)
    for epoch in range(4):  # a's history must not matter
        a.set_epoch(epoch)
        list(a)
    a.set_epoch(5)
    b.set_epoch(5)
    order = list(a)
    assert order == list(b) and order == list(a)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    b.set_epoch(6)
    assert list(b) != order
    other_seed = data.EpochSampler(100, shuffle=True, seed=8)
    other_seed.set_epoch(5)
    assert list(other_seed) != order
    assert list(data.EpochSampler(10, shuffle=False, seed=7)) == list(range(10)) and len(a) == 100


def test_train_loader_is_reproducible_and_eval_loader_complete():
    bundle = data.build_data(DataConfig(dataset="digits", augment="cifar", train_subset=200))
    loader = data.build_loader(bundle.train, 32, train=True, num_workers=0, seed=3)
    assert len(loader) == 200 // 32  # drop_last

    def epoch(ld, e):
        ld.sampler.set_epoch(e)
        return [(x, y) for x, y in ld]

    first = epoch(loader, 1)
    torch.manual_seed(123)  # the global RNG does not change the data
    again = epoch(loader, 1)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again))
    assert not torch.equal(epoch(loader, 2)[0][0], first[0][0])
    assert all(x.shape == (32, 1, 8, 8) for x, _ in first)

    ev = data.build_loader(bundle.val, 64, train=False, num_workers=0, seed=3)
    labels = torch.cat([y for _, y in ev]).tolist()
    assert labels == bundle.val.targets and len(labels) == 359


def test_train_loader_same_batches_with_workers():
    bundle = data.build_data(DataConfig(dataset="digits", augment="cifar", train_subset=64))
    ref = data.build_loader(bundle.train, 16, train=True, num_workers=0, seed=0)
    par = data.build_loader(bundle.train, 16, train=True, num_workers=2, seed=0)
    assert par.persistent_workers and not ref.persistent_workers
    for e in (0, 1):
        ref.sampler.set_epoch(e)
        par.sampler.set_epoch(e)
        for (x1, y1), (x2, y2) in zip(ref, par):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
