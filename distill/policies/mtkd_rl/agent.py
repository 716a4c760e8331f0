"""The MTKD-RL agent (appendix A.1: one agent for all teachers) and its Equ.(5) state."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ...distributed import is_distributed
from ...signals import Signals, TeacherOutputs

_VAR_EPS = 1e-5


def build_state(signals: Signals, teachers: TeacherOutputs) -> Tensor:
    """Return the Equ.(5) state of every sample, teachers concatenated in pool order, ``(B, S)``."""
    parts = []
    for m, embedding in enumerate(teachers.embeddings):
        parts += [embedding.detach().float().flatten(1), teachers.logits[m].detach().float(),
                  signals.teacher_ce[m].detach().float().unsqueeze(1), signals.cos[m].detach().float().unsqueeze(1),
                  signals.kl[m].detach().float().unsqueeze(1)]
    return torch.cat(parts, dim=1)


class MTKDAgent(nn.Module):
    """One agent for all teachers: trunk + two softmax heads, optional learnable gammas and
    running state statistics (all checkpointed with the policy)."""

    def __init__(self, in_dim: int, num_teachers: int, hidden: int, gammas: Sequence[Sequence[float]],
                 learnable_gammas: bool, running_norm: bool):
        super().__init__()
        self.trunk = nn.Linear(in_dim, hidden, bias=False)
        self.head_logit = nn.Linear(hidden, num_teachers)
        self.head_feat = nn.Linear(hidden, num_teachers)
        gam = torch.tensor(gammas, dtype=torch.float32)  # (2, 3): logit row, feat row
        self.learnable_gammas = learnable_gammas
        if learnable_gammas:
            self.gamma_logits = nn.Parameter(gam.log())
        else:
            self.register_buffer("gamma_fixed", gam, persistent=False)
        self.running_norm = running_norm
        if running_norm:
            f64 = dict(dtype=torch.float64)
            self.register_buffer("norm_mean", torch.zeros(in_dim))
            self.register_buffer("norm_std", torch.ones(in_dim))
            for prefix in ("stat", "pend"):  # committed totals / pending since the last commit
                self.register_buffer(f"{prefix}_count", torch.zeros((), **f64))
                self.register_buffer(f"{prefix}_sum", torch.zeros(in_dim, **f64))
                self.register_buffer(f"{prefix}_sumsq", torch.zeros(in_dim, **f64))

    def gammas(self) -> Tensor:
        """Return the balancing parameters ``(2, 3)``: rows logit / feat, columns gen / conf / div."""
        return F.softmax(self.gamma_logits, dim=1) if self.learnable_gammas else self.gamma_fixed

    def parameter_norm(self) -> float:
        """Return the L2 norm of all trainable parameters together (a runaway detector)."""
        return float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in self.parameters())))

    def forward(self, state: Tensor) -> Tuple[Tensor, Tensor]:
        """Return the heads' log-softmax over teachers ``log pi_l, log pi_f``, each ``(B, M)``,
        for raw states ``(B, S)``."""
        if self.running_norm:
            state = (state - self.norm_mean) / self.norm_std
        hidden = F.relu(self.trunk(state))
        return F.log_softmax(self.head_logit(hidden), dim=1), F.log_softmax(self.head_feat(hidden), dim=1)

    @torch.no_grad()
    def accumulate(self, state: Tensor) -> None:
        """Add a training batch's states ``(B, S)`` to the pending statistics."""
        s = state.double()
        self.pend_count += s.shape[0]
        self.pend_sum += s.sum(0)
        self.pend_sumsq += s.pow(2).sum(0)

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the pending statistics into the totals and refresh the normaliser."""
        pending = [self.pend_count, self.pend_sum, self.pend_sumsq]
        if is_distributed():
            for t in pending:
                dist.all_reduce(t)
        self.stat_count += self.pend_count
        self.stat_sum += self.pend_sum
        self.stat_sumsq += self.pend_sumsq
        for t in pending:
            t.zero_()
        if self.stat_count.item() > 0:
            mean = self.stat_sum / self.stat_count
            var = (self.stat_sumsq / self.stat_count - mean.pow(2)).clamp_min(0)
            self.norm_mean.copy_(mean.float())
            self.norm_std.copy_((var + _VAR_EPS).sqrt().float())


