"""The MTKD-RL agent: ``fusion: refine`` (weights ``softmax(log c + mu)``, exactly the confidence
prior at initialisation), the trust region measured against the policy that acted, and the
fp32 replay of exactly the states it acted on. Real distillation steps through the Distiller
on the tiny synthetic pools of ``test_mtkd_rl_align``."""

import math
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tiny pools of test_mtkd_rl_align

from distill.distiller import Distiller  # noqa: E402
from distill.policies import build_policy  # noqa: E402
from distill.policies.camkd import confidence_weights  # noqa: E402
from distill.policies.consensus import consensus_prior  # noqa: E402
from distill.policies.mtkd_rl.agent import refine_loss, refine_loss_bounds  # noqa: E402
from test_mtkd_rl_align import (BATCH, DATA, TAP, NoiseFeatureNet, TinyNet, dataset, distil, make_pool,  # noqa: E402
                                shifted, trained_teacher)


@pytest.fixture(scope="module")
def good_teachers():
    return [trained_teacher(s) for s in range(3)]


def one_step(models, args, seed=0):
    """Return (policy, distiller output) of one step of an agent-driven epoch (no warm-up)."""
    torch.manual_seed(seed)
    policy = build_policy("mtkd_rl", len(models), {"warmup_epochs": 0, **args})
    distiller = Distiller(TinyNet(hidden=8), make_pool(models), policy, TAP, DATA.input_size)
    policy.begin_epoch(0)
    x, y = dataset(BATCH, seed=seed)
    return policy, distiller(x, y)


def test_default_weights_at_initialisation_are_exactly_the_prior(good_teachers):
    models = good_teachers + [shifted(good_teachers[0])]  # a spread of confidences, one near 0
    policy, out = one_step(models, {})  # the default: reward heldout, fusion refine, prior auto (consensus)
    assert (policy.reward, policy.fusion, policy.prior) == ("heldout", "refine", "consensus")
    c = confidence_weights(out.signals.teacher_ce)
    assert c[:, 3].max() < 0.05 and c.max() > 0.3  # the prior is far from uniform
    _, y = dataset(BATCH, seed=0)  # one_step's batch
    prior = consensus_prior(c, out.teachers.logits, y)
    assert (prior - c).abs().max() > 0.05  # the consensus moves the confidence here
    assert (out.weights.logit - prior).abs().max() <= 1e-6
    assert (out.weights.feat - c).abs().max() <= 1e-6
    # prior confidence: c at both levels
    policy, out = one_step(models, {"prior": "confidence"})
    assert (out.weights.logit - c).abs().max() <= 1e-6
    assert (out.weights.feat - c).abs().max() <= 1e-6
    # mix at initialisation: 2/3 of the floored uniform generator + 1/3 c
    policy, out = one_step(models, {"fusion": "mix"})
    assert torch.allclose(out.weights.logit, 2 / 3 * 0.25 + c / 3, atol=1e-6)


def test_refine_identical_teachers_stay_uniform(good_teachers):
    means, metrics = distil([good_teachers[0]] * 4, epochs=4, args={"fusion": "refine"})
    assert torch.allclose(means, torch.full_like(means, 0.25), atol=0.01), means
    assert all(metrics[e]["agent_updates"] > 0 for e in range(4))


def test_refine_cuts_the_noise_feature_teacher_at_the_feature_level_only(good_teachers):
    models = good_teachers + [NoiseFeatureNet(good_teachers[0])]
    means, _ = distil(models, epochs=4, args={"fusion": "refine"})
    # the prior cannot see it (its logits are intact: c ~ 1/M); the agent moves the feature weight
    assert means[0, 1, 3] == pytest.approx(0.25, abs=0.03), means[0]
    assert means[3, 1, 3] < 0.12, means[:, 1]
    assert means[3, 0, 3] > 0.2, means[:, 0]  # its logit weight stays near the prior


def test_refine_objective_optimum_is_the_prior_tilted_by_the_advantages():
    torch.manual_seed(0)
    prior = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    adv = torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.0, 0.0]])
    tau = 0.2
    best = (prior.log() + adv / tau).log_softmax(1)
    at_best = refine_loss(best, prior, adv, tau).item()
    assert at_best == pytest.approx(-(tau * torch.logsumexp(prior.log() + adv / tau, 1)).mean().item(), abs=1e-5)
    # no advantage: the optimum is the prior itself, loss 0
    assert torch.allclose(best[1].exp(), prior[1], atol=1e-6)
    low, high = refine_loss_bounds(adv, prior, tau)
    assert (low, high) == pytest.approx((-0.5, 0.5 + tau * math.log(10)))
    for _ in range(50):
        other = torch.randn(2, 3).mul(3).log_softmax(1)
        value = refine_loss(other, prior, adv, tau).item()
        assert at_best - 1e-6 <= value and low <= value <= high


def run_epochs(models, args, epochs, hook=None):
    """Train a tiny student for ``epochs`` (epoch 0 warm-up); call ``hook(policy)`` before each
    end_epoch; return the policy and its per-epoch metrics."""
    torch.manual_seed(0)
    policy = build_policy("mtkd_rl", len(models), args)
    distiller = Distiller(TinyNet(hidden=8), make_pool(models), policy, TAP, DATA.input_size)
    opt = torch.optim.SGD(distiller.trainable.parameters(), lr=0.1, momentum=0.9)
    x_all, y_all = dataset(BATCH * 6, seed=0)
    metrics = []
    for epoch in range(epochs):
        policy.begin_epoch(epoch)
        for s in range(6):
            x, y = x_all[s * BATCH:(s + 1) * BATCH], y_all[s * BATCH:(s + 1) * BATCH]
            out = distiller(x, y)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            policy.observe(out.signals, out.weights, out.teachers, out.student, y)
        if hook is not None:
            hook(policy)
        metrics.append(policy.end_epoch(epoch))
    return policy, metrics


@pytest.mark.parametrize("fusion", ["mix", "refine"])
def test_trust_region_kl_is_against_the_policy_that_acted(good_teachers, fusion):
    models = good_teachers + [shifted(good_teachers[0])]
    # kl_limit 1e-9: the first replayed batch of a period is measured before any step of that
    # period, so it passes only if the KL is exactly 0 for the unchanged agent; the second
    # (after one step) stops the period
    args = {"kl_limit": 1e-9, "fusion": fusion}
    norms = []
    policy, metrics = run_epochs(models, args, 3, hook=lambda p: norms.append(p.agent.norm_mean.clone()))
    assert [m["agent_updates"] for m in metrics] == [1, 1, 1]
    assert [m["trust_stops"] for m in metrics] == [1, 1, 1] and metrics[2]["trust_kl"] > 1e-9
    # the normaliser did change between acting and updating (this period's states are committed)
    assert not torch.equal(norms[2], policy.agent.norm_mean)
    # the agent acted in epochs 1-2 with non-uniform outputs: an unchanged agent's KL is 0 only
    # against what it output then; change the normaliser before the update and it is not
    changed = lambda p: p.agent.commit() if p.epoch == 2 else None  # noqa: E731
    _, metrics = run_epochs(models, args, 3, hook=changed)
    assert metrics[2]["agent_updates"] == 0 and metrics[2]["trust_kl"] > 1e-9


@pytest.mark.parametrize("prior", ["confidence", "consensus"])
def test_replayed_states_and_policies_are_exactly_the_acted_ones(good_teachers, prior):
    models = good_teachers + [shifted(good_teachers[0])]
    torch.manual_seed(0)
    policy = build_policy("mtkd_rl", 4, {"fusion": "refine", "prior": prior})
    assert policy.buffer_dtype == torch.float32  # align's default: no bf16 rounding of the states
    distiller = Distiller(TinyNet(hidden=8), make_pool(models), policy, TAP, DATA.input_size)
    x, y = dataset(BATCH, seed=0)
    for epoch in range(2):
        policy.begin_epoch(epoch)
        out = distiller(x, y)
        acted = {k: v.clone() for k, v in policy._step_cache[1].items()}
        policy.observe(out.signals, out.weights, out.teachers, out.student, y)
        (entry,) = policy.buffer.replay()
        assert entry["state"].dtype == torch.float32 and torch.equal(entry["state"], acted["state"])
        if epoch == 1:  # the agent acted: the episode holds its output, and the replay reproduces it
            assert torch.equal(entry["log_pi"], acted["log_pi"])
            with torch.no_grad():
                replayed = torch.stack(policy._policy(entry, torch.device("cpu")))
            assert torch.equal(replayed, acted["log_pi"])
            assert torch.allclose(out.weights.logit, acted["log_pi"][0].exp())
        policy.end_epoch(epoch)


def test_a_checkpoint_without_the_acting_policy_is_refused_in_one_line():
    from distill.signals import TeacherOutputs

    teachers = TeacherOutputs(torch.zeros(3, 1, 3), [torch.zeros(1, 4)] * 3, [torch.zeros(1, 4)] * 3)
    policy = build_policy("mtkd_rl", 3, {})
    policy.setup(teachers)
    state = policy.get_extra_state()
    assert state["version"] == 3
    with pytest.raises(ValueError, match="unsupported checkpoint state version 2"):
        policy.set_extra_state(dict(state, version=2))  # episodes of version 2 lack the acting policy


def test_a_checkpoint_trained_with_other_settings_is_refused_in_one_line():
    """A resume whose defaults now resolve otherwise (prior auto: the consensus for M >= 3) would
    change how the policy acts mid-run: refused, naming the argument that restores it."""
    from distill.signals import TeacherOutputs

    teachers = TeacherOutputs(torch.zeros(3, 1, 3), [torch.zeros(1, 4)] * 3, [torch.zeros(1, 4)] * 3)
    old = build_policy("mtkd_rl", 3, {"prior": "confidence"})
    old.setup(teachers)
    state = old.get_extra_state()
    assert state["settings"] == {"variant": "align", "reward": "heldout", "fusion": "refine", "prior": "confidence"}
    new = build_policy("mtkd_rl", 3, {})
    new.setup(teachers)
    assert new.prior == "consensus"
    with pytest.raises(ValueError, match=r"trained with prior confidence; this run resolves prior consensus "
                                         r"\(give distill.policy_args prior: confidence to resume it\)$"):
        new.set_extra_state(state)
    same = build_policy("mtkd_rl", 3, {"prior": "confidence"})
    same.setup(teachers)
    same.set_extra_state(state)
    assert same.epoch == old.epoch
    # a state written before settings were stored carries no claim to check
    new.set_extra_state({k: v for k, v in state.items() if k != "settings"})
