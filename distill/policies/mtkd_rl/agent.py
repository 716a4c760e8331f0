"""The MTKD-RL agent (appendix A.1: one agent for all teachers), its Equ.(5) state and the
objective of the agent that refines a prior (``fusion: refine``)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ...distributed import is_distributed
from ...errors import DistillError
from ...signals import Signals, TeacherOutputs
from . import rewards as R

_VAR_EPS = 1e-5
_BOUND_TOL = 1e-4
PRIOR_MIN = 1e-12  # a prior weight of 0 (a teacher certain to be wrong) is log(1e-12) ~ -27.6, not -inf


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

    def forward(self, state: Tensor, priors: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        """Return the policies over teachers ``log pi_l, log pi_f``, each ``(B, M)``, for raw
        states ``(B, S)``: ``log_softmax(mu)`` of the heads' outputs ``mu``, or with ``priors``
        ``(c_l, c_f)`` (each ``(B, M)``, rows summing to 1) ``log_softmax(log c + mu)``, which
        is exactly the prior where ``mu = 0`` (``fusion: refine``)."""
        if self.running_norm:
            state = (state - self.norm_mean) / self.norm_std
        hidden = F.relu(self.trunk(state))
        mu = (self.head_logit(hidden), self.head_feat(hidden))
        if priors is not None:
            mu = tuple(log_prior(c) + m for c, m in zip(priors, mu))
        return F.log_softmax(mu[0], dim=1), F.log_softmax(mu[1], dim=1)

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




def log_prior(prior: Tensor) -> Tensor:
    """Return ``log max(prior, 1e-12)``, ``(B, M)``, float32, for a prior ``(B, M)``."""
    return prior.detach().float().clamp_min(PRIOR_MIN).log()


def refine_loss(log_pi: Tensor, prior: Tensor, adv: Tensor, tau: float) -> Tensor:
    """Return the refining agent's loss ``-mean_i [sum_m pi A - tau KL(pi || c)]`` (scalar) for one
    level: ``log pi (B, M)`` with graph, the prior ``c (B, M)`` and advantages ``A (B, M)``
    constants. The align objective with the entropy replaced by the KL to the prior: per state
    its minimiser is ``pi ~ c exp(A / tau)`` (the prior, moved only where the advantages say
    so; with ``A = 0`` the prior itself)."""
    kl = (log_pi.exp() * (log_pi - log_prior(prior))).sum(1)
    return -((log_pi.exp() * adv).sum(1) - tau * kl).mean()


def refine_loss_bounds(adv: Tensor, prior: Tensor, tau: float) -> Tuple[float, float]:
    """Return ``(low, high)`` with ``low <= refine_loss(., prior, adv, tau) <= high`` for every
    policy: ``-max|A| <= L <= max|A| + tau max_i log(1 / min_m c_im)`` (``0 <= KL(pi || c) <=
    -log min_m c``, with c floored at 1e-12)."""
    top = float(adv.abs().max()) if adv.numel() else 0.0
    worst = float(-log_prior(prior).min()) if prior.numel() else 0.0
    return -top, top + tau * max(worst, 0.0)


def kl_divergence(log_old: Tensor, log_new: Tensor) -> Tensor:
    """Return ``KL(pi_old || pi_new)`` averaged over the batch (0-d) from ``log pi (B, M)`` each."""
    return (log_old.exp() * (log_old - log_new)).sum(1).mean()



def level_loss(log_pi: Tensor, reward: Tensor, tau: float, prior: Optional[Tensor], level: int, epoch: int) -> Tensor:
    """Return one level's align agent loss (scalar, with graph) from ``log pi (B, M)`` and raw
    rewards ``u (B, M)``: :func:`~.rewards.align_loss` or, with a ``prior (B, M)`` (``fusion:
    refine``), :func:`refine_loss`; raise DistillError when it leaves its bound (a bug or
    non-finite input)."""
    adv = R.advantages(reward)
    if prior is None:
        part, (low, high) = R.align_loss(log_pi, adv, tau), R.align_loss_bounds(adv, tau)
    else:
        part, (low, high) = refine_loss(log_pi, prior, adv, tau), refine_loss_bounds(adv, prior, tau)
    value = float(part.detach())
    if not (math.isfinite(value) and low - _BOUND_TOL * (1 + abs(low)) <= value <= high + _BOUND_TOL * (1 + high)):
        raise DistillError(f"policy 'mtkd_rl' (variant align): agent loss {value:.6g} of the "
                           f"{('logit', 'feat')[level]} level left its bound [{low:.4g}, {high:.4g}] in the "
                           f"update of epoch {epoch + 1}: a bug or non-finite input, stopping")
    return part


def optimiser_step(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], loss: Tensor,
                   max_grad_norm: float) -> None:
    """One agent optimiser step on ``loss``: gradients averaged over the ranks of a
    torch.distributed job, their norm clipped to ``max_grad_norm`` (0: no clip)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if is_distributed():
        world = dist.get_world_size()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
