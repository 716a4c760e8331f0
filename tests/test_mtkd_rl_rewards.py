"""MTKD-RL rewards: per-sample exactness of the teachers' gradients on the projectors the
recipes use (BatchNorm maps, token grids, linear) and under DIST, checked against autograd
truth computed one sample at a time."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)

from distill import losses  # noqa: E402
from distill.policies.mtkd_rl import alignment_rewards  # noqa: E402
from distill.policies.mtkd_rl.persample import (batch_stats_as_constants, feature_term, logit_terms,  # noqa: E402
                                                per_sample_terms)
from distill.projectors import build_projector  # noqa: E402
from distill.signals import StudentOutputs, TeacherOutputs, compute_signals  # noqa: E402

B = 32

# (student feature shape, teacher feature shape) per sample, as the recipes' taps give them
PROJECTOR_CASES = {
    "map_bn_pool": ((16, 8, 8), (32, 4, 4)),  # MapProjector, larger student map: avg-pool, conv, BN, ReLU
    "map_bn_upsample": ((16, 4, 4), (24, 8, 8)),  # MapProjector, bilinear up
    "tokens_to_map_bn": ((16, 12), (32, 4, 4)),  # GridProjector: ViT student tokens -> CNN teacher map (BN)
    "map_to_tokens": ((16, 8, 8), (16, 24)),  # GridProjector: CNN student map -> ViT teacher tokens
    "tokens": ((16, 12), (16, 20)),  # TokenProjector (linear on channels)
    "vector": ((12,), (20,)),  # VectorProjector (linear)
}


def make_case(name, seed=0):
    torch.manual_seed(seed)
    s_shape, t_shape = PROJECTOR_CASES[name]
    projector = build_projector(s_shape, t_shape, "t").train()
    with torch.no_grad():  # non-trivial affine BatchNorm parameters
        for m in projector.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    feature = torch.randn(B, *s_shape).relu() if len(s_shape) == 3 else torch.randn(B, *s_shape)
    target = torch.randn(B, *t_shape).relu() if len(t_shape) == 3 else torch.randn(B, *t_shape)
    return projector, feature, target


def own_gradient(projector, feature, target, i, constant_stats):
    """Autograd truth for sample i: d FEAT[i] / d f_i, every other sample's feature fixed, on a
    copy of the projector (its running statistics are not ours to update). ``constant_stats``:
    BatchNorm normalises with the full batch's statistics, computed first and held fixed, and
    sample i is sent through alone; otherwise the batch goes through in train mode with f_i in it,
    so the statistics move with f_i too (the full own-sample derivative)."""
    proj = copy.deepcopy(projector)
    f_i = feature[i:i + 1].clone().requires_grad_()
    if constant_stats:
        stats = {}

        def record(k):
            def hook(module, inputs, output):
                stats[k] = (inputs[0].mean((0, 2, 3)), inputs[0].var((0, 2, 3), unbiased=False))
            return hook

        hooks = [m.register_forward_hook(record(k)) for k, m in enumerate(proj.modules())
                 if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            proj(feature)  # record the batch's statistics at every BatchNorm
        for h in hooks:
            h.remove()
        for k, m in enumerate(proj.modules()):
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                m.running_mean.copy_(stats[k][0])
                m.running_var.copy_(stats[k][1])
        loss = losses.fitnet_loss(proj(f_i), target[i:i + 1])[0]
    else:
        batch = torch.cat([feature[:i], f_i, feature[i + 1:]])
        loss = losses.fitnet_loss(proj(batch), target)[i]
    (grad,) = torch.autograd.grad(loss, f_i)
    return grad[0]


@pytest.mark.parametrize("case", list(PROJECTOR_CASES))
def test_feature_gradients_are_per_sample_on_every_projector(case):
    projector, feature, target = make_case(case)
    running = [b.clone() for b in projector.buffers()]
    leaf = feature.clone().requires_grad_()
    feat = feature_term(leaf, projector, target).unsqueeze(0)
    for before, after in zip(running, projector.buffers()):  # no running-statistics update
        assert torch.equal(before, after)
    # the recomputed FEAT is the step's FEAT (same forward values)
    assert torch.allclose(feat[0], losses.fitnet_loss(copy.deepcopy(projector)(feature), target), atol=1e-6)
    (rows,) = torch.autograd.grad(feat[0].sum(), leaf)
    fixed = torch.stack([own_gradient(projector, feature, target, i, True) for i in range(B)])
    full = torch.stack([own_gradient(projector, feature, target, i, False) for i in range(B)])
    assert torch.allclose(rows, fixed, rtol=1e-4, atol=1e-7 * fixed.abs().max().item())
    cos_full = F.cosine_similarity(rows.flatten(1), full.flatten(1), dim=1)
    assert cos_full.min() >= 0.999, cos_full.min()
    # the row of a batch-sum gradient through train-mode BatchNorm is not per-sample
    naive_leaf = feature.clone().requires_grad_()
    (naive,) = torch.autograd.grad(losses.fitnet_loss(copy.deepcopy(projector)(naive_leaf), target).sum(), naive_leaf)
    cos_naive = F.cosine_similarity(naive.flatten(1), full.flatten(1), dim=1)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in projector.modules())
    if has_bn:
        assert cos_naive.mean() < 0.9, cos_naive.mean()
    else:
        assert cos_naive.min() >= 0.999999


def test_batch_stats_as_constants_restores_the_module_and_leaves_eval_batchnorm_alone():
    projector, feature, target = make_case("map_bn_pool")
    reference = copy.deepcopy(projector)
    with batch_stats_as_constants(projector):
        inside = projector(feature)
    assert torch.allclose(inside, reference(feature), atol=1e-5)  # same forward values
    assert "forward" not in vars(projector.bn)
    for a, b in zip(projector.buffers(), reference.buffers()):  # the reference's call updated its stats
        if a.dtype.is_floating_point:
            assert not torch.equal(a, b)
    projector.eval()  # running statistics: already per-sample, untouched by the context
    with batch_stats_as_constants(projector):
        assert "forward" not in vars(projector.bn)
        assert torch.equal(projector(feature), projector.eval()(feature))


@pytest.mark.parametrize("logit_loss", ["kd", "dist"])
def test_logit_gradients_are_per_sample(logit_loss):
    torch.manual_seed(0)
    m, c, t = 3, 10, 4.0
    z, zt = torch.randn(B, c) * 2, torch.randn(m, B, c) * 3
    leaf, objective = logit_terms(z, zt, t, logit_loss)
    term = losses.kd_loss if logit_loss == "kd" else losses.dist_loss
    for k in range(m):
        (rows,) = torch.autograd.grad(objective[k], leaf, retain_graph=True)
        truth = []
        for i in range(B):  # d term_k[i] / d z_i with every other sample's logits fixed
            z_i = z[i:i + 1].clone().requires_grad_()
            value = term(torch.cat([z[:i], z_i, z[i + 1:]]), zt[k], t)[i]
            truth.append(torch.autograd.grad(value, z_i)[0][0])
        truth = torch.stack(truth)
        assert torch.allclose(rows, truth, atol=1e-6 * truth.abs().max().item() + 1e-9)
        naive_leaf = z.clone().requires_grad_()
        (naive,) = torch.autograd.grad(term(naive_leaf, zt[k], t).sum(), naive_leaf)
        if logit_loss == "dist":  # the batch-sum counts the intra-class term B times
            assert (naive - truth).abs().max() > 0.1 * truth.abs().max()
        else:
            assert torch.allclose(naive, truth, atol=1e-6)


def test_alignment_reward_uses_the_per_sample_gradients():
    # a student head (pool + linear) on a tapped map, two BatchNorm map projectors
    torch.manual_seed(1)
    projectors = [make_case("map_bn_pool", seed=s)[0] for s in (1, 2)]
    feature = torch.randn(B, 16, 8, 8).relu().requires_grad_()
    head = nn.Linear(16, 10)
    logits = head(feature.mean((2, 3)))
    student = StudentOutputs(logits, feature, [p(feature) for p in projectors])
    targets = [torch.randn(B, 32, 4, 4).relu() for _ in projectors]
    teachers = TeacherOutputs(torch.randn(2, B, 10) * 3, targets, [torch.randn(B, 8)] * 2)
    y = torch.randint(0, 10, (B,))
    signals = compute_signals(student, teachers, y, 4.0)
    terms = per_sample_terms(student, teachers, projectors, 4.0, "kd")
    u_l, u_f = alignment_rewards(signals, student, terms)
    p = logits.softmax(1).detach()
    g_ce = ((p - F.one_hot(y, 10).float()) @ head.weight.detach() / 64).view(B, 16, 1, 1).expand(B, 16, 8, 8)
    for k, proj in enumerate(projectors):
        truth = torch.stack([own_gradient(proj, feature.detach(), targets[k], i, False) for i in range(B)])
        expected = F.cosine_similarity(g_ce.flatten(1), truth.flatten(1), dim=1)
        assert (u_f[:, k] - expected).abs().max() < 0.02
        assert torch.allclose(u_l[:, k], F.cosine_similarity(
            p - F.one_hot(y, 10).float(), (logits.detach() / 4).softmax(1) - (teachers.logits[k] / 4).softmax(1)),
            atol=1e-5)
    old_u_l, old_u_f = alignment_rewards(signals, student)  # on the step's graph: mixed by BatchNorm
    assert torch.allclose(old_u_l, u_l, atol=1e-5) and (old_u_f - u_f).abs().max() > 0.1
    signals.student_ce.mean().backward()  # the step's backward still runs
    assert feature.grad is not None


class TinyCNN(nn.Module):
    """conv -> BN -> ReLU map, then pool + linear: timm's classifier API, tapped at last_map."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, 5)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, f, pre_logits: bool = False):
        f = f.mean((2, 3))
        return f if pre_logits else self.fc(f)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_the_distiller_binds_the_projectors_and_the_step_reward_is_exact():
    from distill.distiller import Distiller
    from distill.policies import build_policy
    from distill.resolve import DataSpec
    from distill.taps import FeatureTap
    from distill.teachers import InputAdapter, Teacher, TeacherPool

    torch.manual_seed(0)
    data, tap = DataSpec((1, 6, 6), (0.0,), (1.0,)), FeatureTap("last_map")
    pool = TeacherPool([Teacher(f"{i}", TinyCNN(12).eval(), InputAdapter(data, data.mean, data.std), tap,
                                data.input_size) for i in range(2)])
    policy = build_policy("mtkd_rl", 2, {"warmup_epochs": 0, "reward": "align"})
    distiller = Distiller(TinyCNN(8), pool, policy, tap, data.input_size)
    projectors = list(distiller.trainable.projectors)
    assert [type(p).__name__ for p in projectors] == ["MapProjector"] * 2
    assert policy.projectors == projectors and policy.classifier_bias is True
    x, y = torch.randn(B, 1, 6, 6), torch.randint(0, 5, (B,))
    policy.begin_epoch(0)
    out = distiller(x, y)
    reward = policy._step_cache[1]["reward"]  # (2, B, M), what observe() records
    student, teachers = out.student, out.teachers
    by_hand = alignment_rewards(out.signals, student,
                                per_sample_terms(student, teachers, projectors, 4.0, "kd"))
    assert torch.allclose(reward, torch.stack(by_hand), atol=1e-6)
    assert student.embedding is not None and student.embedding.shape == (B, 8)
    assert torch.allclose(distiller.student.fc(student.embedding), student.logits, atol=1e-6)
