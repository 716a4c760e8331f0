"""MTKD-RL actions (Equ. 9-14): the executed generator weight, divergence terms and their fusion."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("equ12", "gated")
STEP_WEIGHTS = ("conf", "prior_logit", "div_logit", "div_feat")  # the per-step weights an episode keeps


def refine_priors(step: Dict[str, Tensor], device: torch.device) -> Tuple[Tensor, Tensor]:
    """Return ``fusion: refine``'s priors ``(B, M)`` of the logit and feature levels, float32 on
    ``device``: a step's confidence ``conf`` at both, or ``prior_logit`` (``prior: consensus``) at the logit level."""
    conf = step["conf"].to(device, torch.float32)
    return step.get("prior_logit", conf).to(device, torch.float32), conf


def floored(pi: Tensor, floor: float) -> Tensor:
    """Return the executed generator weight ``(1 - eps) pi + eps / M`` (rows sum to 1), ``(B, M)``."""
    return (1.0 - floor) * pi + floor / pi.shape[1]


def divergence_weights(values: Tensor) -> Tensor:
    """Return ``softmax_m(values)`` per sample, ``(B, M)``, from ``values (M, B)`` (Equ. 11 / 12)."""
    return F.softmax(values.detach().float(), dim=0).t()


def gated_divergence(divergence: Tensor, confidence: Tensor) -> Tensor:
    """Return the divergence weights restricted to confident teachers, ``(B, M)``, rows summing to 1:
    ``d * c / sum_m (d * c)``. A teacher that is wrong on the label (``c ~ 0``) gets no
    divergence weight however unlike the student it is; with equal confidence this is ``d``."""
    gated = divergence * confidence
    return gated / gated.sum(1, keepdim=True).clamp_min(1e-12)


def fuse(gammas: Tensor, generator: Tensor, confidence: Tensor, divergence: Tensor) -> Tensor:
    """Return Equ.(13)/(14) ``gamma_g * g + gamma_c * c + gamma_d * d``; ``gammas (3,)``, others ``(B, M)``."""
    return gammas[0] * generator + gammas[1] * confidence + gammas[2] * divergence


def parse_gammas(gammas: Any, default: List[float]) -> List[List[float]]:
    """Return ``[[logit g, c, d], [feat g, c, d]]`` from a policy argument (``default`` for
    missing rows); raise ValueError."""
    if gammas is None:
        return [list(default), list(default)]
    if isinstance(gammas, dict):
        unknown = set(gammas) - {"logit", "feat"}
        if unknown:
            raise ValueError(f"policy 'mtkd_rl': gammas takes keys logit and feat, not {sorted(unknown)}")
        rows = [gammas.get("logit"), gammas.get("feat")]
        rows = [list(default) if r is None else r for r in rows]
    else:
        rows = [gammas, gammas]
    for row in rows:
        if (not isinstance(row, (list, tuple)) or len(row) != 3
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in row)):
            raise ValueError(f"policy 'mtkd_rl': gammas must be 3 non-negative numbers [generator, "
                             f"confidence, divergence] (or a mapping logit/feat of such), got {gammas!r}")
        if abs(sum(row) - 1.0) > 1e-6:
            raise ValueError(f"policy 'mtkd_rl': gammas {list(row)} must sum to 1 so weights sum to 1")
    return [[float(v) for v in row] for row in rows]
