"""``mtkd_rl``: MTKD-RL (Yang et al., AAAI 2025), teacher weights from a policy-gradient agent.

Implements the paper (Equ. 2-14, Algorithms 1-2, appendix A.1) as
``shared/MTKD-RL-SPEC.md`` decides; the authors' code behaviour is ``variant: official``.
Notation: B batch, M teachers, C classes, T the KD temperature, alpha / beta the loss
weights of Equ.(2) (handed over by the Distiller through :meth:`setup`).

State (Equ. 5)
    Per teacher m and sample i, detached, float32::

        s[i, m] = [f_Tm[i] (d_m) || z_Tm[i] (C, raw logits) || CE_Tm[i] || cos[m, i] || KL[m, i]]

    ``f_Tm`` is the teacher's pooled pre-logit embedding, ``cos`` the cosine between the
    pooled projected student feature and the teacher's feature, ``KL = T^2 KL(p_T || p_S)``
    (``Signals.kl``, also under ``logit_loss: dist``). The M vectors are concatenated in pool
    order: ``(B, S)``, ``S = sum_m (d_m + C + 3)``.
    ``state_norm: none`` (default; neither paper nor code normalises) feeds it raw.
    ``state_norm: running`` standardises every dimension with the exact running mean / var of
    all training states seen so far (float64 sums, updated only in :meth:`observe`, i.e. from
    training batches). The statistics used by the agent are committed only when the agent is
    updated, so the policy (normaliser + agent) stays frozen between updates as Algorithm 2
    wants; ``std = sqrt(var + 1e-5)``.

Agent (appendix A.1: one agent for all teachers)
    ``Linear(S -> hidden, bias=False) -> ReLU``, then two heads ``Linear(hidden -> M)`` each
    followed by a softmax over teachers: generator weights ``g_l, g_f (B, M)``. Initialised
    by PyTorch's default init under a private RNG seeded with ``seed`` (so building it does
    not disturb the student's initialisation). Built in :meth:`setup` from the pool's
    shapes (or lazily on the first step; or from a checkpoint's recorded shapes).

Action (Equ. 9-14), deterministic
    ``c = (1 - softmax_m(CE_T)) / (M - 1)`` (Equ. 9, ``K = M``; 1 for M = 1),
    ``d_l = softmax_m(KL)`` (Equ. 12), ``d_f = softmax_m(cos)`` (Equ. 11),
    ``w_l = gl_g g_l + gl_c c + gl_d d_l`` and ``w_f = gf_g g_f + gf_c c + gf_d d_f``
    (Equ. 13-14). ``gammas`` default 1/3 each; give ``[g, c, d]`` for both levels or
    ``{logit: [...], feat: [...]}``; each triple non-negative and summing to 1, so rows of w
    sum to 1. ``learnable_gammas: true`` makes each level's triple ``softmax`` of a learnable
    3-vector (initialised at ``log gammas``, i.e. equal), trained only by the agent loss.
    The agent runs under ``no_grad`` with autocast disabled (float32) during the student step.

Reward (Equ. 6-8), ``variant: paper`` (default)
    ``R[i, m] = -CE_S[i] - alpha KD[i, m] - beta FEAT[i, m]`` from the step's own signals
    (computed before the optimiser step; no recomputation, no graph). ``KD`` is the logit
    loss in use (DIST under ``logit_loss: dist``). Equ.(8) as the SPEC reads it: per sample,
    min-max over teachers ``n = (R - min_k R) / (max_k R - min_k R)`` then
    ``Rbar = n - mean_m n`` (centred, ``sum_m Rbar = 0``); ``Rbar = 0`` where max = min.
    Agent loss (Equ. 7 with the heads as categorical policies over teachers)::

        L = -mean_i sum_m Rbar[i, m] (log g_l[i, m] + log g_f[i, m])

    with learnable gammas the log of the fused weights ``w_l, w_f`` replaces ``log g``.
    ``pg_form: prob`` (not the default) instead takes Equ.(7) as printed, ``grad pi`` rather
    than ``grad log pi``: ``L = -mean_i sum_m Rbar[i, m] (g_l[i, m] + g_f[i, m])`` (the
    expected normalised reward, bounded).

Stability (measured, see the report of the change that added this policy)
    The default objective has no minimum: per sample it is linear in the heads' logit gaps
    once the softmax saturates, so its gradient never vanishes and the agent's weights grow
    without bound (geometrically, through the two layers). With the paper's raw state and
    lr 0.1 the agent loss reaches ~-1e12 after the first update epoch on the digits quickstart
    and overflows (NaN) after ~4 epochs; ``state_norm: running`` slows this, it does not stop
    it. ``max_grad_norm: x`` (clip the agent's gradient norm; default none, the authors'
    optimiser) bounds the growth per step; ``pg_form: prob`` and ``variant: official`` have
    bounded objectives. A non-finite agent after an update raises a DistillError naming these
    options (the previous epoch's checkpoint is kept).

``variant: official`` (the authors' code, for comparison)
    One reward per sample shared by all teachers ``r = -(CE + alpha sum_m w_l KD + beta sum_m
    w_f FEAT)`` with the weights the step used (alpha = 1 in the authors' recipe, where this is
    their formula), z-scored over the batch (population std, ``+1e-8``), clamped to [0, 1];
    agent loss ``-mean_{i,m} rhat_i (log w_l[i, m] + log w_f[i, m])`` on the fused weights
    (its optimum is uniform weights); warm-up weight 1 per teacher (rows sum to M there).

Schedule (Algorithms 1-2)
    Epochs ``< warmup_epochs`` (default 1, the paper's pre-training epoch, one of the
    scheduled epochs): equal weights ``1/M`` (paper) or 1 (official); (state, reward)
    recorded; the agent is trained at the epoch's end. Later epochs: the agent is frozen,
    its weights drive the student, episodes are recorded and, at the epoch's end, the agent
    takes one optimiser step per recorded batch in recording order (SGD, ``lr`` 0.1,
    ``momentum`` 0, ``weight_decay`` 0 by default: the authors' values; ``max_grad_norm``
    optional). The episode buffer is then emptied. ``update_every: K`` also updates after
    every K recorded batches.

Episode buffer
    At most ``buffer`` batches (default 1024; a CIFAR epoch at batch 64 is 782 batches, so
    the default keeps all of it). When a period (epoch, or K steps) records more, reservoir
    sampling (Algorithm R) keeps a uniform sample of them, drawn from a private
    ``torch.Generator`` seeded with ``seed``; the kept batches are replayed in recording order.
    Entries live on the host: the state in ``buffer_dtype`` (bfloat16 by default, ~2 bytes per
    value), the confidence / divergence weights ``(B, M)`` and reward in float32.

Checkpoint (exact resume)
    ``state_dict()`` holds the agent's parameters, learnable gammas and running state
    statistics (``agent.*``) and, via ``get_extra_state``: the pool shapes (to rebuild the
    agent before loading), the agent optimiser's state, the buffer (entries and step
    indices), the reservoir counters and generator state, the epoch and the epoch's metrics.

Distributed
    Each rank records its own episodes; agent gradients (and the running-statistic sums) are
    all-reduced (averaged / summed) so every rank holds the identical agent after an update.
    Ranks must record the same number of batches per period (equal shards).

Metrics (``policy/<key>`` in summary.csv): ``agent_loss`` (mean over the epoch's updates),
``reward`` (mean raw reward: ``R`` for paper, ``r`` for official), ``agent_updates``,
``episodes`` (batches recorded), ``g_logit/<m>`` / ``g_feat/<m>`` (mean generator weights
while the agent drove the student) and ``gamma_*`` with learnable gammas.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DistillError
from ..signals import Signals, StudentOutputs, TeacherOutputs
from .base import Weights, WeightingPolicy, register_policy
from .camkd import confidence_weights

VARIANTS = ("paper", "official")
PG_FORMS = ("log", "prob")
STATE_NORMS = ("none", "running")
BUFFER_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_VAR_EPS = 1e-5
_EXTRA_VERSION = 1


# ----------------------------------------------------------------------------- pure functions


def build_state(signals: Signals, teachers: TeacherOutputs) -> Tensor:
    """Return the Equ.(5) state of every sample, teachers concatenated in pool order, ``(B, S)``."""
    parts = []
    for m, embedding in enumerate(teachers.embeddings):
        parts += [embedding.detach().float().flatten(1), teachers.logits[m].detach().float(),
                  signals.teacher_ce[m].detach().float().unsqueeze(1), signals.cos[m].detach().float().unsqueeze(1),
                  signals.kl[m].detach().float().unsqueeze(1)]
    return torch.cat(parts, dim=1)


def divergence_weights(values: Tensor) -> Tensor:
    """Return ``softmax_m(values)`` per sample, ``(B, M)``, from ``values (M, B)`` (Equ. 11 / 12)."""
    return F.softmax(values.detach().float(), dim=0).t()


def fuse(gammas: Tensor, generator: Tensor, confidence: Tensor, divergence: Tensor) -> Tensor:
    """Return Equ.(13)/(14) ``gamma_g * g + gamma_c * c + gamma_d * d``; ``gammas (3,)``, others ``(B, M)``."""
    return gammas[0] * generator + gammas[1] * confidence + gammas[2] * divergence


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


def parse_gammas(gammas: Any) -> List[List[float]]:
    """Return ``[[logit g, c, d], [feat g, c, d]]`` from a policy argument; raise ValueError."""
    if gammas is None:
        return [[1 / 3] * 3, [1 / 3] * 3]
    if isinstance(gammas, dict):
        unknown = set(gammas) - {"logit", "feat"}
        if unknown:
            raise ValueError(f"policy 'mtkd_rl': gammas takes keys logit and feat, not {sorted(unknown)}")
        rows = [gammas.get("logit"), gammas.get("feat")]
        rows = [[1 / 3] * 3 if r is None else r for r in rows]
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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ----------------------------------------------------------------------------- the agent


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

    def forward(self, state: Tensor) -> Tuple[Tensor, Tensor]:
        """Return ``log g_l, log g_f`` ``(B, M)`` for raw states ``(B, S)``."""
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
        if _distributed():
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


# ----------------------------------------------------------------------------- the policy


@register_policy
class MTKDRLPolicy(WeightingPolicy):
    """MTKD-RL: fused generator / confidence / divergence weights from an RL agent.

    See the module docstring for every equation and every choice made.
    """

    name = "mtkd_rl"

    def __init__(self, num_teachers: int, variant: str = "paper", hidden: int = 128, gammas: Any = None,
                 learnable_gammas: bool = False, lr: float = 0.1, momentum: float = 0.0,
                 weight_decay: float = 0.0, warmup_epochs: int = 1, buffer: int = 1024,
                 update_every: Optional[int] = None, buffer_dtype: str = "bfloat16", state_norm: str = "none",
                 seed: int = 0, pg_form: str = "log", max_grad_norm: Optional[float] = None):
        super().__init__(num_teachers)
        args = dict(variant=variant, hidden=hidden, gammas=gammas, learnable_gammas=learnable_gammas, lr=lr,
                    momentum=momentum, weight_decay=weight_decay, warmup_epochs=warmup_epochs, buffer=buffer,
                    update_every=update_every, buffer_dtype=buffer_dtype, state_norm=state_norm, seed=seed,
                    pg_form=pg_form, max_grad_norm=max_grad_norm)
        type(self).check_args(args)
        self.variant, self.hidden = variant, hidden
        self.gamma_rows = parse_gammas(gammas)
        self.learnable_gammas = learnable_gammas
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.warmup_epochs, self.capacity, self.update_every = warmup_epochs, buffer, update_every
        self.buffer_dtype = BUFFER_DTYPES[buffer_dtype]
        self.state_norm, self.seed = state_norm, seed
        self.pg_form = pg_form
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.alpha, self.beta, self.temperature, self.logit_loss = 1.0, 5.0, 4.0, "kd"
        self.agent: Optional[MTKDAgent] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.dims: Optional[Dict[str, Any]] = None  # {"embed": [d_m], "classes": C}
        self.rng = torch.Generator().manual_seed(seed)
        self.episodes: List[Dict[str, Any]] = []  # the bounded episode buffer (host)
        self.seen = 0  # batches recorded since the last agent update (reservoir count)
        self.step = 0  # batches recorded since the policy was built (orders the replay)
        self.epoch = 0
        self._step_cache: Optional[Tuple[Any, ...]] = None  # (weakref to Signals, state, conf, div_l, div_f)
        self._reset_metrics()

    # -- arguments ------------------------------------------------------------

    @classmethod
    def check_args(cls, args: Dict[str, Any]) -> None:
        """Raise ValueError for an unknown key or a bad value."""
        super().check_args(args)

        def integer(key: str, low: int, optional: bool = False) -> None:
            v = args.get(key)
            if v is None and (optional or key not in args):
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"policy 'mtkd_rl': {key} must be an integer >= {low}, got {v!r}")

        def number(key: str, positive: bool) -> None:
            if key not in args:
                return
            v = args[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
                raise ValueError(f"policy 'mtkd_rl': {key} must be a number {'>' if positive else '>='} 0, got {v!r}")

        choice_args = (("variant", VARIANTS), ("state_norm", STATE_NORMS), ("buffer_dtype", tuple(BUFFER_DTYPES)),
                       ("pg_form", PG_FORMS))
        for key, choices in choice_args:
            if key in args and args[key] not in choices:
                raise ValueError(f"policy 'mtkd_rl': {key} must be one of {', '.join(choices)}, got {args[key]!r}")
        integer("hidden", 1)
        integer("warmup_epochs", 0)
        integer("buffer", 1)
        integer("update_every", 1, optional=True)
        integer("seed", 0)
        number("lr", True)
        number("momentum", False)
        number("weight_decay", False)
        if args.get("max_grad_norm") is not None:
            number("max_grad_norm", True)
        if args.get("pg_form", "log") != "log" and args.get("variant", "paper") != "paper":
            raise ValueError("policy 'mtkd_rl': pg_form applies to variant paper only")
        if not isinstance(args.get("learnable_gammas", False), bool):
            raise ValueError("policy 'mtkd_rl': learnable_gammas must be true or false, "
                             f"got {args['learnable_gammas']!r}")
        rows = parse_gammas(args.get("gammas"))
        if args.get("learnable_gammas") and any(v <= 0 for row in rows for v in row):
            raise ValueError("policy 'mtkd_rl': learnable_gammas needs every initial gamma > 0")

    # -- building ---------------------------------------------------------------

    def setup(self, teachers: TeacherOutputs, alpha: float = 1.0, beta: float = 5.0,
              temperature: float = 4.0, logit_loss: str = "kd") -> None:
        """Record the loss settings and build the agent for the pool's shapes (idempotent)."""
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.logit_loss = logit_loss
        if teachers.num_teachers != self.num_teachers:
            raise ValueError(f"policy 'mtkd_rl' was built for {self.num_teachers} teachers, the pool has "
                             f"{teachers.num_teachers}")
        dims = {"embed": [int(e.flatten(1).shape[1]) for e in teachers.embeddings],
                "classes": int(teachers.logits.shape[-1])}
        self._build(dims, teachers.logits.device)

    def _build(self, dims: Dict[str, Any], device: torch.device) -> None:
        dims = {"embed": [int(d) for d in dims["embed"]], "classes": int(dims["classes"])}
        if self.agent is not None:
            if dims != self.dims:
                raise ValueError(f"policy 'mtkd_rl': the agent was built for teacher shapes {self.dims}, "
                                 f"got {dims} (a different teacher pool)")
            return
        in_dim = sum(d + dims["classes"] + 3 for d in dims["embed"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            agent = MTKDAgent(in_dim, self.num_teachers, self.hidden, self.gamma_rows, self.learnable_gammas,
                              self.state_norm == "running")
        self.agent = agent.to(device)
        self.dims = dims
        self.optimizer = torch.optim.SGD(self.agent.parameters(), lr=self.lr, momentum=self.momentum,
                                         weight_decay=self.weight_decay)

    def _ensure_agent(self, teachers: TeacherOutputs) -> MTKDAgent:
        if self.agent is None:
            self.setup(teachers, self.alpha, self.beta, self.temperature, self.logit_loss)
        return self.agent

    # -- one step -------------------------------------------------------------------

    def warming_up(self) -> bool:
        """Return True during the pre-training epochs (equal weights, agent not used)."""
        return self.epoch < self.warmup_epochs

    def weights(self, signals: Signals, teachers: TeacherOutputs, student: StudentOutputs,
                target: Tensor) -> Weights:
        """Return ``w_l, w_f`` ``(B, M)``: equal weights while warming up, else Equ.(13)-(14)."""
        batch, device = signals.student_ce.shape[0], signals.student_ce.device
        if self.warming_up():
            w = torch.full((batch, self.num_teachers), 1.0 if self.variant == "official" else 1.0 / self.num_teachers,
                           device=device)
            return Weights(w, w)
        agent = self._ensure_agent(teachers)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            state = build_state(signals, teachers)
            conf, div_l, div_f = (confidence_weights(signals.teacher_ce), divergence_weights(signals.kl),
                                  divergence_weights(signals.cos))
            # observe() of the same step reuses these (built once per step, not twice)
            self._step_cache = (weakref.ref(signals), state, conf, div_l, div_f)
            log_gl, log_gf = agent(state)
            g_l, g_f = log_gl.exp(), log_gf.exp()
            gam = agent.gammas()
            w_l = fuse(gam[0], g_l, conf, div_l)
            w_f = fuse(gam[1], g_f, conf, div_f)
            self._m_gen = self._m_gen + torch.stack([g_l.sum(0), g_f.sum(0)]).double()
            self._m_gen_count += batch
        return Weights(w_l, w_f)

    def observe(self, signals: Signals, weights: Weights, teachers: TeacherOutputs, student: StudentOutputs,
                target: Tensor) -> None:
        """Record this step's (state, confidence / divergence weights, reward) episode."""
        agent = self._ensure_agent(teachers)
        cache, self._step_cache = self._step_cache, None
        with torch.no_grad(), torch.autocast(signals.student_ce.device.type, enabled=False):
            if cache is not None and cache[0]() is signals:
                state, conf, div_l, div_f = cache[1:]
            else:
                state = build_state(signals, teachers)
                conf, div_l, div_f = (confidence_weights(signals.teacher_ce), divergence_weights(signals.kl),
                                      divergence_weights(signals.cos))
            if agent.running_norm:
                agent.accumulate(state)
            if self.variant == "paper":
                raw = paper_rewards(signals, self.alpha, self.beta)
                reward = raw
            else:
                raw, reward = official_rewards(signals, weights, self.alpha, self.beta)
            self._m_reward = self._m_reward + raw.double().sum()
            self._m_reward_count += raw.numel()
            step = self.step
            slot = self._reserve()
            if slot is not None:  # copied to the host only when the reservoir keeps it
                self._store(slot, {"step": step, "state": self._to_host(state, self.buffer_dtype),
                                   "conf": self._to_host(conf), "div_logit": self._to_host(div_l),
                                   "div_feat": self._to_host(div_f), "reward": self._to_host(reward)})
        if self.update_every is not None and self.seen >= self.update_every:
            self._update()

    @staticmethod
    def _to_host(t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        t = t.to(dtype)
        return t.to("cpu", non_blocking=True) if t.is_cuda else t.contiguous()

    def _reserve(self) -> Optional[int]:
        """Count one recorded batch; return its buffer slot, or None when the reservoir drops it.

        Algorithm R over the period (epoch, or ``update_every`` batches): the k-th batch
        (0-based) fills slot k while the buffer has room, else replaces slot ``j ~ U{0..k}``
        when ``j < buffer``; each of the period's n batches is kept with probability ``buffer / n``.
        """
        k = self.seen
        self.seen += 1
        self.step += 1
        self._m_episodes += 1
        if len(self.episodes) < self.capacity:
            return len(self.episodes)
        j = int(torch.randint(0, k + 1, (1,), generator=self.rng).item())
        return j if j < self.capacity else None

    def _store(self, slot: int, entry: Dict[str, Any]) -> None:
        if slot == len(self.episodes):
            self.episodes.append(entry)
        else:
            self.episodes[slot] = entry

    def _record(self, entry: Dict[str, Any]) -> None:
        """Add an episode (``entry['step']`` orders the replay) through reservoir sampling."""
        slot = self._reserve()
        if slot is not None:
            self._store(slot, entry)

    # -- agent update --------------------------------------------------------------

    def agent_loss(self, entry: Dict[str, Any]) -> Tensor:
        """Return the policy-gradient loss of one recorded batch (with graph to the agent)."""
        agent = self.agent
        device = next(agent.parameters()).device
        state = entry["state"].to(device, torch.float32)
        conf, div_l, div_f, reward = (entry[k].to(device, torch.float32)
                                      for k in ("conf", "div_logit", "div_feat", "reward"))
        log_gl, log_gf = agent(state)
        if self.variant == "paper" and not agent.learnable_gammas:
            log_l, log_f = log_gl, log_gf
        else:
            gam = agent.gammas()
            log_l = fuse(gam[0], log_gl.exp(), conf, div_l).clamp_min(1e-12).log()
            log_f = fuse(gam[1], log_gf.exp(), conf, div_f).clamp_min(1e-12).log()
        if self.variant == "paper":
            rbar = normalise_rewards(reward)
            if self.pg_form == "prob":  # Equ.(7) as printed: the gradient of pi itself
                return -(rbar * (log_l.exp() + log_f.exp())).sum(1).mean()
            return -(rbar * (log_l + log_f)).sum(1).mean()
        return -(reward.unsqueeze(1) * (log_l + log_f)).mean()

    def _update(self) -> None:
        """One agent optimiser step per buffered batch, in recording order; then empty the buffer."""
        agent = self.agent
        if agent is None:
            return
        if agent.running_norm:
            agent.commit()
        if not self.episodes:
            self.seen = 0
            return
        device = next(agent.parameters()).device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # host copies were non-blocking
        params = [p for p in agent.parameters() if p.requires_grad]
        period_loss: Any = torch.zeros((), dtype=torch.float64, device=device)
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for entry in sorted(self.episodes, key=lambda e: e["step"]):
                loss = self.agent_loss(entry)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if _distributed():
                    world = dist.get_world_size()
                    for p in params:
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad.div_(world)
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                self.optimizer.step()
                period_loss = period_loss + loss.detach().double()
                self._m_updates += 1
        self._m_loss = self._m_loss + period_loss
        self.episodes = []
        self.seen = 0
        if not (torch.isfinite(period_loss) and all(torch.isfinite(p).all() for p in params)):
            raise DistillError(
                f"policy 'mtkd_rl': the agent diverged (non-finite agent loss or parameters) in the update of "
                f"epoch {self.epoch + 1}. The 'paper' objective -sum_m Rbar log g has no minimum, so the agent "
                "grows without bound; bound it with distill.policy_args max_grad_norm (e.g. 1.0) or "
                "pg_form: prob, or slow it with state_norm: running / a smaller lr")

    # -- epochs ------------------------------------------------------------------

    def _reset_metrics(self) -> None:
        self._m_loss: Any = 0.0
        self._m_updates = 0
        self._m_reward: Any = 0.0
        self._m_reward_count = 0
        self._m_episodes = 0
        self._m_gen: Any = 0.0
        self._m_gen_count = 0

    def begin_epoch(self, epoch: int) -> None:
        """Start ``epoch``: epochs before ``warmup_epochs`` use equal weights."""
        self.epoch = epoch
        self._reset_metrics()

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        """Update the agent on the epoch's episodes; return the epoch's agent metrics."""
        self._update()
        out: Dict[str, float] = {
            "agent_loss": float(self._m_loss) / self._m_updates if self._m_updates else math.nan,
            "reward": float(self._m_reward) / self._m_reward_count if self._m_reward_count else math.nan,
            "agent_updates": float(self._m_updates), "episodes": float(self._m_episodes)}
        if self._m_gen_count:
            gen = (self._m_gen / self._m_gen_count).cpu()
            for m in range(self.num_teachers):
                out[f"g_logit/{m}"] = gen[0, m].item()
                out[f"g_feat/{m}"] = gen[1, m].item()
        if self.agent is not None and self.agent.learnable_gammas:
            gam = self.agent.gammas().detach().cpu()
            for level, label in enumerate(("logit", "feat")):
                for j, part in enumerate(("gen", "conf", "div")):
                    out[f"gamma_{label}_{part}"] = gam[level, j].item()
        return out

    # -- checkpoint ---------------------------------------------------------------

    def get_extra_state(self) -> Dict[str, Any]:
        """Return everything besides parameters / buffers that an exact resume needs."""
        if self.agent is not None and next(self.agent.parameters()).is_cuda:
            torch.cuda.synchronize()
        optimizer = None
        if self.optimizer is not None:
            sd = self.optimizer.state_dict()
            optimizer = {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
        gen = self._m_gen.cpu() if isinstance(self._m_gen, Tensor) else None
        return {"version": _EXTRA_VERSION, "dims": self.dims, "epoch": self.epoch, "seen": self.seen,
                "step": self.step, "rng": self.rng.get_state(), "episodes": list(self.episodes),
                "optimizer": optimizer,
                "metrics": {"loss": float(self._m_loss), "updates": self._m_updates, "reward": float(self._m_reward),
                            "reward_count": self._m_reward_count, "episodes": self._m_episodes,
                            "gen": gen, "gen_count": self._m_gen_count}}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`get_extra_state`'s output (builds the agent first if needed)."""
        if state.get("version") != _EXTRA_VERSION:
            raise ValueError(f"policy 'mtkd_rl': unsupported checkpoint state version {state.get('version')!r}")
        if state["dims"] is not None:
            device = next(self.agent.parameters()).device if self.agent is not None else torch.device("cpu")
            self._build(state["dims"], device)
        self.epoch, self.seen, self.step = int(state["epoch"]), int(state["seen"]), int(state["step"])
        self.rng.set_state(state["rng"].to(torch.uint8).cpu())
        self.episodes = [dict(e, step=int(e["step"])) for e in state["episodes"]]
        if state["optimizer"] is not None:
            opt = state["optimizer"]
            self.optimizer.load_state_dict({"state": {int(k): v for k, v in opt["state"].items()},
                                            "param_groups": opt["param_groups"]})
        m = state["metrics"]
        self._m_loss, self._m_updates = m["loss"], int(m["updates"])
        self._m_reward, self._m_reward_count = m["reward"], int(m["reward_count"])
        self._m_episodes, self._m_gen_count = int(m["episodes"]), int(m["gen_count"])
        self._m_gen = 0.0 if m["gen"] is None else m["gen"].double()
        if isinstance(self._m_gen, Tensor) and self.agent is not None:
            self._m_gen = self._m_gen.to(next(self.agent.parameters()).device)
