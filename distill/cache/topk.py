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

With a sketch (:mod:`distill.cache.sketch`: per teacher a mean and a rank-``r`` basis of its
logits, per row ``r`` fp16 coefficients) the other tail classes are not one value: each
gets its sketched logit ``z~_j`` (the row's logits projected on the basis) plus one offset
``delta`` per row, chosen so that their mass at ``T`` is still exactly the stored one::

    sum_j exp((z~_j + delta) / T) = exp(tail / T) - [y in tail] * exp(z_y / T)

The tail's shape then comes from the sketch; what remains approximate is the part of the
logits outside the rank-``r`` subspace (``benchmarks/cache_tails.py`` measures both fills).

With ``k = C`` nothing is dropped: only the values and ids are stored, and the temperature
plays no part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .sketch import Sketch, sketch_coefficients, sketch_logits

# exp((z_y - tail) / T) is <= 1 mathematically; rounding can reach it: keep the rest of the tail positive
_LABEL_SHARE_LIMIT = 1.0 - 1e-6


def class_id_dtype(num_classes: int) -> torch.dtype:
    """Return the smallest integer dtype holding class ids below ``num_classes``."""
    return torch.int16 if num_classes <= 2**15 else torch.int32


@dataclass
class SoftLabels:
    """A teacher's stored outputs for a batch of rows ``(...)``.

    ``values`` fp16 ``(..., k)``, ``ids`` ``(..., k)``; with ``k < C`` also ``tail`` fp32
    ``(...)``, ``labels`` ``(...)`` and ``label_logit`` fp32 ``(...)``, and with a sketch its
    ``coefficients`` fp16 ``(..., r)`` (module docstring).
    """

    values: Tensor
    ids: Tensor
    tail: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    label_logit: Optional[Tensor] = None
    coefficients: Optional[Tensor] = None


def topk_soft_labels(logits: Tensor, k: int, temperature: Optional[float], labels: Tensor,
                     sketch: Optional[Sketch] = None) -> SoftLabels:
    """Return the :class:`SoftLabels` of ``logits (..., C)`` for labels ``(...)`` (broadcast) at ``temperature``.

    ``temperature`` may be None only when ``k = C`` (no tail is stored). With ``sketch``
    (mean ``(..., C)``, basis ``(..., C, r)`` aligned with the trailing teacher dims of
    ``logits``) each row's coefficients are kept too (only when ``k < C``).
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
        if sketch is not None:
            out.coefficients = sketch_coefficients(logits, sketch.to(logits.device)).half()
    return out


def reconstruct_logits(soft: SoftLabels, num_classes: int, temperature: Optional[float],
                       sketch: Optional[Sketch] = None) -> Tensor:
    """Return float32 logits ``(..., C)`` of stored soft labels (see the module docstring).

    ``sketch`` (on the soft labels' device) must be given exactly when they carry coefficients.
    """
    values, ids = soft.values.float(), soft.ids.long()
    k = values.shape[-1]
    if soft.tail is None:
        if k != num_classes:
            raise ValueError(f"top-{k} soft labels of {num_classes} classes need their tail mass")
        out = torch.empty(*values.shape[:-1], num_classes, dtype=torch.float32, device=values.device)
        return out.scatter_(-1, ids, values)
    if soft.labels is None or soft.label_logit is None or temperature is None:
        raise ValueError("top-k soft labels with a tail need their labels, label logits and temperature")
    if (soft.coefficients is None) != (sketch is None):
        raise ValueError("sketch coefficients and their sketch come together")
    tail, labels, label_logit = soft.tail.float(), soft.labels.long(), soft.label_logit.float()
    in_tail = ~(ids == labels.unsqueeze(-1)).any(-1)  # (...)
    share = torch.where(in_tail, ((label_logit - tail) / temperature).exp().clamp(max=_LABEL_SHARE_LIMIT),
                        torch.zeros_like(tail))  # the label's part of the tail mass
    others = (num_classes - k) - in_tail.float()  # the other tail classes
    target = tail + temperature * torch.log1p(-share)  # their log-mass at T, in logit units
    if sketch is None:  # uniform: every other class at one value
        fill = target - temperature * others.clamp(min=1).log()
        out = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).clone()
    else:  # the sketched logits, shifted so that the others' mass at T is the target
        shape = sketch_logits(soft.coefficients, sketch)  # (..., C)
        hidden = shape.scatter(-1, ids, float("-inf")).scatter(-1, labels.unsqueeze(-1), float("-inf"))
        spread = (hidden / temperature).logsumexp(-1) * temperature
        out = shape + torch.where(others > 0, target - spread, torch.zeros_like(target)).unsqueeze(-1)
    out.scatter_(-1, labels.unsqueeze(-1), label_logit.unsqueeze(-1))  # a label in the top-k: overwritten next
    return out.scatter_(-1, ids, values)
