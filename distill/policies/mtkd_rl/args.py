"""The ``mtkd_rl`` policy's arguments: choices, per-variant defaults and validation."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from ..consensus import MIN_TEACHERS
from .action import DIVERGENCES, parse_gammas

VARIANTS = ("align", "paper", "official")
PG_FORMS = ("log", "prob")
STATE_NORMS = ("none", "running")
REWARDS = ("align", "heldout")  # variant align's reward at the logit level (.rewards, .heldout); default heldout
# align's two ways to combine the agent with the confidence prior c: 2/3 g + 1/3 c (Equ. 13-14 without
# the divergence term) or softmax(log c + mu_theta(s)) (the agent refines c; exactly c at initialisation;
# the default)
FUSIONS = ("mix", "refine")
# refine's logit-level prior: Equ. 9's confidence, the confidence times the teachers' consensus on the
# dark knowledge (..consensus; it needs M >= 3 to outvote one teacher), or auto (the default): consensus
# where it applies (fusion refine, M >= 3), else the confidence. The feature level's prior is the
# confidence either way
PRIORS = ("auto", "confidence", "consensus")
NOT_REFINE = ("gammas", "divergence", "learnable_gammas")
BUFFER_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# arguments whose default depends on the variant (None in the signature means "the variant's")
VARIANT_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "align": {"lr": 0.01, "momentum": 0.9, "max_grad_norm": 1.0, "state_norm": "running",
              "gammas": [2 / 3, 1 / 3, 0.0], "buffer_dtype": "float32", "reward": "heldout", "fusion": "refine"},
    "paper": {"lr": 0.1, "momentum": 0.0, "max_grad_norm": 0.0, "state_norm": "none", "gammas": [1 / 3] * 3,
              "buffer_dtype": "bfloat16", "reward": None, "fusion": "mix"},
    "official": {"lr": 0.1, "momentum": 0.0, "max_grad_norm": 0.0, "state_norm": "none", "gammas": [1 / 3] * 3,
                 "buffer_dtype": "bfloat16", "reward": None, "fusion": "mix"},
}
ALIGN_ONLY = ("floor", "tau", "kl_limit", "reward", "fusion", "prior")
NOT_ALIGN = ("learnable_gammas",)


def check_mtkd_args(args: Dict[str, Any]) -> None:
    """Raise ValueError for a bad value or a key the variant does not use (unknown keys are
    the base class's check)."""
    args = {k: v for k, v in args.items() if v is not None}

    def integer(key: str, low: int) -> None:
        v = args.get(key, low)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"policy 'mtkd_rl': {key} must be an integer >= {low}, got {v!r}")

    def number(key: str, low: float, high: float = math.inf, open_low: bool = False) -> None:
        if key not in args:
            return
        v = args[key]
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not (low <= v <= high) \
            or (open_low and v == low)
        if bad:
            rng = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
            raise ValueError(f"policy 'mtkd_rl': {key} must be a number {rng}, got {v!r}")

    choice_args = (("variant", VARIANTS), ("state_norm", STATE_NORMS), ("buffer_dtype", tuple(BUFFER_DTYPES)),
                   ("pg_form", PG_FORMS), ("divergence", DIVERGENCES), ("reward", REWARDS),
                   ("fusion", FUSIONS), ("prior", PRIORS))
    for key, choices in choice_args:
        if key in args and args[key] not in choices:
            raise ValueError(f"policy 'mtkd_rl': {key} must be one of {', '.join(choices)}, got {args[key]!r}")
    variant = args.get("variant", "align")
    for key in ("hidden", "buffer", "update_every"):
        integer(key, 1)
    for key in ("warmup_epochs", "seed"):
        integer(key, 0)
    for key in ("lr", "warmup_weight", "tau", "kl_limit"):
        number(key, 0.0, open_low=True)
    for key in ("momentum", "weight_decay", "max_grad_norm"):
        number(key, 0.0)
    number("floor", 0.0, 1.0)
    if variant == "align":
        wrong = [k for k in NOT_ALIGN if args.get(k)] + (["pg_form"] if args.get("pg_form", "log") != "log" else [])
    else:
        wrong = [k for k in ALIGN_ONLY if k in args]
        if variant == "official" and args.get("pg_form", "log") != "log":
            wrong.append("pg_form")
    if wrong:
        raise ValueError(f"policy 'mtkd_rl': {', '.join(wrong)} does not apply to variant {variant}")
    fusion = args.get("fusion", VARIANT_DEFAULTS[variant]["fusion"])
    if fusion == "refine":
        wrong = [k for k in NOT_REFINE if k in args and args[k] is not False]
        if wrong:
            given = "" if "fusion" in args else " (the default; give fusion: mix for the gammas of Equ. 13-14)"
            raise ValueError(f"policy 'mtkd_rl': {', '.join(wrong)} does not apply to fusion refine{given} "
                             "(its weights are softmax(log c + mu), no gammas)")
    if args.get("prior", "confidence") != "confidence" and fusion != "refine":
        raise ValueError(f"policy 'mtkd_rl': prior {args['prior']} applies to fusion refine (the prior inside "
                         "softmax(log prior + mu)), not to fusion mix (whose prior is the confidence)")
    if not isinstance(args.get("learnable_gammas", False), bool):
        raise ValueError("policy 'mtkd_rl': learnable_gammas must be true or false, "
                         f"got {args['learnable_gammas']!r}")
    rows = parse_gammas(args.get("gammas"), VARIANT_DEFAULTS[variant]["gammas"])
    if args.get("learnable_gammas") and any(v <= 0 for row in rows for v in row):
        raise ValueError("policy 'mtkd_rl': learnable_gammas needs every initial gamma > 0")
    if "divergence" in args and all(row[2] == 0 for row in rows) and not args.get("learnable_gammas"):
        raise ValueError(f"policy 'mtkd_rl': divergence {args['divergence']!r} has no effect: the divergence "
                         "gamma is 0 at both levels (give gammas with a divergence share)")


def resolve_prior(prior: Optional[str], fusion: str, num_teachers: int) -> str:
    """Return the logit-level prior a policy acts with, ``"confidence"`` or ``"consensus"``: ``prior``
    (None means auto) resolved for the fusion and the number of teachers. Raise ValueError for an
    explicit consensus with fewer than 3 teachers (two cannot outvote each other)."""
    if prior in (None, "auto"):
        return "consensus" if fusion == "refine" and num_teachers >= MIN_TEACHERS else "confidence"
    if prior == "consensus" and num_teachers < MIN_TEACHERS:
        raise ValueError(f"policy 'mtkd_rl': prior consensus needs at least {MIN_TEACHERS} teachers to outvote one, "
                         f"got {num_teachers} (prior auto, the default, uses the confidence there)")
    return prior
