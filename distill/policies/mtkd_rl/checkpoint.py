"""The ``mtkd_rl`` policy's checkpoint state: everything besides parameters and buffers that an
exact resume needs, and the settings it was trained with (a resume that would act differently is
refused in one line)."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

EXTRA_VERSION = 3  # 3: align episodes carry the acting policy's log pi
SETTINGS = ("variant", "reward", "fusion", "prior")  # resolved from the arguments and the pool


def policy_state(policy: Any) -> Dict[str, Any]:
    """Return ``policy``'s extra state: version, settings, agent dims, epoch, episode buffer,
    agent optimiser, epoch metrics (on the host) and the held-out reward's state."""
    if policy.agent is not None and next(policy.agent.parameters()).is_cuda:
        torch.cuda.synchronize()
    optimizer = None
    if policy.optimizer is not None:
        sd = policy.optimizer.state_dict()
        optimizer = {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
    metrics = {k: [v.cpu() if isinstance(v, Tensor) else v, c] for k, (v, c) in policy.metrics.items()}
    state = {"version": EXTRA_VERSION, "settings": {k: getattr(policy, k) for k in SETTINGS}, "dims": policy.dims,
             "epoch": policy.epoch, "buffer": policy.buffer.state(), "optimizer": optimizer, "metrics": metrics}
    if policy.heldout is not None:
        state["heldout"] = policy.heldout.state()
    return state


def load_policy_state(policy: Any, state: Dict[str, Any]) -> None:
    """Restore :func:`policy_state`'s output into ``policy`` (building its agent first if needed).
    Raise ValueError for another version, or for settings other than the policy's (a checkpoint
    written before settings were stored is not checked)."""
    if state.get("version") != EXTRA_VERSION:
        raise ValueError(f"policy 'mtkd_rl': unsupported checkpoint state version {state.get('version')!r} "
                         f"(this version writes {EXTRA_VERSION})")
    trained = state.get("settings") or {}
    changed = [k for k in SETTINGS if k in trained and trained[k] != getattr(policy, k)]
    if changed:
        raise ValueError("policy 'mtkd_rl': the checkpoint was trained with "
                         + ", ".join(f"{k} {trained[k]}" for k in changed) + "; this run resolves "
                         + ", ".join(f"{k} {getattr(policy, k)}" for k in changed)
                         + " (give distill.policy_args " + ", ".join(f"{k}: {trained[k]}" for k in changed)
                         + " to resume it)")
    device = next(policy.agent.parameters()).device if policy.agent is not None else torch.device("cpu")
    if state["dims"] is not None:
        policy.build_agent(state["dims"], device)
    policy.epoch = int(state["epoch"])
    policy.buffer.load(state["buffer"])
    if state["optimizer"] is not None:
        opt = state["optimizer"]
        policy.optimizer.load_state_dict({"state": {int(k): v for k, v in opt["state"].items()},
                                          "param_groups": opt["param_groups"]})
    policy.metrics = {k: [v.to(device) if isinstance(v, Tensor) else v, int(c)]
                      for k, (v, c) in state["metrics"].items()}
    if policy.heldout is not None:
        policy.heldout.load(state.get("heldout"), device)
