"""Top-k soft labels: what the cache keeps of a teacher's logits, and how they come back.

Per row the cache keeps the ``k`` largest logits (fp16), their class ids, and ``rest``,
the log-sum-exp of the other ``C - k`` logits (fp32). :func:`reconstruct_logits` rebuilds
logits ``(..., C)``: the top-k values in place and every other class at
``rest - log(C - k)``. At temperature 1 their softmax is the teacher's top-k probabilities
exactly, with the remaining mass ``1 - sum top-k`` spread uniformly over the other classes;
at temperature ``T`` it is the softmax of those logits over ``T`` (the top-k ratios exact,
the others uniform). KD, the teacher CE and the teacher-student KL all read these logits.
With ``k = C`` nothing is dropped and ``rest`` is not stored.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def class_id_dtype(num_classes: int) -> torch.dtype:
    """Return the smallest integer dtype holding class ids below ``num_classes``."""
    return torch.int16 if num_classes <= 2**15 else torch.int32


def topk_soft_labels(logits: Tensor, k: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Return ``(values fp16 (..., k), class ids (..., k), rest fp32 (...) or None when k = C)``."""
    logits = logits.float()
    num_classes = logits.shape[-1]
    values, ids = logits.topk(k, dim=-1)
    rest = None
    if k < num_classes:
        rest = logits.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return values.half(), ids.to(class_id_dtype(num_classes)), rest


def reconstruct_logits(values: Tensor, ids: Tensor, rest: Optional[Tensor], num_classes: int) -> Tensor:
    """Return float32 logits ``(..., C)`` of stored top-k soft labels (see the module docstring)."""
    k = values.shape[-1]
    if rest is None:
        if k != num_classes:
            raise ValueError(f"top-{k} soft labels of {num_classes} classes need their rest mass")
        out = torch.empty(*values.shape[:-1], num_classes, dtype=torch.float32, device=values.device)
    else:
        fill = rest.float() - math.log(num_classes - k)
        out = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, ids.long(), values.float())
