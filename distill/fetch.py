"""Every network fetch the tools make (timm weight URLs, the Hugging Face Hub, dataset
downloads): offline mode, and one-line errors that say what was fetched, why it failed and
how to work without the network.

``--offline`` / ``--no-download`` on every command enter :func:`offline`: huggingface_hub
is put in offline mode (``HF_HUB_OFFLINE``) and :func:`is_offline` tells the weight and
dataset loaders to use local files only. timm's URL downloads go through
``torch.hub.download_url_to_file``, which writes ``<name>.<uuid>.partial`` and renames it
into place: a failed download leaves nothing under the final name, and two runs
downloading the same file at once each rename a complete copy.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.error
from pathlib import Path
from typing import Iterator, Optional

from .errors import DistillError
from .paths import weights_dir

_offline = False
NETWORK_ERRORS = (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError)


def is_offline() -> bool:
    """Return True inside :func:`offline` or when ``HF_HUB_OFFLINE`` is set: no download is attempted."""
    from huggingface_hub import constants

    return _offline or bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """Within the block, use local files only: timm URLs, the Hub (``HF_HUB_OFFLINE``) and datasets."""
    global _offline
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    saved_env, saved_hub, saved = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE, _offline
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    _offline = True
    try:
        yield
    finally:
        _offline, constants.HF_HUB_OFFLINE = saved, saved_hub
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _timm_pretrained_cfg(spec: str):
    """Return timm's pretrained config of ``spec``, or None when ``spec`` is no timm name (Hub id, file)."""
    import timm
    from timm.models import get_pretrained_cfg

    if spec.startswith(("hf-hub:", "local-dir:")) or "/" in spec or not timm.is_model(spec):
        return None
    return get_pretrained_cfg(spec)


def weights_url_file(spec: str) -> Optional[Path]:
    """Return where the URL-hosted pretrained weights of timm name ``spec`` are cached (None: not URL-hosted)."""
    cfg = _timm_pretrained_cfg(spec)
    if cfg is None or cfg.hf_hub_id or not cfg.url:
        return None
    return weights_dir() / Path(cfg.url).name


def weights_reachable_offline(spec: str) -> Optional[bool]:
    """Return whether a timm ``arch.tag``'s pretrained weights are in a local cache.

    False when they are certainly not (so an offline run skips the doomed download); None
    when that cannot be told (Hub specs, files: just try).
    """
    import torch

    cfg = _timm_pretrained_cfg(spec)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, n), str) for n in names):
            return True
    for url in (cfg.url, cfg.file):
        if url and (Path(url).is_file() or any((d / Path(url).name).is_file()
                                               for d in (weights_dir(), Path(torch.hub.get_dir()) / "checkpoints"))):
            return True
    return False


def offline_hint(spec: str) -> str:
    """Return how to provide the weights of ``spec`` without the network (where to put the file)."""
    local = weights_url_file(spec)
    if local is not None:
        return f"to work offline put the file at {local}"
    return ("to work offline fill the Hugging Face cache once online and set HF_HUB_OFFLINE=1, "
            "or give weights: FILE")


def require_local_weights(spec: str, where: str) -> None:
    """When offline, raise DistillError if the pretrained weights of ``spec`` are certainly not local."""
    if is_offline() and weights_reachable_offline(spec) is False:
        raise DistillError(f"{where}: {spec}: pretrained weights are not in the local cache and downloads are off "
                           f"(--offline / --no-download / HF_HUB_OFFLINE); {offline_hint(spec)}")


@contextlib.contextmanager
def weight_download(spec: str, where: str) -> Iterator[None]:
    """Turn a failed weight download for ``spec`` into one DistillError line with the offline hint."""
    try:
        yield
    except NETWORK_ERRORS as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DistillError(f"{where}: {spec}: cannot download the pretrained weights ({type(exc).__name__}: "
                           f"{' '.join(str(reason).split())[:200]}); {offline_hint(spec)}") from None


def dataset_hint(label: str, root: Path) -> str:
    """Return how to provide dataset ``label`` without the network."""
    return f"to work offline put the {label} files in {root} (or give data.root / --data-dir) and use --no-download"
