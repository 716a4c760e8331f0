"""Teacher consensus on the dark knowledge: a per-sample weight that the label's CE cannot give.

A teacher's dark knowledge is its distribution over the classes other than the label. The
confidence of Equ.(9) reads only the teacher's CE on the label, so a teacher whose top-1 and
CE are intact but whose non-label probabilities carry the wrong similarity structure (which
classes look like the label) keeps its full confidence weight. With three or more teachers
the others can outvote it: per sample i and teacher m,

    p_m   = softmax(z_m) renormalised over the classes != y_i   (T = 1, as Equ. 9's CE)
    D_m   = KL(p_m || mean_{k != m} p_k)                         (disagreement with the rest)
    a_m   = (1 - softmax_m(D)_m) / (M - 1)                       (Equ. 9's form, on D)

Rows of ``a`` sum to 1; equal disagreements give ``1 / M`` each, so ``a`` changes a prior
only where one teacher's dark knowledge stands apart from the others'. Under mixup (soft
targets) the label is each sample's largest target class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import hard_labels
from .camkd import confidence_weights

MIN_TEACHERS = 3  # fewer cannot outvote one: with two, each one's disagreement is the other's


def dark_disagreement(teacher_logits: Tensor, target: Tensor) -> Tensor:
    """Return ``D (M, B)``: each teacher's KL from the mean of the other teachers' distributions
    over the non-label classes (float32, without grad). ``teacher_logits (M, B, C)``, M >= 2."""
    m = teacher_logits.shape[0]
    with torch.no_grad():
        z = teacher_logits.detach().float()
        label = F.one_hot(hard_labels(target), z.shape[-1]).bool().unsqueeze(0)  # (1, B, C)
        log_p = F.log_softmax(z.masked_fill(label, float("-inf")), dim=-1)
        p = log_p.exp()
        others = (p.sum(0, keepdim=True) - p) / (m - 1)  # leave-one-out mean, (M, B, C)
        terms = p * (log_p - others.clamp_min(1e-30).log())
        return torch.where(label, torch.zeros_like(terms), terms).sum(-1)


def consensus_weights(teacher_logits: Tensor, target: Tensor) -> Tensor:
    """Return ``a = (1 - softmax_m(D)) / (M - 1)`` per sample, shape ``(B, M)``, rows summing to 1:
    Equ. 9 (:func:`~distill.policies.camkd.confidence_weights`) on :func:`dark_disagreement`.
    Raises ValueError for fewer than 3 teachers (two cannot outvote)."""
    m = teacher_logits.shape[0]
    if m < MIN_TEACHERS:
        raise ValueError(f"teacher consensus needs at least {MIN_TEACHERS} teachers to outvote one, got {m}")
    return confidence_weights(dark_disagreement(teacher_logits, target))


def consensus_prior(confidence: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
    """Return the confidence ``c (B, M)`` times :func:`consensus_weights`, rows renormalised to 1, ``(B, M)``."""
    w = confidence * consensus_weights(teacher_logits, target).to(confidence.dtype)
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)
