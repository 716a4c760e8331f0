"""The weighting-policy interface; policies register in :data:`distill.registries.POLICIES`.

A policy turns the step's :class:`~distill.signals.Signals` into per-sample teacher
weights for the logit and feature terms of Equ.(2). Weights are ``(B, M)``, each row sums
to 1 (or is 0 where a policy switches a level off), and enter the student loss detached. A
new policy is one file with one ``@register_policy`` class (its ``name`` is the registry key).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Type, TypeVar

import torch
from torch import Tensor, nn

from ..errors import close_matches
from ..registries import POLICIES
from ..signals import Signals, StudentOutputs, TeacherOutputs

P = TypeVar("P", bound=Type["WeightingPolicy"])
TeacherHead = Callable[[Tensor], Tensor]  # teacher m's head: a feature in its space -> logits (B, C), no grad


def register_policy(cls: P) -> P:
    """Class decorator: register ``cls`` in :data:`POLICIES` under ``cls.name``."""
    return POLICIES.register(cls.name)(cls)


@dataclass
class Weights:
    """Teacher weights for one batch; rows sum to 1."""

    logit: Tensor  # (B, M)
    feat: Tensor  # (B, M)


class WeightingPolicy(nn.Module):
    """Base class. Subclasses set ``name`` and implement :meth:`weights`.

    Lifecycle: ``bind_heads(...)`` then ``setup(...)`` once when the Distiller is built; per
    epoch ``begin_epoch(e)``, then per step ``weights(...)`` -> (loss, backward, optimiser
    step) -> ``observe(...)``, then ``end_epoch(e)``.
    Learnable state lives in parameters / buffers so it is checkpointed with
    ``state_dict()``; anything else goes through ``get_extra_state``.
    """

    name: ClassVar[str] = ""

    def __init__(self, num_teachers: int):
        super().__init__()
        self.num_teachers = num_teachers

    @classmethod
    def check_args(cls, args: Dict[str, Any]) -> None:
        """Raise ValueError if ``args`` holds a key the constructor does not take."""
        params = inspect.signature(cls.__init__).parameters
        known = [p for p in params if p not in ("self", "num_teachers")]
        for key in args:
            if key not in known:
                raise ValueError(f"policy {cls.name!r} takes no argument {key!r}"
                                 f"{close_matches(key, known)}; it takes: {', '.join(known) or 'none'}")

    def bind_heads(self, heads: Sequence[TeacherHead]) -> None:
        """Called by the Distiller just before :meth:`setup` with each teacher's head, pool
        order (:meth:`distill.teachers.TeacherPool.heads`): ``head(feature) -> logits (B, C)``
        under ``torch.no_grad()``, ``feature`` shaped like that teacher's tapped feature (a
        projected student feature fits). The default ignores them; a policy that scores
        features with the teachers' classifiers (``camkd``) keeps them in a plain list, never
        as submodules, so no teacher weight enters its ``state_dict``."""

    def bind_student(self, projectors: Sequence[nn.Module], classifier: Optional[nn.Linear]) -> None:
        """Called by the Distiller once its trainable part is built with the projectors ``r_m``
        (pool order) and the student's linear classifier (None unless the student's logits are
        exactly ``classifier(embedding)``, :attr:`distill.taps.TappedModel.split_head`). The
        default ignores them; a policy that differentiates the terms per sample (``mtkd_rl``)
        keeps them in plain lists, never as submodules (they are the trainable part's)."""

    def setup(self, teachers: TeacherOutputs, alpha: float = 1.0, beta: float = 5.0,
              temperature: float = 4.0, logit_loss: str = "kd") -> None:
        """Called once by the Distiller with the pool's outputs on a dummy batch (shapes:
        ``C``, each ``d_m``) and the loss settings of Equ.(2), before any step or resume.
        Policies with shape-dependent parts (an agent) build them here."""

    def weights(self, signals: Signals, teachers: TeacherOutputs, student: StudentOutputs,
                target: Tensor) -> Weights:
        """Return the teacher :class:`Weights` ``(B, M)`` for this step."""
        raise NotImplementedError

    def logit_term(self, weights: Weights, signals: Signals, teachers: TeacherOutputs,
                   student: StudentOutputs, temperature: float) -> Tensor:
        """Return the per-sample logit-distillation term ``sum_m w_l[:, m] KD_m``, shape ``(B,)``."""
        return (weights.logit * signals.kd.t()).sum(1)

    def feature_term(self, weights: Weights, signals: Signals) -> Tensor:
        """Return the per-sample feature-distillation term ``sum_m w_f[:, m] FEAT_m``, shape ``(B,)``."""
        return (weights.feat * signals.feat.t()).sum(1)

    def begin_epoch(self, epoch: int) -> None:
        """Called before the first step of ``epoch`` (0-based)."""

    def observe(self, signals: Signals, weights: Weights, teachers: TeacherOutputs,
                student: StudentOutputs, target: Tensor) -> None:
        """Called after each (micro-)batch's backward, before the next ``weights`` call, with its
        (detached) signals and weights."""

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        """Called after the last step of ``epoch``; returns metrics for ``summary.csv``."""
        return {}


def uniform_weights(batch: int, num_teachers: int, like: Tensor) -> Tensor:
    """Return equal weights ``1/M``, shape ``(B, M)``, on ``like``'s device."""
    return torch.full((batch, num_teachers), 1.0 / num_teachers, device=like.device)


def build_policy(name: str, num_teachers: int, args: Dict[str, Any]) -> WeightingPolicy:
    """Return the registered policy ``name`` for ``num_teachers`` teachers (unknown: RecipeError naming
    ``distill.policy``)."""
    cls = POLICIES.get(name, "distill.policy")
    cls.check_args(args)
    return cls(num_teachers, **args)
