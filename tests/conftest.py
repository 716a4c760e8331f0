"""Shared fixtures: offline data from ../shared/data and an isolated DISTILL_HOME per test."""

from __future__ import annotations

import tarfile
import time
from pathlib import Path, PurePosixPath

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_JPG = SHARED_DATA / "cifar10-jpg.tar.gz"
TRAIN_PER_CLASS = 200  # first images (by file name) of each class kept from train/


@pytest.fixture(autouse=True)
def _isolated_distill_home(tmp_path, monkeypatch):
    """Point $DISTILL_HOME at a per-test folder so no test writes to ~/.cache."""
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "distill_home"))


def _safe_parts(name: str):
    """Return the (split, class, file) parts of a tar member name, or None if it is not one."""
    path = PurePosixPath(name)
    if path.is_absolute():
        return None
    parts = path.parts
    if len(parts) != 3 or parts[0] not in ("train", "test") or any(p in ("", ".", "..") for p in parts):
        return None
    return parts


def extract_cifar10_jpg(tarball: Path, dest: Path, train_per_class: int = TRAIN_PER_CLASS) -> Path:
    """Extract test/ whole and the first ``train_per_class`` files (by name) of each train/ class.

    Reads the gzip stream once (``r|gz``); only regular files at ``split/class/file``
    are written, by this function (never tarfile's extractor), so nothing can land outside
    ``dest``.
    """
    kept = {}  # train class -> [(name, bytes)], trimmed to the smallest names as it grows
    with tarfile.open(tarball, mode="r|gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = _safe_parts(member.name)
            if parts is None:
                continue
            data = tar.extractfile(member).read()
            if parts[0] == "test":
                target = dest.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            else:
                bucket = kept.setdefault(parts[1], [])
                bucket.append((parts[2], data))
                if len(bucket) >= 2 * train_per_class:
                    bucket.sort()
                    del bucket[train_per_class:]
    for cls, bucket in kept.items():
        bucket.sort()
        folder = dest / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in bucket[:train_per_class]:
            (folder / name).write_bytes(data)
    return dest


@pytest.fixture(scope="session")
def cifar10_jpeg_root(tmp_path_factory) -> Path:
    """A folder holding CIFAR-10 JPEGs: ``test/`` (10,000) and ``train/`` (200 per class)."""
    if not CIFAR10_JPG.is_file():
        pytest.skip(f"offline CIFAR-10 JPEG tarball not found: {CIFAR10_JPG}")
    dest = tmp_path_factory.mktemp("cifar10_jpg")
    start = time.perf_counter()
    extract_cifar10_jpg(CIFAR10_JPG, dest)
    print(f"\nextracted CIFAR-10 JPEG subset in {time.perf_counter() - start:.2f}s")
    return dest
