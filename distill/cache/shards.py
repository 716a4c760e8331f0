"""Cache shards read row by row: a tensor spread over shard files, read on demand.

A shard is a plain safetensors file (8-byte little-endian header length, a JSON header
giving each tensor's dtype, shape and byte range, then the bytes). :class:`ShardFile`
reads the header once and then single rows with ``pread`` into the caller's buffer, so a
lookup reads exactly its rows' bytes and a process holds nothing of the cache between
lookups (the kernel's page cache, shared by every process, keeps what is hot). Floating
rows are checked as they are read: a non-finite value is refused naming the shard file and
the tensor (checking every shard at open would read the whole cache).
:class:`Shards` knows which shard holds which images; :class:`ShardedArray` is one
tensor's rows across every shard. Files open lazily in each process (a pickled array
opens them again in a DataLoader worker).

Why not ``mmap``: a mapped page stays in the process's resident set until unmapped, and a
kernel with large page-cache folios maps a whole folio (up to megabytes) on one fault, so
touching a few rows of each shard put whole shards in the resident set (measured: +30 MiB
per 64-key lookup on a 34 MB cache).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import DistillError
from ..fileio import require_finite

DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
          "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}


def read_header(path: Path) -> Tuple[int, Dict[str, Any]]:
    """Return ``(offset of the data, {name: {dtype, shape, data_offsets}})`` of a safetensors file."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise DistillError(f"{path}: truncated teacher-cache shard")
        (length,) = struct.unpack("<Q", head)
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise DistillError(f"{path}: unreadable teacher-cache shard header ({exc})") from None
    header.pop("__metadata__", None)
    return 8 + length, header


class ShardFile:
    """One shard file, read row by row with ``pread`` (opened lazily in each process)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data_start, self.header = read_header(self.path)
        self._fd: Optional[int] = None

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def rows(self, name: str, index: np.ndarray, out: np.ndarray) -> None:
        """Read rows ``index (n,)`` of tensor ``name`` (rows along its first two dims) into ``out (n, ...)``."""
        info = self.header[name]
        width = out[0].nbytes if len(out) else 0
        base = self.data_start + info["data_offsets"][0]
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = self._descriptor()
        for j, row in enumerate(index.tolist()):
            if os.preadv(fd, [view[j * width:(j + 1) * width]], base + row * width) != width:
                raise DistillError(f"{self.path}: teacher-cache shard is shorter than its header says")

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_fd": None}  # a descriptor does not pickle: the worker opens the file again

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


class Shards:
    """The mapped shards of a cache and their row ranges: which shard holds which rows."""

    def __init__(self, paths: Sequence[Path], images: Sequence[int], views: int):
        self.files = [ShardFile(p) for p in paths]
        self.views = int(views)
        self.image_starts = np.cumsum([0, *images])  # first image of each shard, and the total

    def group(self, images: np.ndarray) -> List[Tuple[int, np.ndarray, np.ndarray]]:
        """Return ``(shard, positions in the batch, images within the shard)`` for images ``(B,)``."""
        if images.size and (images.min() < 0 or images.max() >= self.image_starts[-1]):
            raise IndexError(f"teacher cache images {images.min()}..{images.max()} outside "
                             f"0..{self.image_starts[-1] - 1}")
        which = np.searchsorted(self.image_starts, images, side="right") - 1
        order = np.argsort(which, kind="stable")
        bounds = np.flatnonzero(np.diff(which[order])) + 1
        groups = []
        for positions in np.split(order, bounds) if images.size else []:
            shard = int(which[positions[0]])
            groups.append((shard, positions, images[positions] - self.image_starts[shard]))
        return groups


class ShardedArray:
    """Tensor ``name`` ``(n, K, ...)`` across shards, read on demand by key ``i * K + v`` or by image ``i``."""

    def __init__(self, shards: Shards, name: str):
        self.shards, self.name = shards, name
        first = shards.files[0].header.get(name)
        for shard in shards.files:
            info = shard.header.get(name)
            if info is None:
                raise DistillError(f"{shard.path}: teacher-cache shard has no tensor {name}")
            if info["shape"][1:] != first["shape"][1:] or info["dtype"] != first["dtype"]:
                raise DistillError(f"{shard.path}: tensor {name} is {info['dtype']} {info['shape']}, "
                                   f"other shards {first['dtype']} {first['shape']}")
        self.views = int(first["shape"][1])
        self.row_shape: List[int] = list(first["shape"][2:])
        self.np_dtype = np.dtype(DTYPES[first["dtype"]])

    @property
    def shape(self) -> Tuple[int, ...]:
        """Return the shape of the whole tensor ``(N, K, ...)``."""
        return (int(self.shards.image_starts[-1]), self.views, *self.row_shape)

    @property
    def nbytes(self) -> int:
        """Return the tensor's size in bytes on disk (none of it is resident until read)."""
        return int(np.prod(self.shape)) * self.np_dtype.itemsize

    def read(self, groups: List[Tuple[int, np.ndarray, np.ndarray]], views: Optional[np.ndarray],
             count: int) -> Tensor:
        """Return the rows of grouped images (:meth:`Shards.group`): view ``views[b]`` of each, or all views."""
        shape = (count, *self.row_shape) if views is not None else (count, self.views, *self.row_shape)
        out = np.empty(shape, dtype=self.np_dtype)
        for shard, positions, images in groups:
            part = np.empty((len(positions), *shape[1:]), dtype=self.np_dtype)
            if views is not None:  # row (image, view) of the (n, K, ...) tensor
                self.shards.files[shard].rows(self.name, images * self.views + views[positions], part)
            else:  # all K views of the image: K consecutive rows
                rows = (images[:, None] * self.views + np.arange(self.views)).reshape(-1)
                self.shards.files[shard].rows(self.name, rows, part.reshape(-1, *self.row_shape))
            if self.np_dtype.kind == "f":  # a shard written from non-finite outputs: refused where it is read
                require_finite({self.name: torch.from_numpy(part)}, self.shards.files[shard].path)
            out[positions] = part
        return torch.from_numpy(out)

    def take(self, keys: Tensor) -> Tensor:
        """Return rows ``keys (B,)`` (key ``i * K + v``) as a new tensor ``(B, ...)``; only their pages are read."""
        images, views = np.divmod(keys.cpu().numpy().astype(np.int64), self.views)
        groups = self.shards.group(images)
        return self.read(groups, views, len(images))

    def __getitem__(self, index: Any) -> Tensor:
        """Return ``array[i]`` ``(K, ...)`` or ``array[i, v, ...]`` for an int image ``i`` (read on demand)."""
        head, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        groups = self.shards.group(np.array([int(head)], dtype=np.int64))
        row = self.read(groups, None, 1)[0]
        return row[rest] if rest else row
