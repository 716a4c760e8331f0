"""The per-step quantities every loss and weighting policy reads, computed once per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import losses
from .registries import LOSSES
from .taps import pool_feature


@dataclass
class TeacherOutputs:
    """What the frozen pool produced for one batch (plain tensors, no autograd history)."""

    logits: Tensor  # (M, B, C)
    features: List[Tensor]  # per teacher: the feature-distillation target
    embeddings: List[Tensor]  # per teacher: pooled pre-logits (B, d_m)

    @property
    def num_teachers(self) -> int:
        """Return M."""
        return self.logits.shape[0]

    def _map(self, fn) -> "TeacherOutputs":
        features = [fn(f) for f in self.features]
        embeddings = [new if e is old else fn(e) for e, old, new in zip(self.embeddings, self.features, features)]
        return TeacherOutputs(fn(self.logits), features, embeddings)

    def to(self, device: torch.device, non_blocking: bool = False) -> "TeacherOutputs":
        """Return the outputs on ``device`` (an embedding that is its feature stays one tensor)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TeacherOutputs":
        """Return the outputs in pinned host memory (what a DataLoader with ``pin_memory`` calls)."""
        return self._map(lambda t: t.pin_memory())


@dataclass
class StudentOutputs:
    """What the trainable part produced for one batch (with autograd history)."""

    logits: Tensor  # (B, C)
    feature: Tensor  # the tapped student feature
    projected: List[Tensor]  # per teacher: r_m(feature), in teacher m's feature space
    embedding: Optional[Tensor] = None  # (B, d) the input of the student's linear classifier (None: not split)


@dataclass
class Signals:
    """Per-teacher, per-sample signals; every ``(M, B)`` tensor has teacher m in row m.

    ``kd`` and ``feat`` carry gradients (they are the loss terms); the others are detached.
    ``kl`` is ``T^2 KL(p_T || p_S)``, the KD term itself, detached (MTKD-RL-SPEC).
    """

    student_ce: Tensor  # (B,)  CE(student, y), with grad
    teacher_ce: Tensor  # (M, B) CE(teacher m, y)
    kd: Tensor  # (M, B) logit loss against teacher m (KD or DIST), with grad
    feat: Tensor  # (M, B) feature loss against teacher m, with grad
    cos: Tensor  # (M, B) cosine(pool(r_m(f_S)), pool(f_Tm))
    kl: Tensor  # (M, B) detached kd


def compute_signals(student: StudentOutputs, teachers: TeacherOutputs, target: Tensor,
                    temperature: float, logit_loss: str = "kd") -> Signals:
    """Return the :class:`Signals` of one step (the only place they are computed).

    ``logit_loss`` picks the per-teacher logit term ``kd`` from
    :data:`~distill.registries.LOSSES` (Hinton's KD ``"kd"``, DIST ``"dist"``, ...); ``kl``
    is ``T^2 KL(p_T || p_S)`` whatever it is (the MTKD-RL state needs it).
    """
    student_ce = losses.cross_entropy(student.logits, target)
    if logit_loss not in LOSSES:  # recipes are validated before: a caller's bug
        raise ValueError(f"logit_loss {logit_loss!r} is not one of {', '.join(LOSSES)}")
    logit_term = LOSSES[logit_loss]
    kd = logit_term(student.logits, teachers.logits, temperature)
    kl = None
    if logit_term is not losses.kd_loss:
        with torch.no_grad():
            kl = losses.kd_loss(student.logits, teachers.logits, temperature)
    feat = torch.stack([losses.fitnet_loss(p, f) for p, f in zip(student.projected, teachers.features)])
    with torch.no_grad():
        teacher_ce = losses.cross_entropy(teachers.logits, target)
        cos = torch.stack([F.cosine_similarity(pool_feature(p).float(), pool_feature(f).float(), dim=1)
                           for p, f in zip(student.projected, teachers.features)])
    return Signals(student_ce, teacher_ce, kd, feat, cos, kd.detach() if kl is None else kl)
