"""MTKD-RL ``variant: align`` (the default): reward, objective bound, trust region, and what it
learns on pools with a known right answer (identical, class-shifted and noise-feature teachers).

The pools are tiny MLP classifiers with timm's classifier API on a synthetic 5-class problem,
so a few epochs of real distillation through the Distiller run in seconds."""

import math

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

from distill.distiller import Distiller  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.policies import build_policy  # noqa: E402
from distill.policies.mtkd_rl import advantages, align_loss, align_loss_bounds, alignment_rewards  # noqa: E402
from distill.resolve import DataSpec  # noqa: E402
from distill.signals import StudentOutputs, TeacherOutputs, compute_signals  # noqa: E402
from distill.taps import FeatureTap  # noqa: E402
from distill.teachers import InputAdapter, Teacher, TeacherPool  # noqa: E402

CLASSES, SIDE, BATCH, STEPS = 5, 4, 64, 10
DATA = DataSpec((1, SIDE, SIDE), (0.0,), (1.0,))
TAP = FeatureTap("pre_logits")


class TinyNet(nn.Module):
    """A one-hidden-layer MLP with timm's classifier API (forward_features / forward_head / get_classifier)."""

    def __init__(self, hidden: int = 24):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, CLASSES)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, f, pre_logits: bool = False):
        return f if pre_logits else self.fc(f)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class NoiseFeatureNet(TinyNet):
    """Intact logits, but the pre-logit feature it exposes is a deterministic pseudo-random
    function of the input with no class structure (``sin(1000 * f R)``)."""

    def __init__(self, trained: TinyNet):
        super().__init__()
        self.load_state_dict(trained.state_dict())
        self.register_buffer("mix", torch.randn(24, 24, generator=torch.Generator().manual_seed(7)))

    def forward_head(self, f, pre_logits: bool = False):
        return torch.sin(1000.0 * f @ self.mix) if pre_logits else self.fc(f)


def dataset(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, SIDE * SIDE, generator=torch.Generator().manual_seed(123)) * 1.2
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = centres[y] + torch.randn(n, SIDE * SIDE, generator=g)
    return x.view(n, 1, SIDE, SIDE), y


def trained_teacher(seed: int) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    x, y = dataset(1024, seed=100 + seed)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def shifted(net: TinyNet) -> TinyNet:
    """The same network with its classifier rows rolled: it predicts class c+1 for class c."""
    out = TinyNet()
    out.load_state_dict(net.state_dict())
    with torch.no_grad():
        out.fc.weight.copy_(net.fc.weight.roll(1, 0))
        out.fc.bias.copy_(net.fc.bias.roll(1, 0))
    return out


def make_pool(models):
    return TeacherPool([Teacher(f"{i}", m, InputAdapter(DATA, DATA.mean, DATA.std), TAP, DATA.input_size)
                        for i, m in enumerate(models)])


@pytest.fixture(scope="module")
def good_teachers():
    return [trained_teacher(s) for s in range(3)]


def distil(models, epochs, args=None, seed=0):
    """Train a tiny student with mtkd_rl on ``models``; return per-epoch mean weights ``(epochs, 2, M)``
    (levels logit, feat) and the per-epoch metrics."""
    torch.manual_seed(seed)
    policy = build_policy("mtkd_rl", len(models), dict(args or {}))
    distiller = Distiller(TinyNet(hidden=8), make_pool(models), policy, TAP, DATA.input_size)
    opt = torch.optim.SGD(distiller.trainable.parameters(), lr=0.1, momentum=0.9)
    x_all, y_all = dataset(BATCH * STEPS, seed=seed)
    means, metrics = [], []
    for epoch in range(epochs):
        policy.begin_epoch(epoch)
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(epoch))
        total = torch.zeros(2, len(models))
        for s in range(STEPS):
            idx = order[s * BATCH:(s + 1) * BATCH]
            x, y = x_all[idx], y_all[idx]
            out = distiller(x, y)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            policy.observe(out.signals, out.weights, out.teachers, out.student, y)
            total += torch.stack([out.weights.logit.mean(0), out.weights.feat.mean(0)])
        means.append(total / STEPS)
        metrics.append(policy.end_epoch(epoch))
    return torch.stack(means), metrics


# ----------------------------------------------------------------------------- reward and objective


def test_logit_reward_is_the_gradient_cosine_of_the_spec():
    torch.manual_seed(0)
    b, m, c, t = 6, 3, 5, 4.0
    feature = torch.randn(b, 7, requires_grad=True)
    head = nn.Linear(7, c)
    logits = head(feature)
    projector = [nn.Linear(7, 4) for _ in range(m)]
    student = StudentOutputs(logits, feature, [p(feature) for p in projector])
    t_logits = torch.randn(m, b, c) * 3
    t_feats = [torch.randn(b, 4) for _ in range(m)]
    y = torch.randint(0, c, (b,))
    signals = compute_signals(student, TeacherOutputs(t_logits, t_feats, t_feats), y, t)
    u_l, u_f = alignment_rewards(signals, student)
    p_s, p_st = logits.softmax(1).detach(), (logits / t).softmax(1).detach()
    onehot = nn.functional.one_hot(y, c).float()
    for k in range(m):  # u_l = cos(p_S - y, p_S^T - p_Tk^T)
        expected = nn.functional.cosine_similarity(p_s - onehot, p_st - (t_logits[k] / t).softmax(1), dim=1)
        assert torch.allclose(u_l[:, k], expected, atol=1e-5)
        # u_f: cosine of d CE / d f and d FEAT_k / d f, by hand through head and projector k
        g_ce = (p_s - onehot) @ head.weight.detach()
        g_ft = 2 / 4 * (projector[k](feature).detach() - t_feats[k]) @ projector[k].weight.detach()
        assert torch.allclose(u_f[:, k], nn.functional.cosine_similarity(g_ce, g_ft, dim=1), atol=1e-5)
    assert u_l.shape == u_f.shape == (b, m) and u_l.abs().max() <= 1 and u_f.abs().max() <= 1
    # the main backward still works after the reward's autograd passes
    signals.student_ce.mean().backward()
    assert feature.grad is not None


def test_feature_reward_is_zero_where_the_ce_does_not_read_the_feature():
    # a class-token ViT tapped at last_map: the feature (patch tokens) is not on the CE's path
    torch.manual_seed(0)
    tokens = torch.randn(4, 5, 6, requires_grad=True)  # class token + 4 patch tokens
    logits = nn.Linear(6, 3)(tokens[:, 0])
    feature = tokens[:, 1:]
    projected = [nn.Linear(6, 6)(feature) for _ in range(2)]
    student = StudentOutputs(logits, feature, projected)
    targets = [torch.randn(4, 4, 6) for _ in range(2)]
    signals = compute_signals(student, TeacherOutputs(torch.randn(2, 4, 3), targets, targets),
                              torch.tensor([0, 1, 2, 0]), 4.0)
    u_l, u_f = alignment_rewards(signals, student)
    assert torch.equal(u_f, torch.zeros(4, 2)) and u_l.abs().sum() > 0
    assert torch.equal(advantages(u_f), torch.zeros(4, 2))


def test_advantages_and_objective_bound_and_optimum():
    u = torch.tensor([[0.5, 0.1, -0.3], [0.2, 0.2, 0.2]])
    a = advantages(u)
    assert torch.allclose(a.sum(1), torch.zeros(2), atol=1e-6)
    assert torch.equal(a[1], torch.zeros(3))  # equally useful teachers: no preference at all
    std = u.std(correction=0)
    assert torch.allclose(a[0], torch.tensor([0.4, 0.0, -0.4]) / (std + 1e-6), atol=1e-6)
    tau = 0.2
    low, high = align_loss_bounds(a, tau)
    assert low == pytest.approx(-(a.abs().max().item() + tau * math.log(3)))
    # per state the minimiser is softmax(A / tau), the minimum -tau log sum exp(A / tau)
    best = (a / tau).log_softmax(1)
    at_best = align_loss(best, a, tau).item()
    assert at_best == pytest.approx(-(tau * torch.logsumexp(a / tau, 1)).mean().item(), abs=1e-5)
    for _ in range(20):
        other = torch.randn(2, 3).mul(3).log_softmax(1)
        value = align_loss(other, a, tau).item()
        assert at_best - 1e-6 <= value and low <= value <= high


def adversarial_entry(step: int, b: int = 16, m: int = 3):
    """One recorded batch whose rewards always favour teacher 0 by a wide margin."""
    g = torch.Generator().manual_seed(step)
    reward = torch.tensor([1.0, -1.0, -1.0]).expand(b, m) + 0.01 * torch.randn(b, m, generator=g)
    return {"step": step, "state": torch.randn(b, 3 * (4 + 3 + 3), generator=g),
            "conf": torch.full((b, m), 1 / m), "div_logit": torch.full((b, m), 1 / m),
            "div_feat": torch.full((b, m), 1 / m), "reward": reward}


def record(policy, entry):
    """Record ``entry`` as observe() does for align: with what the acting policy output on its state."""
    with torch.no_grad():
        entry["log_pi"] = torch.stack(policy.agent(entry["state"]))
    policy.buffer.record(entry)


def run_adversarial(variant: str, epochs: int = 40):
    """Return the per-epoch metrics of agent updates on always-the-same-ranking rewards, and the
    DistillError that stopped them (or None)."""
    teachers = TeacherOutputs(torch.zeros(3, 1, 3), [torch.zeros(1, 4)] * 3, [torch.zeros(1, 4)] * 3)
    args = {"variant": variant, "lr": 0.5, "momentum": 0.9, "max_grad_norm": 0.0}
    policy = build_policy("mtkd_rl", 3, {**args, **({"kl_limit": 10.0, "fusion": "mix"} if variant == "align" else {})})
    policy.setup(teachers)
    history = []
    try:
        for epoch in range(epochs):
            policy.begin_epoch(epoch)
            for s in range(4):
                entry = adversarial_entry(epoch * 4 + s)
                if variant == "align":  # both levels
                    entry["reward"] = torch.stack([entry["reward"], entry["reward"]])
                record(policy, entry)
            history.append(policy.end_epoch(epoch))
    except DistillError as exc:
        return history, exc
    return history, None


def test_align_objective_stays_bounded_where_the_paper_form_runs_away():
    # same optimiser (SGD lr 0.5, momentum 0.9, no clip), same rewards: teacher 0 always best
    paper, error = run_adversarial("paper")
    losses_paper = [h["agent_loss"] for h in paper]
    assert error is not None and "diverged" in str(error)  # no minimum: it ran off to inf
    assert min(losses_paper) < -1e3 and all(b < a for a, b in zip(losses_paper[3:], losses_paper[4:]))
    align, error = run_adversarial("align")
    assert error is None and len(align) == 40
    a = advantages(adversarial_entry(0)["reward"])
    low, high = align_loss_bounds(a, 0.2)
    values = [h["agent_loss"] for h in align]
    assert all(2 * low - 0.05 <= v <= 2 * high for v in values)  # two levels
    # it converges, near the optimum -2 tau logsumexp(A / tau), and the agent stops growing
    optimum = -2 * (0.2 * torch.logsumexp(a / 0.2, 1)).mean().item()
    assert values[-1] == pytest.approx(optimum, abs=0.05)
    assert align[-1]["agent_param_norm"] < 1.5 * align[10]["agent_param_norm"]


def test_trust_region_stops_the_updates_of_a_period():
    teachers = TeacherOutputs(torch.zeros(3, 1, 3), [torch.zeros(1, 4)] * 3, [torch.zeros(1, 4)] * 3)
    counts = {}
    for limit in (1e-4, 10.0):
        policy = build_policy("mtkd_rl", 3, {"lr": 0.5, "kl_limit": limit})
        policy.setup(teachers)
        policy.begin_epoch(0)
        for s in range(8):
            entry = adversarial_entry(s)
            entry["reward"] = torch.stack([entry["reward"], entry["reward"]])
            record(policy, entry)
        counts[limit] = policy.end_epoch(0)
    assert counts[10.0]["agent_updates"] == 8 and counts[10.0]["trust_stops"] == 0
    tight = counts[1e-4]
    assert 1 <= tight["agent_updates"] < 8 and tight["trust_stops"] == 1 and tight["trust_kl"] > 1e-4


def test_bound_violation_is_one_clear_error(monkeypatch):
    import distill.policies.mtkd_rl.policy as policy_module

    teachers = TeacherOutputs(torch.zeros(3, 1, 3), [torch.zeros(1, 4)] * 3, [torch.zeros(1, 4)] * 3)
    policy = build_policy("mtkd_rl", 3, {"fusion": "mix"})
    policy.setup(teachers)
    entry = adversarial_entry(0)
    entry["reward"] = torch.stack([entry["reward"], entry["reward"]])
    record(policy, entry)
    monkeypatch.setattr(policy_module.R, "align_loss", lambda lp, adv, tau: lp.sum() * 0 + 1e3)
    with pytest.raises(DistillError, match="left its bound"):
        policy.end_epoch(0)


# ----------------------------------------------------------------------------- what it learns


def test_identical_teachers_keep_uniform_weights(good_teachers):
    means, metrics = distil([good_teachers[0]] * 4, epochs=4)
    assert torch.allclose(means, torch.full_like(means, 0.25), atol=0.01), means
    # the advantages are exactly 0: the entropy term alone drives the policy, to uniform
    assert all(metrics[e]["entropy_logit"] == pytest.approx(math.log(4), abs=0.01) for e in range(1, 4))


def test_class_shifted_teacher_loses_its_logit_weight_after_one_agent_epoch(good_teachers):
    models = good_teachers + [shifted(good_teachers[0])]
    means, metrics = distil(models, epochs=3)
    assert torch.allclose(means[0], torch.full((2, 4), 0.25))  # epoch 1: warm-up, 1/M
    assert means[1, 0, 3] <= 0.10, means[1]  # the first epoch driven by the agent
    assert means[2, 0, 3] <= 0.10
    assert metrics[0]["reward_logit/3"] < min(metrics[0][f"reward_logit/{k}"] for k in range(3))


def test_noise_feature_teacher_loses_its_feature_weight_within_three_epochs(good_teachers):
    models = good_teachers + [NoiseFeatureNet(good_teachers[0])]
    means, metrics = distil(models, epochs=4)
    # the generator's executed feature weight; the fused weight keeps the confidence prior's
    # share (1/3 c, c ~ 1/M: its logits are intact), so it stays above 1/3 * 1/4
    generator = [metrics[e]["g_feat/3"] for e in range(1, 4)]
    assert min(generator) <= 0.10, generator
    fused = means[1:, 1, 3]
    assert (fused[1:] < fused[:-1]).all() and fused[-1] < 0.15, means[:, 1]
    assert means[3, 0, 3] > 0.2, means[3]  # its logit weight is untouched
    assert metrics[0]["reward_feat/3"] < min(metrics[0][f"reward_feat/{k}"] for k in range(3))


def test_align_agent_never_diverges_on_random_teachers():
    torch.manual_seed(3)
    models = [TinyNet() for _ in range(3)]  # untrained: rewards are noise
    means, metrics = distil(models, epochs=4)
    assert all(math.isfinite(m["agent_loss"]) and m["agent_param_norm"] < 100 for m in metrics)
    assert torch.allclose(means.sum(-1), torch.ones(4, 2), atol=1e-5)
