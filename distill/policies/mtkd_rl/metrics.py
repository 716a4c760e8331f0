"""The MTKD-RL policy's per-epoch metrics: sums kept where they were computed (device tensors, no
host sync per step) and read once, at the end of the epoch."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from torch import nn

KEYS = ("loss", "updates", "reward", "episodes", "gen", "reward_teacher", "entropy", "kl", "trust_stops")
LEVELS = ("logit", "feat")


def new_metrics() -> Dict[str, List[Any]]:
    """Return empty metrics: name -> [sum, count]."""
    return {k: [0.0, 0] for k in KEYS}


def _mean(total: Any, count: int) -> Any:
    return total / count if count else math.nan


def epoch_summary(m: Dict[str, List[Any]], agent: Optional[nn.Module], variant: str,
                  num_teachers: int) -> Dict[str, float]:
    """Return the epoch's metrics as floats: agent loss and updates, mean reward, episodes, the
    generator's mean weights ``g_<level>/<m>`` and, for variant align, each teacher's mean reward,
    the policies' entropy and the trust region's last KL and stops."""
    updates = int(m["updates"][0])
    out: Dict[str, float] = {"agent_loss": float(m["loss"][0]) / updates if updates else math.nan,
                             "reward": float(_mean(m["reward"][0], m["reward"][1])),
                             "agent_updates": float(updates), "episodes": float(m["episodes"][0])}
    if agent is not None:
        out["agent_param_norm"] = agent.parameter_norm()
    if m["gen"][1]:
        gen = (m["gen"][0] / m["gen"][1]).cpu()
        for t in range(num_teachers):
            out.update({f"g_{lv}/{t}": gen[j, t].item() for j, lv in enumerate(LEVELS)})
    if variant == "align":
        if m["reward_teacher"][1]:
            per = (m["reward_teacher"][0] / m["reward_teacher"][1]).cpu()
            for t in range(num_teachers):
                out.update({f"reward_{lv}/{t}": per[j, t].item() for j, lv in enumerate(LEVELS)})
        if m["entropy"][1]:
            ent = (m["entropy"][0] / m["entropy"][1]).cpu()
            out.update({f"entropy_{lv}": ent[j].item() for j, lv in enumerate(LEVELS)})
        out["trust_kl"] = float(m["kl"][0]) if m["kl"][1] else math.nan
        out["trust_stops"] = float(m["trust_stops"][0])
    if agent is not None and agent.learnable_gammas:
        gam = agent.gammas().detach().cpu()
        for level, label in enumerate(LEVELS):
            for j, part in enumerate(("gen", "conf", "div")):
                out[f"gamma_{label}_{part}"] = gam[level, j].item()
    return out
