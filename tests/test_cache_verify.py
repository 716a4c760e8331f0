"""Opening a cache re-hashes only the files changed since their last passing check; `distill-cache verify` all."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import distill.cache.verify as verify
from distill.cache.store import open_cache
from distill.cli import cache_main
from distill.errors import DistillError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from imagenet_cache import write_synthetic_cache  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    root = tmp_path / "home" / "cache" / "teachers"
    root.mkdir(parents=True)
    built = write_synthetic_cache(root, images=96, views=2, teachers=2, top_k=3, classes=10, feature_dim=4,
                                  shard_images=32)  # 3 shards
    return built


@pytest.fixture
def hashed(monkeypatch):
    """The names of the files hashed since the test started."""
    names = []
    real = verify.file_sha256
    monkeypatch.setattr(verify, "file_sha256", lambda path: names.append(Path(path).name) or real(path))
    return names


def _flip_in_place(path):
    """Change one byte of ``path`` keeping its size, inode and modification time (bit rot)."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-3, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_open_hashes_only_files_changed_since_their_last_check(folder, hashed):
    shards = sorted(p.name for p in folder.glob("shard-*.safetensors"))
    assert len(shards) == 3
    open_cache(folder)
    assert sorted(hashed) == shards  # first open: every file
    recorded = json.loads((folder / verify.VERIFIED_FILE).read_text())
    assert sorted(recorded) == shards
    hashed.clear()
    open_cache(folder)
    assert hashed == []  # nothing changed: nothing hashed
    stat = (folder / shards[1]).stat()
    os.utime(folder / shards[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    open_cache(folder)
    assert hashed == [shards[1]]


def test_a_changed_file_is_refused_and_bit_rot_is_found_by_verify(folder, hashed, capsys):
    shards = sorted(folder.glob("shard-*.safetensors"))
    open_cache(folder)
    data = bytearray(shards[0].read_bytes())
    data[-3] ^= 0xFF
    stat = shards[0].stat()
    shards[0].write_bytes(bytes(data))  # rewritten in place (same inode and size) ...
    os.utime(shards[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # ... later: hashed at open
    with pytest.raises(DistillError, match="shard-00000.safetensors missing or failing their SHA-256"):
        open_cache(folder)
    data[-3] ^= 0xFF
    shards[0].write_bytes(bytes(data))  # restored
    open_cache(folder)

    _flip_in_place(shards[2])  # same size, inode and time: the open trusts its last check
    hashed.clear()
    open_cache(folder)
    assert hashed == []
    capsys.readouterr()
    assert cache_main(["verify", folder.name]) == 1  # verify hashes every file
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 3 files missing or failing their SHA-256: shard-00002.safetensors" in err
    with pytest.raises(DistillError, match="shard-00002"):  # and its finding outlives it
        open_cache(folder)

    with open(shards[1], "ab") as handle:
        handle.write(b"\0")  # another size: refused without hashing
    hashed.clear()
    with pytest.raises(DistillError, match="shard-00001.safetensors, shard-00002.safetensors"):
        open_cache(folder)
    assert hashed == ["shard-00002.safetensors"]


def test_verify_passes_a_whole_cache_and_a_read_only_folder_is_still_opened(folder, hashed, capsys, monkeypatch):
    assert cache_main(["verify", folder.name]) == 0
    assert "all 3 files match their SHA-256" in capsys.readouterr().out
    assert len(hashed) == 3
    (folder / verify.VERIFIED_FILE).unlink()

    def read_only(path, text):
        raise DistillError(f"{path}: read-only file system")

    monkeypatch.setattr(verify, "write_text", read_only)
    hashed.clear()
    assert len(open_cache(folder)) == 96 * 2 and len(hashed) == 3
    assert not (folder / verify.VERIFIED_FILE).exists()
    hashed.clear()
    open_cache(folder)
    assert len(hashed) == 3  # nothing remembered: hashed again
    assert cache_main(["verify", "0" * 32]) == 2
    assert "no finished teacher cache there" in capsys.readouterr().err


def test_a_cache_key_with_overrides_or_a_bad_target_is_one_error_line(folder, capsys):
    for command in ("verify", "info"):
        assert cache_main([command, folder.name, "data.train_subset=10"]) == 2  # overrides fit recipes only
        assert "apply to a recipe file, not to a cache key" in capsys.readouterr().err
        assert cache_main([command, "no-such-recipe.yaml"]) == 2
        assert "neither a recipe file nor a 32-digit cache key" in capsys.readouterr().err
    assert cache_main(["info", folder.name]) == 0 and folder.name in capsys.readouterr().out
