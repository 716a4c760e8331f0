"""The bounded MTKD-RL episode buffer: reservoir sampling over an update period, on the host."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor


def to_host(t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Return ``t`` as ``dtype`` on the CPU (a non-blocking copy from CUDA; synchronise before use)."""
    t = t.to(dtype)
    return t.to("cpu", non_blocking=True) if t.is_cuda else t.contiguous()


class EpisodeBuffer:
    """At most ``capacity`` recorded batches of one period (an epoch, or ``update_every`` batches).

    Algorithm R: the k-th batch of the period (0-based) fills slot k while there is room,
    else replaces slot ``j ~ U{0..k}`` when ``j < capacity`` (drawn from a private generator
    seeded with ``seed``), so each of the period's n batches is kept with probability
    ``capacity / n``. Entries are dicts of host tensors plus ``step``, the global recording
    index, which orders the replay.
    """

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.rng = torch.Generator().manual_seed(seed)
        self.entries: List[Dict[str, Any]] = []
        self.seen = 0  # batches recorded in this period
        self.step = 0  # batches recorded since the buffer was built

    def reserve(self) -> Optional[int]:
        """Count one recorded batch; return its slot, or None when the reservoir drops it."""
        k = self.seen
        self.seen += 1
        self.step += 1
        if len(self.entries) < self.capacity:
            return len(self.entries)
        j = int(torch.randint(0, k + 1, (1,), generator=self.rng).item())
        return j if j < self.capacity else None

    def store(self, slot: int, entry: Dict[str, Any]) -> None:
        """Put ``entry`` (with its ``step``) in ``slot`` (from :meth:`reserve`)."""
        if slot == len(self.entries):
            self.entries.append(entry)
        else:
            self.entries[slot] = entry

    def record(self, entry: Dict[str, Any]) -> None:
        """Add an episode through reservoir sampling (its ``step`` orders the replay)."""
        slot = self.reserve()
        if slot is not None:
            self.store(slot, entry)

    def replay(self) -> List[Dict[str, Any]]:
        """Return the kept entries in recording order."""
        return sorted(self.entries, key=lambda e: e["step"])

    def clear(self) -> None:
        """Empty the buffer and start a new period."""
        self.entries = []
        self.seen = 0

    def state(self) -> Dict[str, Any]:
        """Return what an exact resume needs (entries, counters, generator state)."""
        return {"entries": list(self.entries), "seen": self.seen, "step": self.step, "rng": self.rng.get_state()}

    def load(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state`'s output."""
        self.entries = [dict(e, step=int(e["step"])) for e in state["entries"]]
        self.seen, self.step = int(state["seen"]), int(state["step"])
        self.rng.set_state(state["rng"].to(torch.uint8).cpu())
