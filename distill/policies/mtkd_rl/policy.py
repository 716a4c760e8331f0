"""The ``mtkd_rl`` policy: state, action, episode recording, agent updates, metrics, checkpoint.

See the package docstring (:mod:`distill.policies.mtkd_rl`) for every equation and choice.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...distributed import is_distributed
from ...errors import DistillError
from ...signals import Signals, StudentOutputs, TeacherOutputs
from ..base import Weights, WeightingPolicy, register_policy
from ..camkd import confidence_weights
from ..consensus import consensus_prior
from .action import (STEP_WEIGHTS, divergence_weights, floored, fuse, gated_divergence, parse_gammas,
                     refine_priors)
from .args import BUFFER_DTYPES, VARIANT_DEFAULTS, check_mtkd_args, resolve_prior
from .agent import MTKDAgent, build_state, kl_divergence, level_loss, optimiser_step
from .buffer import EpisodeBuffer, to_host
from .checkpoint import SETTINGS, load_policy_state, policy_state
from .heldout import HeldoutGradient
from .metrics import epoch_summary, new_metrics
from . import rewards as R


@register_policy
class MTKDRLPolicy(WeightingPolicy):
    """MTKD-RL: fused generator / confidence / divergence weights from an RL agent.

    See the package docstring for every equation and every choice made.
    """

    name = "mtkd_rl"

    def __init__(self, num_teachers: int, variant: str = "align", hidden: int = 128, gammas: Any = None,
                 divergence: Optional[str] = None, learnable_gammas: bool = False, lr: Optional[float] = None,
                 momentum: Optional[float] = None, weight_decay: float = 0.0, max_grad_norm: Optional[float] = None,
                 warmup_epochs: int = 1, warmup_weight: Optional[float] = None, buffer: int = 1024,
                 update_every: Optional[int] = None, buffer_dtype: Optional[str] = None,
                 state_norm: Optional[str] = None, seed: int = 0, pg_form: str = "log",
                 floor: Optional[float] = None, tau: Optional[float] = None, kl_limit: Optional[float] = None,
                 reward: Optional[str] = None, fusion: Optional[str] = None, prior: Optional[str] = None):
        super().__init__(num_teachers)
        given = dict(variant=variant, hidden=hidden, gammas=gammas, divergence=divergence,
                     learnable_gammas=learnable_gammas, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     max_grad_norm=max_grad_norm, warmup_epochs=warmup_epochs, warmup_weight=warmup_weight,
                     buffer=buffer, update_every=update_every, buffer_dtype=buffer_dtype, state_norm=state_norm,
                     seed=seed, pg_form=pg_form, floor=floor, tau=tau, kl_limit=kl_limit, reward=reward,
                     fusion=fusion, prior=prior)
        type(self).check_args({k: v for k, v in given.items() if v is not None})
        defaults = VARIANT_DEFAULTS[variant]
        self.variant, self.hidden, self.seed = variant, hidden, seed
        self.gamma_rows = parse_gammas(gammas, defaults["gammas"])
        self.divergence = divergence or "equ12"
        self.learnable_gammas = learnable_gammas
        self.lr = float(defaults["lr"] if lr is None else lr)
        self.momentum = float(defaults["momentum"] if momentum is None else momentum)
        self.weight_decay = float(weight_decay)
        self.max_grad_norm = float(defaults["max_grad_norm"] if max_grad_norm is None else max_grad_norm)
        self.state_norm = defaults["state_norm"] if state_norm is None else state_norm
        self.warmup_epochs = warmup_epochs
        self.warmup_weight = float(warmup_weight if warmup_weight is not None
                                   else 1.0 if variant == "official" else 1.0 / num_teachers)
        self.update_every = update_every
        self.buffer_dtype = BUFFER_DTYPES[buffer_dtype or defaults["buffer_dtype"]]
        self.pg_form = pg_form
        self.fusion = fusion or defaults["fusion"]
        self.floor = (0.0 if self.fusion == "refine" else 0.1) if floor is None else float(floor)
        self.tau = 0.2 if tau is None else float(tau)
        self.kl_limit = 0.05 if kl_limit is None else float(kl_limit)
        self.reward = reward or defaults["reward"]
        self.prior = resolve_prior(prior, self.fusion, num_teachers)
        self.heldout = HeldoutGradient() if self.reward == "heldout" else None
        self.alpha, self.beta, self.temperature, self.logit_loss = 1.0, 5.0, 4.0, "kd"
        self.projectors: Optional[List[nn.Module]] = None  # bound by the Distiller (plain list: not submodules)
        self.classifier_bias: Optional[bool] = None  # the student's classifier has a bias (None: no linear one)
        self.agent: Optional[MTKDAgent] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.dims: Optional[Dict[str, Any]] = None  # {"embed": [d_m], "classes": C}
        self.buffer = EpisodeBuffer(buffer, seed)
        self.epoch = 0
        self._step_cache: Optional[Tuple[Any, ...]] = None  # (weakref to Signals, per-step tensors)
        self._reset_metrics()

    # -- arguments ------------------------------------------------------------

    def extra_repr(self) -> str:
        """Return the settings the policy resolved from its arguments and the pool, e.g. ``prior=consensus``."""
        return ", ".join(f"{k}={getattr(self, k)}" for k in SETTINGS)

    @classmethod
    def check_args(cls, args: Dict[str, Any]) -> None:
        """Raise ValueError for an unknown key, a bad value or a key the variant does not use."""
        super().check_args(args)
        check_mtkd_args(args)

    # -- building ---------------------------------------------------------------

    def bind_student(self, projectors: Sequence[nn.Module], classifier: Optional[nn.Linear]) -> None:
        """Keep the projectors (align: the reward differentiates each teacher's term per sample
        through them, :mod:`.persample`) and whether the student's classifier has a bias.
        Raises DistillError for ``reward: heldout`` without a linear classifier (``None``)."""
        if self.heldout is not None and classifier is None:
            raise DistillError("policy 'mtkd_rl': reward heldout (the default) needs a student whose logits are its "
                             "linear classifier applied to the pooled pre-logits (no head dropout); "
                             "give policy_args: {reward: align} for another student")
        self.projectors = list(projectors)
        self.classifier_bias = None if classifier is None else classifier.bias is not None

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
        self.build_agent(dims, teachers.logits.device)

    def build_agent(self, dims: Dict[str, Any], device: torch.device) -> None:
        """Build the agent, its optimiser and ``self.dims`` for teacher shapes ``dims`` (``{"embed": [d_m],
        "classes": C}``) on ``device``; with an agent already built, raise ValueError for other shapes."""
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
        if self.variant == "align":  # start at the uniform policy: no preference before any reward
            for head in (agent.head_logit, agent.head_feat):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
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
        """Return True during the pre-training epochs (fixed weights, agent not used)."""
        return self.epoch < self.warmup_epochs

    def _step_tensors(self, signals: Signals, teachers: TeacherOutputs, student: StudentOutputs,
                      target: Tensor) -> Dict[str, Tensor]:
        """Return this step's state, confidence / divergence weights, (``prior: consensus``) the
        logit level's prior and (align) rewards, once per step."""
        with torch.autocast(signals.student_ce.device.type, enabled=False):
            out: Dict[str, Tensor] = {}
            if self.variant == "align":  # needs the step's graph: before backward
                out["reward"] = R.align_step_rewards(signals, teachers, student, self.projectors, self.temperature,
                                                     self.logit_loss, self.heldout)  # (2, B, M)
            with torch.no_grad():
                out["state"] = build_state(signals, teachers)
                out["conf"] = confidence_weights(signals.teacher_ce)
                if self.prior == "consensus":
                    out["prior_logit"] = consensus_prior(out["conf"], teachers.logits, target)
                if self.learnable_gammas or self.gamma_rows[0][2] > 0:
                    out["div_logit"] = self._divergence(divergence_weights(signals.kl), out["conf"])
                if self.learnable_gammas or self.gamma_rows[1][2] > 0:
                    out["div_feat"] = self._divergence(divergence_weights(signals.cos), out["conf"])
        return out

    def _divergence(self, d: Tensor, conf: Tensor) -> Tensor:
        return gated_divergence(d, conf) if self.divergence == "gated" else d

    def _fused(self, gammas: Tensor, generator: Tensor, step: Dict[str, Tensor], level: str) -> Tensor:
        div = step.get(f"div_{level}")
        return fuse(gammas, generator, step["conf"], div if div is not None else torch.zeros_like(generator))

    def _policy(self, step: Dict[str, Tensor], device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
        """Return the agent's ``log pi_l, log pi_f`` ``(B, M)`` on a step's (or, moved to ``device``
        in float32, a replayed episode's) state; ``fusion: refine`` puts the priors in (:func:`refine_priors`)."""
        state = step["state"] if device is None else step["state"].to(device, torch.float32)
        if self.fusion != "refine":
            return self.agent(state)
        return self.agent(state, refine_priors(step, state.device))

    def _generator(self, log_pi: Tensor) -> Tensor:
        """Return the executed generator weight from the head's log-policy ``(B, M)``."""
        return floored(log_pi.exp(), self.floor) if self.variant == "align" else log_pi.exp()

    def weights(self, signals: Signals, teachers: TeacherOutputs, student: StudentOutputs,
                target: Tensor) -> Weights:
        """Return ``w_l, w_f`` ``(B, M)``: the warm-up weight while warming up, else Equ.(13)-(14)."""
        batch, device = signals.student_ce.shape[0], signals.student_ce.device
        step = self._step_tensors(signals, teachers, student, target)
        self._step_cache = (weakref.ref(signals), step)  # observe() of the same step reuses it
        if self.warming_up():
            w = torch.full((batch, self.num_teachers), self.warmup_weight, device=device)
            return Weights(w, w)
        self._ensure_agent(teachers)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            log_pl, log_pf = self._policy(step)
            step["log_pi"] = torch.stack([log_pl, log_pf])  # the acting policy: the trust region's pi_old
            g_l, g_f = self._generator(log_pl), self._generator(log_pf)
            if self.fusion == "refine":  # softmax(log c + mu): the prior is inside the policy
                w_l, w_f = g_l, g_f
            else:
                gam = self.agent.gammas()
                w_l, w_f = self._fused(gam[0], g_l, step, "logit"), self._fused(gam[1], g_f, step, "feat")
            self._add("gen", torch.stack([g_l.sum(0), g_f.sum(0)]).double(), batch)
        return Weights(w_l, w_f)

    def observe(self, signals: Signals, weights: Weights, teachers: TeacherOutputs, student: StudentOutputs,
                target: Tensor) -> None:
        """Record this step's (state, confidence / divergence weights, reward) episode."""
        agent = self._ensure_agent(teachers)
        cache, self._step_cache = self._step_cache, None
        if cache is not None and cache[0]() is signals:
            step = cache[1]
        elif self.variant == "align":
            raise ValueError("policy 'mtkd_rl' (variant align): observe() needs the weights() call of the same "
                             "step (the reward is computed there, on the step's graph)")
        else:
            step = self._step_tensors(signals, teachers, student, target)
        with torch.no_grad(), torch.autocast(signals.student_ce.device.type, enabled=False):
            if agent.running_norm:
                agent.accumulate(step["state"])
            if self.variant == "paper":
                raw = reward = R.paper_rewards(signals, self.alpha, self.beta)
            elif self.variant == "official":
                raw, reward = R.official_rewards(signals, weights, self.alpha, self.beta)
            else:
                raw = reward = step["reward"]
                self._add("reward_teacher", raw.double().sum(1), raw.shape[1])  # (2, M) per level and teacher
                if self.heldout is not None:  # this batch is the next step's held-out batch
                    self.heldout.update(student.logits, target, student.embedding, self.classifier_bias)
            self._add("reward", raw.double().sum(), raw.numel())
            self.metrics["episodes"][0] += 1
            slot = self.buffer.reserve()
            if slot is not None:  # copied to the host only when the reservoir keeps it
                entry = {"step": self.buffer.step - 1, "state": to_host(step["state"], self.buffer_dtype),
                         "reward": to_host(reward)}
                entry.update({k: to_host(step[k]) for k in STEP_WEIGHTS if k in step})
                if self.variant == "align":  # what the policy output at act time (warm-up: the agent then)
                    entry["log_pi"] = to_host(step["log_pi"] if "log_pi" in step else torch.stack(self._policy(step)))
                self.buffer.store(slot, entry)
        if self.update_every is not None and self.buffer.seen >= self.update_every:
            self._update()

    # -- agent update --------------------------------------------------------------

    def _log_weights(self, entry: Dict[str, Tensor], device: torch.device) -> Tuple[Tensor, Tensor]:
        """Return the log of the weights the paper / official objectives act on, ``(B, M)`` each."""
        log_gl, log_gf = self.agent(entry["state"].to(device, torch.float32))
        if self.variant == "paper" and not self.agent.learnable_gammas:
            return log_gl, log_gf
        gam = self.agent.gammas()
        step = {k: v.to(device, torch.float32) for k, v in entry.items() if k in STEP_WEIGHTS}
        return (self._fused(gam[0], log_gl.exp(), step, "logit").clamp_min(1e-12).log(),
                self._fused(gam[1], log_gf.exp(), step, "feat").clamp_min(1e-12).log())

    def agent_loss(self, entry: Dict[str, Any]) -> Tensor:
        """Return the agent loss of one recorded batch (scalar, with graph to the agent); for
        ``align`` the sum of both levels' :func:`~.rewards.align_loss`, checked against its bound."""
        return self._agent_loss(entry)[0]

    def _agent_loss(self, entry: Dict[str, Any], pi_old: Optional[Tuple[Tensor, Tensor]] = None
                    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Return (loss, KL(pi_old || pi_new) averaged over samples, max over levels, or None)."""
        device = next(self.agent.parameters()).device
        reward = entry["reward"].to(device, torch.float32)
        if self.variant == "paper":
            return R.paper_loss(reward, *self._log_weights(entry, device), self.pg_form), None
        if self.variant == "official":
            return R.official_loss(reward, *self._log_weights(entry, device)), None
        log_pi = self._policy(entry, device)
        priors = refine_priors(entry, device) if self.fusion == "refine" else (None, None)
        loss = sum(level_loss(lp, u, self.tau, prior, level, self.epoch)
                   for level, (lp, u, prior) in enumerate(zip(log_pi, reward, priors)))
        kl = None
        if pi_old is not None:
            kl = torch.stack([kl_divergence(old, new.detach()) for old, new in zip(pi_old, log_pi)]).max()
        return loss, kl

    def _update(self) -> None:
        """One agent optimiser step per buffered batch, in recording order (``align``: until the
        trust region is left); then empty the buffer."""
        agent = self.agent
        if agent is None:
            return
        # the replay sees the states as the acting policy did: the period's statistics are committed
        # after its updates, except before the first update (heads still at 0 for align: same policy)
        late_commit = agent.running_norm and float(agent.stat_count) > 0
        if agent.running_norm and not late_commit:
            agent.commit()
        entries = self.buffer.replay()
        self.buffer.clear()
        if not entries:
            if late_commit:
                agent.commit()
            return
        device = next(agent.parameters()).device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # host copies were non-blocking
        params = [p for p in agent.parameters() if p.requires_grad]
        align = self.variant == "align"
        pi_old: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(entries)
        if align:  # the acting policy: what it output when it acted, stored with the episode
            pi_old = [tuple(e["log_pi"].to(device, torch.float32)) for e in entries]
            for old in pi_old:
                self._add("entropy", torch.stack([R.entropy(lp).mean() for lp in old]).double(), 1)
        period_loss: Any = torch.zeros((), dtype=torch.float64, device=device)
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for entry, old in zip(entries, pi_old):
                loss, kl = self._agent_loss(entry, old)
                if kl is not None:
                    if is_distributed():  # the global batch's mean KL: every rank takes the same decision
                        dist.all_reduce(kl)
                        kl = kl / dist.get_world_size()
                    kl_value = float(kl)  # one host sync: the trust region's decision needs it here
                    self.metrics["kl"] = [kl_value, 1]
                    if kl_value > self.kl_limit:
                        self.metrics["trust_stops"][0] += 1
                        break
                optimiser_step(self.optimizer, params, loss, self.max_grad_norm)
                period_loss = period_loss + loss.detach().double()
                self.metrics["updates"][0] += 1
        if late_commit:
            agent.commit()
        self.metrics["loss"][0] = self.metrics["loss"][0] + period_loss
        if not (torch.isfinite(period_loss) and all(torch.isfinite(p).all() for p in params)):
            raise DistillError(
                f"policy 'mtkd_rl': the agent diverged (non-finite agent loss or parameters) in the update of "
                f"epoch {self.epoch + 1}. The 'paper' objective -sum_m Rbar log g has no minimum, so the agent "
                "grows without bound; use variant align (the default), or bound it with distill.policy_args "
                "max_grad_norm (e.g. 1.0) or pg_form: prob")

    # -- epochs and metrics ----------------------------------------------------------

    def _reset_metrics(self) -> None:
        self.metrics = new_metrics()  # the epoch's name -> [sum, count]; sums may be device tensors (no host sync)

    def _add(self, key: str, value: Any, count: int) -> None:
        total = self.metrics[key]
        total[0] = total[0] + value
        total[1] += count

    def begin_epoch(self, epoch: int) -> None:
        """Start ``epoch``: epochs before ``warmup_epochs`` use the warm-up weight."""
        self.epoch = epoch
        self._reset_metrics()

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        """Update the agent on the epoch's episodes; return the epoch's agent metrics."""
        self._update()
        return epoch_summary(self.metrics, self.agent, self.variant, self.num_teachers)

    # -- checkpoint ---------------------------------------------------------------

    def get_extra_state(self) -> Dict[str, Any]:
        """Return everything besides parameters / buffers that an exact resume needs (:mod:`.checkpoint`)."""
        return policy_state(self)

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`get_extra_state`'s output; refuse one trained with other settings (:mod:`.checkpoint`)."""
        load_policy_state(self, state)
