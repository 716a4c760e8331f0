"""Per-sample losses. Each returns one value per sample, shape ``(B,)`` (or ``(M,B)``
when teacher tensors carry a leading teacher axis); reductions happen in the Distiller.

The per-teacher logit terms a recipe chooses (``distill.logit_loss``) are registered in
:data:`distill.registries.LOSSES`, each called as ``loss(student_logits (B, C),
teacher_logits (M, B, C), temperature) -> (M, B)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registries import LOSSES


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Return the cross-entropy of ``logits (..., B, C)`` against ``target``, shape ``(..., B)``.

    ``target`` is either class indices ``(B,)`` or a soft distribution ``(B, C)`` (mixup,
    label smoothing); a leading teacher axis on ``logits`` broadcasts.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    if target.dtype in (torch.int64, torch.int32):
        index = target.expand(log_p.shape[:-1]).unsqueeze(-1)
        return -log_p.gather(-1, index).squeeze(-1)
    return -(target.float() * log_p).sum(-1)


def hard_labels(target: Tensor) -> Tensor:
    """Return class indices ``(B,)`` of a target as :func:`cross_entropy` takes it: ``target``
    itself, or the largest class of soft targets ``(B, C)`` (mixup, label smoothing)."""
    return target if target.dim() == 1 else target.argmax(-1)


@LOSSES.register("kd", help="Hinton's KD: T^2 KL(p_T ‖ p_S) at temperature T")
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Return Hinton's KD loss ``T^2 KL(p_T || p_S)`` at temperature ``T``, shape ``(..., B)``.

    ``student_logits (B, C)``; ``teacher_logits (B, C)`` or ``(M, B, C)`` (one value per
    teacher and sample). Teacher logits are treated as constants.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature**2


def fitnet_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Return FitNet's squared error, averaged over all non-batch dims, shape ``(B,)``.

    Both inputs have the same shape ``(B, ...)`` (the student's already projected into
    the teacher's space).
    """
    diff = student_feature.float() - teacher_feature.detach().float()
    return diff.pow(2).flatten(1).mean(1)


def _pearson_distance(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """Return ``1 - pearson(a, b)`` along ``dim`` (centred cosine similarity)."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return 1.0 - (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp_min(eps)


@LOSSES.register("dist", help="DIST (Huang et al. 2022): inter- and intra-class Pearson relations")
def dist_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
              inter: float = 1.0, intra: float = 1.0) -> Tensor:
    """Return DIST (Huang et al. 2022) per sample, shape ``(B,)`` or ``(M, B)``.

    With ``P_S = softmax(z_S / T)`` and ``P_T = softmax(z_T / T)`` (``(B, C)``):

    - inter-class relation of sample ``i``: ``1 - pearson_c(P_S[i, :], P_T[i, :])``, a
      per-sample quantity;
    - intra-class relation: ``(1/C) sum_j (1 - pearson_i(P_S[:, j], P_T[:, j]))``, a
      correlation *over the batch*, hence one number per batch (per teacher).

    Per-sample decomposition (our choice): the batch-level intra-class term is shared
    equally by every sample, so

        ``DIST[i] = T^2 * (inter * (1 - rho_inter[i]) + intra * L_intra)``

    and the batch mean of ``DIST[i]`` is exactly DIST's batch loss
    ``T^2 (inter * mean_i(1 - rho_inter[i]) + intra * L_intra)``. Per-sample teacher weights
    therefore weight the inter-class term sample by sample and the intra-class term by their
    batch mean. ``student_logits (B, C)``; ``teacher_logits (B, C)`` or ``(M, B, C)``
    (treated as constants; a leading teacher axis gives one value per teacher and sample).
    """
    p_s = F.softmax(student_logits.float() / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    p_s = p_s.expand_as(p_t)
    inter_term = _pearson_distance(p_s, p_t, dim=-1)  # (..., B)
    intra_term = _pearson_distance(p_s, p_t, dim=-2).mean(-1, keepdim=True)  # (..., 1)
    return temperature**2 * (inter * inter_term + intra * intra_term)


def mixture_log_probs(teacher_logits: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """Return ``log p_mix = logsumexp_m(log w_m + log softmax(z_Tm / T))``, shape ``(B, C)``.

    ``teacher_logits (M, B, C)``; ``weights`` per teacher ``(M,)`` or per sample ``(B, M)``,
    non-negative, normalised here to sum to 1 over teachers (a zero weight drops the
    teacher exactly: ``log 0 = -inf``).
    """
    w = weights.detach().float()
    w = w / w.sum(-1, keepdim=True)
    log_w = torch.log(w).view(-1, 1, 1) if w.ndim == 1 else torch.log(w).t().unsqueeze(-1)  # (M, 1|B, 1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return torch.logsumexp(log_w + log_p, dim=0)


def mixture_kd_loss(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor,
                    temperature: float) -> Tensor:
    """Return ``T^2 KL(p_mix || p_S)`` at temperature ``T`` against the teachers' mixture, shape ``(B,)``.

    ``p_mix`` is :func:`mixture_log_probs` (weighted mixture of the teachers' tempered
    distributions, in log space). With one teacher, or weights ``(1, 0, ...)``, this equals
    :func:`kd_loss` against that teacher. Classes where ``p_mix = 0`` contribute 0.
    """
    log_q = mixture_log_probs(teacher_logits, weights, temperature)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    q = log_q.exp()
    return torch.where(q > 0, q * (log_q - log_s), torch.zeros_like(q)).sum(-1) * temperature**2
