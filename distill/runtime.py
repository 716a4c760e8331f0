"""Where and how a run computes: device, seeds, determinism and precision (autocast).

The lowest layer of the training code: the step, the engine and the teacher cache all read
it, and it imports nothing of the toolkit beyond its errors.
"""

from __future__ import annotations

import contextlib
import random
from typing import Optional

import numpy as np
import torch

from .errors import DistillError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """Return the torch device for a recipe's ``run.device`` (``auto``: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"run.device={name}: CUDA is not available on this machine")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Return ``fp32`` / ``bf16`` / ``fp16`` for a recipe's ``run.precision`` on ``device``
    (``auto``: bf16 on CUDA when supported, else fp32)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Return the autocast dtype for ``precision`` on ``device`` (None: full fp32)."""
    return PRECISIONS[resolve_precision(precision, device)]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Return an autocast context for ``dtype``, or a null context for fp32 (None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Return the RNG seed of ``epoch``: every epoch is reproducible on its own (exact resume)."""
    return seed * 100_003 + epoch


def set_deterministic(enabled: bool) -> None:
    """Switch deterministic kernels on or off (cudnn autotuning is their opposite)."""
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
