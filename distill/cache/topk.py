"""Top-k soft labels: what the cache keeps of a teacher's logits, and how they come back.

Per row (one teacher, one view) the cache keeps, for the run's KD temperature ``T``:

- the ``k`` largest logits (fp16) and their class ids;
- ``tail``: ``T * logsumexp(z_j / T)`` over the other ``C - k`` classes (fp32), the
  log of the tail's mass at temperature ``T`` in logit units;
- ``label_logit``: the logit of the item's label ``z_y`` (fp32), and the label itself.

:func:`reconstruct_logits` rebuilds logits ``(..., C)``: the top-k values in place, the
label's logit in place when the label is outside the top-k, and every other class at one
value ``fill`` chosen so that the tail's mass at temperature ``T`` is exact::

    (C - k - [y in tail]) * exp(fill / T) + [y in tail] * exp(z_y / T) = exp(tail / T)

What is exact and what is not, for ``softmax(logits / T)`` (KD, DIST, the mixtures):
the top-k probabilities, the label's probability and the tail's total mass are the
teacher's exactly (up to the fp16 rounding of the top-k logits); the shape of the tail
(which of the other classes carry more of its mass) is lost and is spread uniformly.
That shape is what remains approximate: the KD value and its gradient on the tail classes
(``tests/test_cache_tails.py`` measures and bounds both). For ``softmax(logits)`` (the teacher
CE, entropies, confidences at temperature 1) the label's logit is exact, and the
normaliser is exact up to the tail's mass at temperature 1, which the uniform fill
understates (power-mean inequality; the test bounds the CE error). At ``T = 1`` the
normaliser, and therefore the teacher CE, is exact.

With ``k = C`` nothing is dropped: only the values and ids are stored, and the temperature
plays no part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# exp((z_y - tail) / T) is <= 1 mathematically; rounding can reach it: keep the rest of the tail positive
_LABEL_SHARE_LIMIT = 1.0 - 1e-6


def class_id_dtype(num_classes: int) -> torch.dtype:
    """Return the smallest integer dtype holding class ids below ``num_classes``."""
    return torch.int16 if num_classes <= 2**15 else torch.int32


@dataclass
class SoftLabels:
    """A teacher's stored outputs for a batch of rows ``(...)``.

    ``values`` fp16 ``(..., k)``, ``ids`` ``(..., k)``; with ``k < C`` also ``tail`` fp32
    ``(...)``, ``labels`` ``(...)`` and ``label_logit`` fp32 ``(...)`` (module docstring).
    """

    values: Tensor
    ids: Tensor
    tail: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    label_logit: Optional[Tensor] = None


def topk_soft_labels(logits: Tensor, k: int, temperature: Optional[float], labels: Tensor) -> SoftLabels:
    """Return the :class:`SoftLabels` of ``logits (..., C)`` for labels ``(...)`` (broadcast) at ``temperature``.

    ``temperature`` may be None only when ``k = C`` (no tail is stored).
    """
    logits = logits.float()
    num_classes = logits.shape[-1]
    values, ids = logits.topk(k, dim=-1)
    out = SoftLabels(values.half(), ids.to(class_id_dtype(num_classes)))
    if k < num_classes:
        if temperature is None:
            raise ValueError(f"top-{k} soft labels of {num_classes} classes need the temperature of their tail")
        labels = labels.long().expand(logits.shape[:-1])
        tail = logits.scatter(-1, ids, float("-inf"))
        out.tail = (tail / temperature).logsumexp(-1) * temperature
        out.labels = labels.to(class_id_dtype(num_classes))
        out.label_logit = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return out


def reconstruct_logits(soft: SoftLabels, num_classes: int, temperature: Optional[float]) -> Tensor:
    """Return float32 logits ``(..., C)`` of stored soft labels (see the module docstring)."""
    values, ids = soft.values.float(), soft.ids.long()
    k = values.shape[-1]
    if soft.tail is None:
        if k != num_classes:
            raise ValueError(f"top-{k} soft labels of {num_classes} classes need their tail mass")
        out = torch.empty(*values.shape[:-1], num_classes, dtype=torch.float32, device=values.device)
        return out.scatter_(-1, ids, values)
    if soft.labels is None or soft.label_logit is None or temperature is None:
        raise ValueError("top-k soft labels with a tail need their labels, label logits and temperature")
    tail, labels, label_logit = soft.tail.float(), soft.labels.long(), soft.label_logit.float()
    in_tail = ~(ids == labels.unsqueeze(-1)).any(-1)  # (...)
    share = torch.where(in_tail, ((label_logit - tail) / temperature).exp().clamp(max=_LABEL_SHARE_LIMIT),
                        torch.zeros_like(tail))  # the label's part of the tail mass
    others = (num_classes - k) - in_tail.float()  # tail classes filled uniformly
    fill = tail + temperature * (torch.log1p(-share) - others.clamp(min=1).log())
    out = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).clone()
    label_value = torch.where(in_tail, label_logit, fill).unsqueeze(-1)
    out.scatter_(-1, labels.unsqueeze(-1), label_value)
    return out.scatter_(-1, ids, values)

