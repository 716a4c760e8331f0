"""A finished cache's files checked against the SHA-256s its index records.

Hashing every shard at every open costs minutes on a large cache (16.8 GB for ImageNet with
features), and once per rank under torchrun. So a check that passed is remembered:
``verified.json`` in the cache folder records, for each file that matched, its size,
modification time and inode at that moment. :func:`bad_files` checks every file's presence
and size always and re-hashes only the files that changed since they were verified (rebuilt,
repaired, replaced, written to) or were never verified. ``full=True`` (``distill-cache
verify``) re-hashes every file: the check to run after copying a cache, or when the disk is
suspected of corrupting bytes without touching a file's size or time.
"""

from __future__ import annotations

import hashlib
import json
import stat as stat_mode
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import DistillError
from ..fileio import write_text

VERIFIED_FILE = "verified.json"


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def checked_records(index: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Return the index's file records (every shard's, then the sketch's): ``file``, ``bytes``, ``sha256``."""
    return [*index["shards"], *([index["sketch"]] if "sketch" in index else [])]


def _identity(path: Path) -> Optional[List[int]]:
    """Return a regular file's ``[size, mtime_ns, inode]`` from one ``stat``; None when it is no file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino] if stat_mode.S_ISREG(stat.st_mode) else None


def _read_verified(folder: Path) -> Dict[str, Any]:
    try:
        verified = json.loads((folder / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: every file is hashed again
    return verified if isinstance(verified, dict) else {}


def bad_files(folder: Path, index: Dict[str, Any], full: bool = False) -> List[str]:
    """Return the names of the index's files (shards, sketch) in ``folder`` that are missing,
    of another size than recorded, or fail their SHA-256; hashes only the files changed since
    their last passing check unless ``full``. Records the files that passed (``verified.json``)."""
    recorded = _read_verified(folder)
    before = {} if full else recorded
    verified: Dict[str, Any] = {}
    bad = []
    for record in checked_records(index):
        name = record["file"]
        path = folder / name
        identity = _identity(path)
        if identity is None or ("bytes" in record and identity[0] != record["bytes"]):
            bad.append(name)
            continue
        seen = {"identity": identity, "sha256": record["sha256"]}
        if before.get(name) == seen or file_sha256(path) == record["sha256"]:
            verified[name] = seen
        else:
            bad.append(name)
    if verified != recorded:  # files that failed leave the record: the next open hashes them again
        try:
            write_text(folder / VERIFIED_FILE, json.dumps(verified, indent=1, sort_keys=True))
        except DistillError:
            pass  # a read-only cache folder stays usable; its files are hashed at each open
    return bad
