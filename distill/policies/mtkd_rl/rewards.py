"""MTKD-RL rewards and agent objectives, one pair per variant (pure functions).

Shapes: B batch, M teachers. ``(M, B)`` signals have teacher m in row m; rewards,
advantages and policies are ``(B, M)``.

- ``paper`` (Equ. 6-8): :func:`paper_rewards`, :func:`normalise_rewards`, :func:`paper_loss`.
- ``official`` (the authors' code): :func:`official_rewards`, :func:`official_loss`.
- ``align`` (``shared/MTKD-RL-SPEC.md``, "Amendment: a variant that learns"):
  :func:`alignment_rewards`, :func:`advantages`, :func:`align_loss`, :func:`align_loss_bounds`;
  with ``reward: heldout`` the logit level's reward is :func:`heldout_rewards` (:mod:`.heldout`).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ...distributed import is_distributed
from ...signals import Signals, StudentOutputs, TeacherOutputs
from ..base import Weights
from .heldout import HeldoutGradient
from .persample import PerSampleTerms, per_sample_terms

ADVANTAGE_EPS = 1e-6


# ----------------------------------------------------------------------------- paper


def paper_rewards(signals: Signals, alpha: float, beta: float) -> Tensor:
    """Return Equ.(6) ``R[i, m] = -CE_S[i] - alpha KD[i, m] - beta FEAT[i, m]``, shape ``(B, M)``."""
    ce = signals.student_ce.detach().float()
    return -ce.unsqueeze(1) - alpha * signals.kd.detach().float().t() - beta * signals.feat.detach().float().t()


def normalise_rewards(rewards: Tensor) -> Tensor:
    """Return Equ.(8) as the SPEC reads it, shape ``(B, M)``: per-sample min-max over teachers,
    then minus the mean of the min-max-normalised values; 0 where max = min."""
    low = rewards.min(1, keepdim=True).values
    span = rewards.max(1, keepdim=True).values - low
    scaled = torch.where(span > 0, (rewards - low) / span.clamp_min(torch.finfo(rewards.dtype).tiny),
                         torch.zeros_like(rewards))
    return scaled - scaled.mean(1, keepdim=True)


def paper_loss(rewards: Tensor, log_l: Tensor, log_f: Tensor, pg_form: str) -> Tensor:
    """Return the paper's agent loss (scalar) from raw Equ.(6) rewards ``(B, M)`` and the log
    weights of both levels ``(B, M)``: ``-mean_i sum_m Rbar (log w_l + log w_f)`` (``pg_form:
    log``, no minimum) or ``-mean_i sum_m Rbar (w_l + w_f)`` (``prob``, Equ. 7 as printed)."""
    rbar = normalise_rewards(rewards)
    if pg_form == "prob":
        return -(rbar * (log_l.exp() + log_f.exp())).sum(1).mean()
    return -(rbar * (log_l + log_f)).sum(1).mean()


# ----------------------------------------------------------------------------- official


def official_rewards(signals: Signals, weights: Weights, alpha: float, beta: float) -> Tuple[Tensor, Tensor]:
    """Return the authors' per-sample reward ``(raw r, rhat)``, each ``(B,)``.

    ``r = -(CE + alpha sum_m w_l KD + beta sum_m w_f FEAT)``; ``rhat`` = r z-scored over the
    batch (population std + 1e-8) and clamped to [0, 1].
    """
    kd = (weights.logit.float() * signals.kd.detach().float().t()).sum(1)
    feat = (weights.feat.float() * signals.feat.detach().float().t()).sum(1)
    raw = -(signals.student_ce.detach().float() + alpha * kd + beta * feat)
    z = (raw - raw.mean()) / (raw.std(correction=0) + 1e-8)
    return raw, z.clamp(0.0, 1.0)


def official_loss(rhat: Tensor, log_l: Tensor, log_f: Tensor) -> Tensor:
    """Return the authors' agent loss ``-mean_{i,m} rhat_i (log w_l + log w_f)`` (scalar); its
    optimum is uniform weights."""
    return -(rhat.unsqueeze(1) * (log_l + log_f)).mean()


# ----------------------------------------------------------------------------- align


def _gradient_rows(objective: Tensor, wrt: Tensor, retain: bool = True) -> Optional[Tensor]:
    """Return ``grad(objective.sum(), wrt)`` as float32 rows ``(B, D)``, or None where
    ``objective`` does not depend on ``wrt``. ``retain`` keeps the graph (the step's: its
    backward still runs; one shared by several objectives)."""
    (grad,) = torch.autograd.grad(objective.sum(), wrt, retain_graph=retain, allow_unused=True)
    return None if grad is None else grad.detach().float().flatten(1)


def _per_teacher_cosine(reference: Optional[Tensor], terms: Iterable[Tensor], wrt: Tensor, count: int,
                        retain: bool = True) -> Tensor:
    """Return ``cos(reference[i], grad_wrt terms[m])[i]`` per sample, shape ``(B, M)``.

    ``reference (B, D)``: sample i's CE gradient in row i (None: the CE does not depend on
    ``wrt``, so no term can help it there: all 0). ``terms``: ``count`` losses, one per teacher,
    whose gradient with respect to ``wrt (B, ...)`` has sample i's own gradient in row i
    (per-sample terms ``(B,)`` with no coupling between samples, or objectives built for it,
    :mod:`.persample`); ``retain: False`` when each has a graph of its own, freed once used. A
    term that does not depend on ``wrt`` gets 0.
    """
    batch = wrt.shape[0]
    if reference is None:
        return torch.zeros(batch, count, device=wrt.device)
    cols = []
    for term in terms:
        grad = _gradient_rows(term, wrt, retain)
        cols.append(reference.new_zeros(batch) if grad is None
                    else F.cosine_similarity(reference, grad, dim=1, eps=1e-12))
    return torch.stack(cols, dim=1)


def alignment_rewards(signals: Signals, student: StudentOutputs, terms: Optional[PerSampleTerms] = None
                      ) -> Tuple[Tensor, Tensor]:
    """Return the align rewards ``(u_l, u_f)``, each ``(B, M)`` in ``[-1, 1]``.

    Does a step on teacher m's term lower the student's label loss? To first order, by the
    cosine between the per-sample gradients of the student's CE and of that term:
    ``u_l = cos(grad_z CE, grad_z KD_m)`` on the student logits ``z`` (for Hinton KD this is
    ``cos(p_S - y, p_S^T - p_Tm^T)``; soft targets replace ``y`` under mixup) and
    ``u_f = cos(grad_f CE, grad_f FEAT_m)`` on the student's tapped feature ``f`` (through the
    student's head and projector m). Needs the step's autograd graph (called before backward).
    Where the student's CE does not depend on the tapped feature (a class-token ViT tapped at
    ``last_map``: its head reads the class token, the feature is the patch tokens) ``u_f = 0``
    for every teacher, so the feature-level advantages are 0 and that policy stays uniform.

    ``terms`` (:func:`.persample.per_sample_terms`, what the policy uses inside a Distiller):
    the teachers' gradients are sample i's own gradients (BatchNorm statistics of the
    projectors as constants, DIST's batch term once). Without it they are taken on the step's
    graph, sample i's own only where the terms couple no samples (KD; projectors without
    BatchNorm). The CE's gradients come from the step's graph either way (the student's head
    after the tap is per-sample: pooling and a linear classifier).
    """
    return logit_alignment(signals, student, terms), feature_alignment(signals, student, terms)


def _check_graph(tensor: Tensor, name: str) -> None:
    if not tensor.requires_grad:
        raise ValueError(f"policy 'mtkd_rl' (variant align): the student's {name} carry no autograd graph; "
                         "its reward is computed inside the training step, before backward")


def logit_alignment(signals: Signals, student: StudentOutputs, terms: Optional[PerSampleTerms] = None) -> Tensor:
    """Return ``u_l = cos(grad_z CE, grad_z KD_m)`` per sample, ``(B, M)`` (:func:`alignment_rewards`)."""
    _check_graph(student.logits, "logits")
    with torch.enable_grad():
        reference = _gradient_rows(signals.student_ce, student.logits)
        if terms is None:
            return _per_teacher_cosine(reference, signals.kd, student.logits, len(signals.kd))
        return _per_teacher_cosine(reference, terms.logit_objective, terms.logits, len(signals.kd))


def feature_alignment(signals: Signals, student: StudentOutputs, terms: Optional[PerSampleTerms] = None) -> Tensor:
    """Return ``u_f = cos(grad_f CE, grad_f FEAT_m)`` per sample, ``(B, M)`` (:func:`alignment_rewards`)."""
    _check_graph(student.feature, "feature")
    with torch.enable_grad():
        reference = _gradient_rows(signals.student_ce, student.feature)
        if terms is None:
            return _per_teacher_cosine(reference, signals.feat, student.feature, len(signals.feat))
        return _per_teacher_cosine(reference, terms.feature_objectives(), terms.feature, len(signals.feat),
                                   retain=False)


def heldout_rewards(terms: PerSampleTerms, embedding: Optional[Tensor], heldout: HeldoutGradient) -> Tensor:
    """Return ``reward: heldout``'s logit-level rewards ``(B, M)`` (:mod:`.heldout`): per sample
    and teacher, the held-out CE decrease per unit learning rate of a step on that teacher's
    term, in the student classifier's parameter space; ``embedding (B, d)`` is the classifier's
    input (None: the student's logits are not a linear classifier of it, which this reward needs)."""
    if embedding is None:
        raise ValueError("policy 'mtkd_rl': reward heldout needs a student whose logits are its linear "
                         "classifier applied to the pooled pre-logits (no head dropout)")
    with torch.enable_grad():
        grads = torch.stack([_gradient_rows(t, terms.logits) for t in terms.logit_objective])  # (M, B, C)
    return heldout.rewards(grads, embedding)


def align_step_rewards(signals: Signals, teachers: TeacherOutputs, student: StudentOutputs,
                       projectors: Optional[Sequence[nn.Module]], temperature: float, logit_loss: str,
                       heldout: Optional[HeldoutGradient]) -> Tensor:
    """Return variant align's rewards of one step, ``(2, B, M)`` (levels logit, feat).

    With ``projectors`` (bound by the Distiller) every teacher gradient is exactly per sample
    (:func:`.persample.per_sample_terms`); without, taken on the step's graph. The logit level
    is :func:`logit_alignment` (``heldout`` None, ``reward: align``) or :func:`heldout_rewards`
    (``reward: heldout``, which needs the projectors bound); the feature level is
    :func:`feature_alignment` either way.
    """
    terms = None
    if projectors is not None:
        terms = per_sample_terms(student, teachers, projectors, temperature, logit_loss)
    if heldout is None:
        u_l = logit_alignment(signals, student, terms)
    elif terms is None:
        raise ValueError("policy 'mtkd_rl': reward heldout needs the student's projectors and classifier: "
                         "call bind_student(...) first (the Distiller does)")
    else:
        u_l = heldout_rewards(terms, student.embedding, heldout)
    return torch.stack([u_l, feature_alignment(signals, student, terms)])


def batch_std(rewards: Tensor) -> Tensor:
    """Return the population std of all of ``rewards``' entries (a 0-d tensor); inside a
    torch.distributed job, of the global batch (count, sum and sum of squares all-reduced)."""
    u = rewards.double()
    moments = torch.stack([u.new_tensor(float(u.numel())), u.sum(), u.pow(2).sum()])
    if is_distributed():
        dist.all_reduce(moments)
    count, total, squares = moments
    return (squares / count - (total / count).pow(2)).clamp_min(0).sqrt().float()


def advantages(rewards: Tensor, std: Optional[Tensor] = None) -> Tensor:
    """Return ``A = (u - mean_m u) / (std_batch(u) + 1e-6)``, shape ``(B, M)``, from rewards ``(B, M)``.

    Centred per sample (only differences between teachers matter) and scaled by the
    population std of all the batch's rewards (``std``, default :func:`batch_std`), so
    teachers that are equally useful get ``A = 0`` exactly and numerical noise is not blown up.
    """
    u = rewards.float()
    scale = batch_std(u) if std is None else std
    return (u - u.mean(1, keepdim=True)) / (scale + ADVANTAGE_EPS)


def entropy(log_pi: Tensor) -> Tensor:
    """Return the entropy of each row of a categorical policy given ``log pi (B, M)``, shape ``(B,)``."""
    return -(log_pi.exp() * log_pi).sum(1)


def align_loss(log_pi: Tensor, adv: Tensor, tau: float) -> Tensor:
    """Return the all-actions policy-gradient loss ``-mean_i [sum_m pi A + tau H(pi)]`` (scalar)
    for one level: ``log pi (B, M)`` with graph, ``adv (B, M)`` constants. Per state its
    minimiser is ``softmax(A / tau)``; it is bounded (:func:`align_loss_bounds`)."""
    return -((log_pi.exp() * adv).sum(1) + tau * entropy(log_pi)).mean()


def align_loss_bounds(adv: Tensor, tau: float) -> Tuple[float, float]:
    """Return ``(low, high)`` with ``low <= align_loss(., adv, tau) <= high`` for every policy:
    ``-(max|A| + tau log M) <= L <= max|A|``."""
    top = float(adv.abs().max()) if adv.numel() else 0.0
    return -(top + tau * math.log(adv.shape[1])), top
