"""``mtkd_rl``: MTKD-RL (Yang et al., AAAI 2025), teacher weights from a policy-gradient agent.

Implements ``shared/MTKD-RL-SPEC.md``. Three variants share the state, the agent, the fusion
with confidence weights, the schedule, the episode buffer, checkpointing and DDP; they
differ in reward and objective:

- ``align`` (default): the SPEC's amendment "a variant that learns". A bounded,
  informative reward and a bounded objective.
- ``paper``: Equ. 6-8 as the SPEC reads them, kept for reproduction. Measured: its
  objective has no minimum and its reward carries no label signal (below).
- ``official``: the authors' code, for comparison.

Notation: B batch, M teachers, C classes, T the KD temperature, alpha / beta the loss
weights of Equ.(2) (handed over by the Distiller through ``setup``). Modules:
:mod:`.agent` (agent, state), :mod:`.action` (Equ. 9-14), :mod:`.rewards` (rewards and
objectives), :mod:`.buffer` (episode buffer), :mod:`.policy` (the policy).

State (Equ. 5)
    Per teacher m and sample i, detached, float32::

        s[i, m] = [f_Tm[i] (d_m) || z_Tm[i] (C, raw logits) || CE_Tm[i] || cos[m, i] || KL[m, i]]

    ``f_Tm`` the teacher's pooled pre-logit embedding, ``cos`` the cosine between the pooled
    projected student feature and the teacher's feature, ``KL = T^2 KL(p_T || p_S)``. The M
    vectors are concatenated in pool order: ``(B, S)``, ``S = sum_m (d_m + C + 3)``.
    ``state_norm: running`` (default for align; raw states have an L2 norm near 50)
    standardises every dimension with the exact running mean / var of all training states
    seen so far (float64 sums, updated only from training batches); the statistics are
    committed only when the agent is updated, so the acting policy stays frozen between
    updates; ``std = sqrt(var + 1e-5)``. ``none`` (default for paper / official) feeds it raw.

Agent (appendix A.1: one agent for all teachers)
    ``Linear(S -> hidden, bias=False) -> ReLU``, two heads ``Linear(hidden -> M)`` each with a
    softmax over teachers: the categorical policies ``pi_l, pi_f (B, M)`` of the two levels.
    Initialised by PyTorch's default init under a private RNG seeded with ``seed``.

Action (Equ. 9-14), deterministic
    Generator weight ``g = pi`` (paper, official) or, for align, its expectation with a
    probability floor ``g = (1 - floor) pi + floor / M`` (``floor`` 0.1: every teacher keeps at
    least ``floor / M``). Confidence ``c = (1 - softmax_m(CE_T)) / (M - 1)`` (Equ. 9);
    divergence ``d_l = softmax_m(KL)`` (Equ. 12), ``d_f = softmax_m(cos)`` (Equ. 11), or with
    ``divergence: gated`` ``d * c / sum_m d * c`` (only teachers right on the label get it).
    ``w = gamma_g g + gamma_c c + gamma_d d`` per level (Equ. 13-14). ``gammas``: paper /
    official ``[1/3, 1/3, 1/3]``; align ``[2/3, 1/3, 0]``: the divergence term is dropped
    (Equ. 12 hands >= 1/3 of the logit weight to the teacher most unlike the student, the
    confidently wrong one when there is one; see benchmarks/README.md, policy discrimination)
    and the learned generator carries twice the confidence prior. Give ``[g, c, d]`` for both
    levels or ``{logit: [...], feat: [...]}``; each non-negative, summing to 1, so rows of w
    sum to 1. ``learnable_gammas: true`` (paper / official) makes each triple a softmax of a
    learnable 3-vector trained by the agent loss.

Fusion, ``variant: align`` (``fusion``)
    ``mix``: ``w = 2/3 g + 1/3 c`` as above. ``refine`` (default): the agent refines the
    confidence prior instead of being averaged with it: per level, ``w = pi = softmax(log c +
    mu_theta(s))`` (``c`` floored at 1e-12 inside the log) with the heads ``mu`` initialised to
    0, so at initialisation the weights are exactly ``c`` and the agent moves them only where
    its advantages say so; each level has its own head, so a teacher cut at the logit level by
    ``c`` can be restored at the feature level and one with intact logits but useless features
    cut there (the prior at each level: see ``prior``). ``floor`` defaults to 0 for
    ``refine`` (so the initial weights are ``c``); ``gammas`` / ``divergence`` do not apply.
    The objective replaces the entropy bonus (which pulls toward uniform) by a KL to the prior::

        L = -mean_i [sum_m pi_im A_im - tau KL(pi_i || c_i)]

    per state minimised by ``pi ~ c exp(A / tau)`` (the prior itself where ``A = 0``, e.g.
    identical teachers), bounded by ``-max|A| <= L <= max|A| + tau max log(1 / c)``. What the
    agent sees that ``c`` cannot: ``c`` reads only each teacher's CE on the label; the state
    also holds the teacher's full logits and embedding, the student-teacher KL and the
    projected-feature cosine, and the reward measures whether each level's term helps the
    student's label loss, so it can lower a teacher whose CE is fine but whose soft labels or
    features do not help, per level.

    ``prior`` (refine only): ``confidence`` puts Equ. 9's ``c`` at both levels;
    ``consensus`` puts ``c * a`` (rows renormalised) at the logit level, where ``a`` is the
    teachers' consensus on the dark knowledge (:mod:`distill.policies.consensus`): per sample,
    each teacher's KL from the mean of the others' distributions over the non-label classes,
    turned into weights by Equ. 9's form ``(1 - softmax_m(D)) / (M - 1)``. It sees a teacher
    whose top-1 and CE are intact but whose non-label probabilities are ordered wrongly, which
    neither ``c`` nor any first-order reward can (benchmarks/README.md, "The consensus prior").
    Needs M >= 3 (two teachers cannot outvote each other); the feature level keeps ``c``.
    ``auto`` (default): ``consensus`` with ``fusion: refine`` and M >= 3, else ``confidence``.

Reward and objective, ``variant: align``
    Per sample i and teacher m, bounded in [-1, 1] (:func:`.rewards.alignment_rewards`): does
    a step on teacher m's term lower the student's label loss? First order: the cosine
    between the per-sample gradients of the student's CE and of the term, on the student
    logits for KD (``cos(p_S - y, p_S^T - p_Tm^T)`` for Hinton KD) and on the tapped student
    feature through the head and projector m for FEAT. Computed in ``weights()``: the CE's
    gradients on the step's graph (through the head, none through the backbone), each
    teacher's on leaf copies of the logits and feature, the projectors re-run with their
    BatchNorm batch statistics as constants and DIST's batch-level term counted once, so row i
    is exactly sample i's own gradient on every projector type (:mod:`.persample`; the
    Distiller binds the projectors with ``bind_student``). ``reward: heldout`` replaces the
    logit level's reward by the alignment of teacher m's KD gradient with the CE gradient of
    the previous (held-out) batch in the student classifier's parameter space (learning to
    reweight, :mod:`.heldout`): the same-sample cosine penalises dark knowledge (mass on the
    classes similar to the label, which the sample's own CE pushes down); the held-out one
    credits it where it lowers the CE of those classes' samples (an inner product, not bounded;
    the objective's bound below holds for any reward). Default ``heldout`` (it needs a student
    whose logits are its linear classifier on the pooled pre-logits; ``align`` for others).
    Advantage ``A = (u - mean_m u) / (std_batch(u) + 1e-6)``; per level the
    all-actions policy gradient with an entropy term::

        L = -mean_i [sum_m pi_im A_im + tau H(pi_i)],   tau = 0.2

    bounded by construction, ``-(max|A| + tau log M) <= L <= max|A|``, per-state optimum
    ``softmax(A / tau)``; a value outside the bound stops training with one line. The agent
    loss logged is the sum of both levels.
    Update: SGD lr 0.01, momentum 0.9, gradient-norm clip 1. Trust region: before each
    replayed batch, ``KL(pi_old || pi_new)`` on it (mean over samples, max over levels;
    ``pi_old`` is what the acting policy output when it acted, stored with the episode) is
    computed; once it exceeds ``kl_limit`` (0.05) the period's remaining updates are skipped.
    The replay standardises the states with the statistics the policy acted with: a period's
    statistics are committed after its updates (before the very first update, whose heads are
    still 0, they are committed first), so an unchanged agent has KL 0 exactly.

Reward and objective, ``variant: paper`` (Equ. 6-8)
    ``R[i, m] = -CE_S[i] - alpha KD[i, m] - beta FEAT[i, m]``; per sample min-max over
    teachers, then centred (``sum_m Rbar = 0``); ``L = -mean_i sum_m Rbar (log g_l + log g_f)``
    (``pg_form: prob``: ``g`` instead of ``log g``, Equ. 7 as printed). Measured flaws (issue
    13, CIFAR-10 CPU study): with centred rewards the loss is linear in the heads' logits,
    so it has no minimum and the agent's weights grow without bound (agent loss -46.8 to
    -18,220 over 15 epochs even with a gradient clip; non-finite without one); and CE_S is
    the same for every teacher, so the reward ranks teachers by the student-teacher gap
    alone and prefers the teacher the student already matches. ``max_grad_norm`` bounds the
    growth per step. A non-finite agent raises a DistillError naming the options.

Reward and objective, ``variant: official`` (the authors' code)
    One reward per sample ``r = -(CE + alpha sum_m w_l KD + beta sum_m w_f FEAT)`` with the
    step's weights, z-scored over the batch, clamped to [0, 1]; ``L = -mean_{i,m} rhat_i (log
    w_l + log w_f)`` on the fused weights (optimum: uniform weights).

Schedule (Algorithms 1-2)
    Epochs ``< warmup_epochs`` (default 1): every weight is ``warmup_weight`` (default 1/M;
    official: the authors' 1, i.e. the distillation loss x M for that epoch, which measured
    alone costs a 15-epoch run ~6 points); (state, reward) recorded; the agent is trained at
    the epoch's end. Later epochs: the agent is frozen and drives the student; episodes are
    recorded; at the epoch's end one optimiser step per recorded batch in recording order.
    Defaults per variant: lr 0.1, momentum 0, no clip (paper, official: the authors'
    values); lr 0.01, momentum 0.9, ``max_grad_norm`` 1 (align). ``max_grad_norm: 0`` turns
    the clip off. ``update_every: K`` also updates after every K recorded batches.

Episode buffer (:class:`.buffer.EpisodeBuffer`)
    At most ``buffer`` batches (default 1024) per period, reservoir-sampled from a private
    generator seeded with ``seed``, replayed in recording order; on the host, the state in
    ``buffer_dtype`` (align: float32, so the agent trains on exactly the states it acted on;
    paper / official: bfloat16), the rest float32; align also keeps the acting policy's
    ``log pi`` of both levels ``(2, B, M)``.

Checkpoint (exact resume)
    ``state_dict()`` holds the agent's parameters, learnable gammas and running statistics;
    ``get_extra_state`` the pool shapes, the agent optimiser, the buffer and its generator,
    the epoch and the epoch's metric sums.

Distributed
    Each rank records its own episodes; agent gradients (and running-statistic sums) are
    all-reduced, the align advantages are scaled by the std of the global batch and the
    trust-region KL is the global batch's mean, so every rank holds the identical agent,
    the one a single process with the global batch would train.
    Ranks must record the same number of batches per period (equal shards).

Metrics (``policy/<key>`` in summary.csv): ``agent_loss`` (mean over the epoch's updates),
``agent_param_norm``, ``reward`` (mean raw reward), ``agent_updates``, ``episodes``,
``g_logit/<m>`` / ``g_feat/<m>`` (mean executed generator weights while the agent drove the
student); align adds ``reward_logit/<m>`` / ``reward_feat/<m>`` (mean u per teacher),
``entropy_logit`` / ``entropy_feat`` (mean entropy of the acting policy on the replayed
states), ``trust_kl`` (the last KL measured) and ``trust_stops``; ``gamma_*`` with learnable
gammas.
"""

from .action import divergence_weights, floored, fuse, gated_divergence, parse_gammas
from .agent import MTKDAgent, build_state
from .buffer import EpisodeBuffer
from .args import VARIANTS
from .policy import MTKDRLPolicy
from .heldout import HeldoutGradient, heldout_alignment
from .persample import PerSampleTerms, batch_stats_as_constants, per_sample_terms
from .rewards import (advantages, align_loss, align_loss_bounds, alignment_rewards, feature_alignment,
                      heldout_rewards, logit_alignment, normalise_rewards, official_rewards, paper_rewards)

__all__ = ["MTKDAgent", "MTKDRLPolicy", "EpisodeBuffer", "HeldoutGradient", "PerSampleTerms", "VARIANTS",
           "advantages", "align_loss", "align_loss_bounds", "alignment_rewards", "batch_stats_as_constants",
           "build_state", "divergence_weights", "feature_alignment", "floored", "fuse", "gated_divergence",
           "heldout_alignment", "heldout_rewards", "logit_alignment", "normalise_rewards", "official_rewards",
           "paper_rewards", "parse_gammas", "per_sample_terms"]
