"""Weighting policies (ebkd, camkd, mtkd_rl, mixture) and the DIST / mixture losses, against
values computed by hand from small fixed tensors."""

import math

import pytest
import timm
import torch

torch.set_num_threads(1)

import zoo  # noqa: E402,F401  (registers the CIFAR models)
from distill import losses  # noqa: E402
from distill.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from distill.distiller import Distiller  # noqa: E402
from distill.errors import DistillError, RecipeError  # noqa: E402
from distill.policies import POLICIES, Weights, build_policy  # noqa: E402
from distill.policies.camkd import confidence_weights  # noqa: E402
from distill.policies.mtkd_rl import build_state, normalise_rewards, official_rewards, paper_rewards  # noqa: E402
from distill.recipe_load import recipe_from_dict  # noqa: E402
from distill.resolve import DataSpec  # noqa: E402
from distill.signals import Signals, StudentOutputs, TeacherOutputs, compute_signals  # noqa: E402
from distill.taps import FeatureTap  # noqa: E402
from distill.teachers import InputAdapter, Teacher, TeacherPool  # noqa: E402

LN2, LN3, LN4, LN5 = math.log(2), math.log(3), math.log(4), math.log(5)
CAMKD_DATA = DataSpec((3, 8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def make_step(teacher_ce, kl=None, cos=None, kd=None, feat=None, student_ce=None, logits=None, embeddings=None,
              classes=3, dim=2):
    """Return (Signals, TeacherOutputs, StudentOutputs, target) from (M, B) lists; the rest zeros."""
    tce = torch.tensor(teacher_ce, dtype=torch.float32)
    m, b = tce.shape
    zeros = torch.zeros(m, b)
    kd_t = torch.tensor(kd) if kd is not None else (torch.tensor(kl) if kl is not None else zeros)
    signals = Signals(student_ce=torch.tensor(student_ce) if student_ce is not None else torch.zeros(b),
                      teacher_ce=tce, kd=kd_t.float(),
                      feat=torch.tensor(feat).float() if feat is not None else zeros,
                      cos=torch.tensor(cos).float() if cos is not None else zeros,
                      kl=torch.tensor(kl).float() if kl is not None else kd_t.float())
    t_logits = torch.tensor(logits).float() if logits is not None else torch.zeros(m, b, classes)
    emb = embeddings if embeddings is not None else [torch.zeros(b, dim) for _ in range(m)]
    teachers = TeacherOutputs(t_logits, list(emb), list(emb))
    student = StudentOutputs(torch.zeros(b, t_logits.shape[-1]), torch.zeros(b, dim), list(emb))
    return signals, teachers, student, torch.zeros(b, dtype=torch.long)


def assert_rows_sum_to_one(w):
    assert torch.allclose(w.sum(1), torch.ones(w.shape[0]), atol=1e-6)


# ----------------------------------------------------------------------------- ebkd / camkd


def test_ebkd_entropy_weights_by_hand():
    ninf = -math.inf
    # sample 0: teacher 0 uniform over 4 classes (H = ln 4), teacher 1 uniform over 2 (H = ln 2)
    # sample 1: both uniform over 4 classes
    logits = [[[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, ninf, ninf], [0, 0, 0, 0]]]
    signals, teachers, student, y = make_step([[0, 0], [0, 0]], logits=logits)
    policy = build_policy("ebkd", 2, {})
    w = policy.weights(signals, teachers, student, y)
    # softmax(-ln 4, -ln 2) = (1/4, 1/2) / (3/4)
    assert torch.allclose(w.logit[0], torch.tensor([1 / 3, 2 / 3]), atol=1e-6)
    assert torch.allclose(w.logit[1], torch.tensor([0.5, 0.5]), atol=1e-6)
    assert torch.equal(w.logit, w.feat)
    assert_rows_sum_to_one(w.logit)


def test_ebkd_temperature_is_only_for_the_entropy():
    # p = softmax([ln 3, 0] / 1) = (3/4, 1/4); at T = 2: softmax([ln 3 / 2, 0]) = (sqrt3, 1)/(1+sqrt3)
    logits = [[[LN3, 0.0]], [[0.0, 0.0]]]
    signals, teachers, student, y = make_step([[0], [0]], logits=logits, classes=2)
    w = build_policy("ebkd", 2, {"temperature": 2.0}).weights(signals, teachers, student, y).logit
    p = math.sqrt(3) / (1 + math.sqrt(3))
    h0 = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    expected0 = math.exp(-h0) / (math.exp(-h0) + math.exp(-LN2))
    assert w[0, 0].item() == pytest.approx(expected0, abs=1e-6)


def test_camkd_equ9_by_hand():
    # the logit level of both variants; variant shared reuses it at the feature level
    # M = 3: exp(CE) = 1, 2, 5 -> softmax = 1/8, 2/8, 5/8 -> (1 - s) / 2 = 7/16, 6/16, 3/16
    signals, teachers, student, y = make_step([[0.0], [LN2], [LN5]])
    for variant in ("published", "shared"):
        w = build_policy("camkd", 3, {"variant": variant}).weights(signals, teachers, student, y)
        assert torch.allclose(w.logit[0], torch.tensor([7 / 16, 6 / 16, 3 / 16]), atol=1e-6)
    assert torch.equal(w.logit, w.feat)
    # M = 2: exp(CE) = 1, 3 -> (3/4, 1/4); M = 1 -> 1
    signals, teachers, student, y = make_step([[0.0, 1.0], [LN3, 1.0]])
    w = build_policy("camkd", 2, {"variant": "shared"}).weights(signals, teachers, student, y).logit
    assert torch.allclose(w, torch.tensor([[0.75, 0.25], [0.5, 0.5]]), atol=1e-6)
    signals, teachers, student, y = make_step([[7.0, 0.1]])
    assert torch.equal(build_policy("camkd", 1, {"variant": "shared"}).weights(signals, teachers, student, y).logit,
                       torch.ones(2, 1))


def camkd_pool(tap: FeatureTap) -> TeacherPool:
    """Two cifar_resnet8 teachers (64 features, 2 classes) with hand-set classifiers:
    teacher 0 reads class c from feature channel c, teacher 1's logits are always 0."""
    teachers = []
    for m in range(2):
        torch.manual_seed(m)
        model = timm.create_model("cifar_resnet8", num_classes=2)
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.zero_()
            if m == 0:
                model.fc.weight[0, 0] = model.fc.weight[1, 1] = 1.0
        teachers.append(Teacher(f"{m}:t", model, InputAdapter(CAMKD_DATA, CAMKD_DATA.mean, CAMKD_DATA.std), tap,
                                CAMKD_DATA.input_size))
    return TeacherPool(teachers)


def set_up_camkd(pool: TeacherPool, **args):
    """Return a camkd policy bound to ``pool``'s heads and set up on its outputs."""
    policy = build_policy("camkd", len(pool), args)
    policy.bind_heads(pool.heads())
    policy.setup(pool(torch.zeros(2, *CAMKD_DATA.input_size)))
    return policy


@pytest.mark.parametrize("kind", ["pre_logits", "last_map"])
def test_camkd_published_feature_weights_from_the_teachers_heads_by_hand(kind):
    policy = set_up_camkd(camkd_pool(FeatureTap(kind)))
    # the student's projected features: for teacher 0 channel 0 = ln 3 (pre_logits), or a
    # 2x2 map whose channel 0 averages to ln 3 (last_map: the head pools, then the fc)
    if kind == "pre_logits":
        p0 = torch.zeros(2, 64)
        p0[:, 0] = LN3
    else:
        p0 = torch.zeros(2, 64, 2, 2)
        p0[:, 0, 0] = 2 * LN3  # one row of two positions out of four
    projected = [p0, torch.randn(p0.shape)]
    signals, teachers, _, _ = make_step([[0.0, 0.0], [LN3, LN3]])
    student = StudentOutputs(torch.zeros(2, 2), torch.zeros(2, 4), projected)
    y = torch.tensor([0, 1])
    policy.begin_epoch(0)
    w = policy.weights(signals, teachers, student, y)
    assert torch.allclose(w.logit, torch.tensor([[0.75, 0.25]] * 2), atol=1e-6)
    assert torch.equal(w.feat, torch.zeros(2, 2))  # no feature loss in the first epoch
    policy.begin_epoch(1)
    w = policy.weights(signals, teachers, student, y)
    # teacher 0's logits (ln 3, 0): CE = ln 4/3 (y = 0), ln 4 (y = 1); teacher 1: CE = ln 2.
    # y = 0: exp(CE) = 4/3, 2 -> softmax (0.4, 0.6) -> 1 - s = (0.6, 0.4)
    # y = 1: exp(CE) = 4, 2 -> softmax (2/3, 1/3) -> (1/3, 2/3)
    assert torch.allclose(w.feat, torch.tensor([[0.6, 0.4], [1 / 3, 2 / 3]]), atol=1e-6)
    assert torch.allclose(w.logit, torch.tensor([[0.75, 0.25]] * 2), atol=1e-6)
    assert not w.feat.requires_grad and policy.state_dict() == {}  # no teacher weight in the policy


def test_camkd_sums_divided_by_m_published_not_shared():
    signals, teachers, student, y = make_step([[0.0], [0.0]], kd=[[4.0], [8.0]], feat=[[1.0], [2.0]])
    w = Weights(torch.tensor([[0.75, 0.25]]), torch.tensor([[0.6, 0.4]]))
    published, shared = build_policy("camkd", 2, {}), build_policy("camkd", 2, {"variant": "shared"})
    # sum_m w_l KD = 3 + 2 = 5; sum_m w_f FEAT = 0.6 + 0.8 = 1.4; published: / M = 2
    assert published.logit_term(w, signals, teachers, student, 4.0).item() == pytest.approx(2.5)
    assert published.feature_term(w, signals).item() == pytest.approx(0.7)
    assert shared.logit_term(w, signals, teachers, student, 4.0).item() == pytest.approx(5.0)
    assert shared.feature_term(w, signals).item() == pytest.approx(1.4)


def test_camkd_arguments_and_unsupported_heads_raise():
    for bad in ({"variant": "paper"}, {"varient": "shared"}):
        with pytest.raises(ValueError, match="variant"):
            POLICIES["camkd"].check_args(bad)
    pool = camkd_pool(FeatureTap("pre_logits"))
    with pytest.raises(ValueError, match="bind_heads"):
        build_policy("camkd", 2, {}).setup(pool(torch.zeros(2, *CAMKD_DATA.input_size)))
    build_policy("camkd", 2, {"variant": "shared"}).setup(pool(torch.zeros(2, *CAMKD_DATA.input_size)))
    with pytest.raises(ValueError, match="stage 1 .* not followed by its classifier"):
        set_up_camkd(camkd_pool(FeatureTap("stage", 1)))
    # ViT patch tokens: a head pooling the patch tokens ('avg') is supported, a class-token head is not
    set_up_camkd(vit_pool("avg"))
    with pytest.raises(ValueError, match="does not give its logits"):
        set_up_camkd(vit_pool("token"))


def vit_pool(global_pool: str) -> TeacherPool:
    """Two tiny ViT teachers (8x8 input, four 4x4 patches, one block) tapped at ``last_map``."""
    teachers = []
    for m in range(2):
        torch.manual_seed(m)
        model = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=8, depth=1,
                                  num_heads=2, num_classes=3, global_pool=global_pool)
        teachers.append(Teacher(f"{m}:vit", model, InputAdapter(CAMKD_DATA, CAMKD_DATA.mean, CAMKD_DATA.std),
                                FeatureTap("last_map"), CAMKD_DATA.input_size))
    return TeacherPool(teachers)


def test_camkd_through_the_distiller_equ2_by_hand():
    torch.manual_seed(0)
    pool = _zoo_pool()
    policy = build_policy("camkd", 2, {})
    distiller = Distiller(timm.create_model("cifar_resnet8", num_classes=5), pool, policy, FeatureTap("last_map"),
                          CAMKD_DATA.input_size, alpha=1.0, beta=50.0, temperature=4.0)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 4])
    for epoch in (0, 1):
        policy.begin_epoch(epoch)
        out = distiller(x, y)
        out.loss.backward()
        s, t = out.student, out.teachers
        # independently: teacher m's forward_head on the projected student map, its CE, Equ.(9)
        with torch.no_grad():
            head_ce = torch.stack([losses.cross_entropy(tm.model.forward_head(p), y)
                                   for tm, p in zip(pool.teachers, s.projected)])
        w_l = confidence_weights(losses.cross_entropy(t.logits, y))
        w_f = confidence_weights(head_ce) if epoch else torch.zeros(4, 2)
        kd = losses.kd_loss(s.logits, t.logits, 4.0).t()
        feat = torch.stack([losses.fitnet_loss(p, f) for p, f in zip(s.projected, t.features)]).t()
        expected = losses.cross_entropy(s.logits, y) + (w_l * kd).sum(1) / 2 + 50.0 * (w_f * feat).sum(1) / 2
        assert torch.allclose(out.weights.feat, w_f, atol=1e-6)
        assert torch.allclose(out.per_sample, expected, atol=1e-5)
    assert out.weights.feat.min() > 0
    # a mixture over camkd hands the heads on to it
    mixture = build_policy("mixture", 2, {"over": "camkd"})
    Distiller(timm.create_model("cifar_resnet8", num_classes=5), pool, mixture, FeatureTap("last_map"),
              CAMKD_DATA.input_size)
    assert mixture.inner.heads is not None


def _zoo_pool() -> TeacherPool:
    """Two small randomly initialised zoo teachers (5 classes) tapped at ``last_map``."""
    teachers = []
    for m, name in enumerate(("cifar_resnet8", "cifar_resnet14")):
        torch.manual_seed(m)
        teachers.append(Teacher(f"{m}:{name}", timm.create_model(name, num_classes=5),
                                InputAdapter(CAMKD_DATA, CAMKD_DATA.mean, CAMKD_DATA.std), FeatureTap("last_map"),
                                CAMKD_DATA.input_size))
    return TeacherPool(teachers)


# ----------------------------------------------------------------------------- mtkd_rl: action


def fixed_agent_policy(**args):
    """A set-up mtkd_rl policy (2 teachers) whose agent outputs g_l = (1/4, 3/4), g_f = (1/2, 1/2)."""
    signals, teachers, student, y = make_step([[0.0], [LN3]], kl=[[LN4], [0.0]], cos=[[0.0], [LN2]])
    policy = build_policy("mtkd_rl", 2, {"variant": "paper", "warmup_epochs": 0, **args})
    policy.setup(teachers)
    with torch.no_grad():
        policy.agent.trunk.weight.zero_()
        policy.agent.head_logit.bias.copy_(torch.tensor([0.0, LN3]))
        policy.agent.head_feat.bias.zero_()
    return policy, (signals, teachers, student, y)


def test_mtkd_rl_fused_weights_equ_9_to_14_by_hand():
    policy, step = fixed_agent_policy()
    w = policy.weights(*step)
    # c = (3/4, 1/4) (Equ. 9); d_l = softmax(ln 4, 0) = (4/5, 1/5) (Equ. 12);
    # d_f = softmax(0, ln 2) = (1/3, 2/3) (Equ. 11)
    # w_l = ((1/4, 3/4) + c + d_l) / 3 = (0.6, 0.4); w_f = ((1/2, 1/2) + c + d_f) / 3 = (19/36, 17/36)
    assert torch.allclose(w.logit, torch.tensor([[0.6, 0.4]]), atol=1e-6)
    assert torch.allclose(w.feat, torch.tensor([[19 / 36, 17 / 36]]), atol=1e-6)
    policy, step = fixed_agent_policy(gammas={"logit": [0.5, 0.25, 0.25], "feat": [0.0, 0.0, 1.0]})
    w = policy.weights(*step)
    assert torch.allclose(w.logit, torch.tensor([[0.5125, 0.4875]]), atol=1e-6)
    assert torch.allclose(w.feat, torch.tensor([[1 / 3, 2 / 3]]), atol=1e-6)


def test_mtkd_rl_warmup_weights_and_generator_rows_sum_to_one():
    torch.manual_seed(0)
    m, b = 3, 5
    embeddings = [torch.randn(b, d) for d in (2, 4, 3)]
    signals, teachers, student, y = make_step(torch.rand(m, b).tolist(), kl=torch.rand(m, b).tolist(),
                                              cos=torch.rand(m, b).tolist(), logits=torch.randn(m, b, 3).tolist(),
                                              embeddings=embeddings)
    paper = build_policy("mtkd_rl", m, {"variant": "paper"})
    paper.setup(teachers)
    assert torch.equal(paper.weights(signals, teachers, student, y).logit, torch.full((b, m), 1 / 3))
    official = build_policy("mtkd_rl", m, {"variant": "official"})
    official.setup(teachers)
    assert torch.equal(official.weights(signals, teachers, student, y).feat, torch.ones(b, m))
    paper.begin_epoch(1)
    w = paper.weights(signals, teachers, student, y)
    assert_rows_sum_to_one(w.logit)
    assert_rows_sum_to_one(w.feat)
    assert paper.agent.trunk.in_features == sum(d + 3 + 3 for d in (2, 4, 3))
    assert paper.agent.trunk.bias is None and paper.agent.trunk.out_features == 128


def test_state_layout_equ5():
    signals, teachers, student, y = make_step([[0.5], [0.7]], kl=[[0.1], [0.2]], cos=[[0.3], [0.4]],
                                              logits=[[[1.0, 2.0]], [[3.0, 4.0]]], classes=2,
                                              embeddings=[torch.tensor([[9.0]]), torch.tensor([[8.0, 7.0]])])
    state = build_state(signals, teachers)
    expected = [9.0, 1.0, 2.0, 0.5, 0.3, 0.1, 8.0, 7.0, 3.0, 4.0, 0.7, 0.4, 0.2]
    assert torch.allclose(state, torch.tensor([expected]))


# ----------------------------------------------------------------------------- mtkd_rl: reward


def test_reward_equ6_and_normalisation_equ8():
    signals, _, _, _ = make_step([[0.0], [0.0]], kd=[[0.5], [0.25]], feat=[[0.1], [0.3]], student_ce=[1.0])
    r = paper_rewards(signals, alpha=1.0, beta=5.0)
    assert torch.allclose(r, torch.tensor([[-2.0, -2.75]]))
    # min-max over teachers then minus the mean of the normalised values; 0 where max = min
    rbar = normalise_rewards(torch.tensor([[-1.0, -3.0, -2.0], [-2.0, -2.0, -2.0], [4.0, 0.0, 0.0]]))
    assert torch.allclose(rbar, torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0], [2 / 3, -1 / 3, -1 / 3]]))


def test_official_reward_is_shared_zscored_and_clamped():
    signals, _, _, _ = make_step([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], kd=[[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]],
                                 feat=[[0.0] * 3, [0.0] * 3], student_ce=[0.0, 1.0, 2.0])
    w = torch.tensor([[0.5, 0.5]] * 3)
    raw, rhat = official_rewards(signals, Weights(w, w), alpha=1.0, beta=5.0)
    assert torch.allclose(raw, torch.tensor([-2.0, -3.0, -4.0]))
    z0 = 1.0 / math.sqrt(2 / 3)  # (r - mean) / population std
    assert torch.allclose(rhat, torch.tensor([min(z0, 1.0), 0.0, 0.0]))


# ----------------------------------------------------------------------------- mtkd_rl: agent update


def two_teacher_episode(batch=6, feat=(0.1, 0.4)):
    """Teacher 0 has the smaller feature loss on every sample (higher Equ. 6 reward); equal CE, KD,
    cos, so the confidence and divergence weights are uniform."""
    torch.manual_seed(1)
    embeddings = [torch.randn(batch, 3), torch.randn(batch, 2)]
    return make_step([[1.0] * batch, [1.0] * batch], kd=[[0.5] * batch, [0.5] * batch],
                     feat=[[feat[0]] * batch, [feat[1]] * batch], cos=[[0.2] * batch, [0.2] * batch],
                     student_ce=torch.linspace(0.5, 2.0, batch).tolist(), logits=torch.randn(2, batch, 4).tolist(),
                     embeddings=embeddings, classes=4)


def generator(policy, teachers, signals):
    with torch.no_grad():
        log_gl, log_gf = policy.agent(build_state(signals, teachers))
    return log_gl.exp(), log_gf.exp()


def test_pg_step_is_exactly_equ7_on_the_head_bias():
    # dL/db_m = -mean_i sum_k Rbar[i,k] (1[k=m] - g_m) = -mean_i Rbar[i,m] since sum_k Rbar = 0:
    # one SGD step (lr 0.1) moves each head's bias by +0.1 * (0.5, -0.5)
    signals, teachers, student, y = two_teacher_episode()
    policy = build_policy("mtkd_rl", 2, {"variant": "paper"})
    policy.setup(teachers)
    before = [policy.agent.head_logit.bias.clone(), policy.agent.head_feat.bias.clone()]
    policy.begin_epoch(0)
    w = policy.weights(signals, teachers, student, y)
    policy.observe(signals, w, teachers, student, y)
    metrics = policy.end_epoch(0)
    assert metrics["agent_updates"] == 1 and metrics["episodes"] == 1
    # R = -CE - 0.5 - 5 * feat; mean over samples of -CE is -1.25
    assert metrics["reward"] == pytest.approx(-1.25 - 0.5 - 5 * 0.25, abs=1e-6)
    for head, b0 in zip((policy.agent.head_logit, policy.agent.head_feat), before):
        assert torch.allclose(head.bias - b0, torch.tensor([0.05, -0.05]), atol=1e-6)


def one_update(policy, step):
    policy.begin_epoch(0)
    policy.observe(step[0], policy.weights(*step), *step[1:])
    return policy.end_epoch(0)


def test_pg_form_prob_max_grad_norm_and_divergence_guard():
    # pg_form prob: L = -mean_i sum_m Rbar g; at g = (1/2, 1/2), Rbar = (1/2, -1/2):
    # dL/db_m = -mean_i g_m (Rbar_m - sum_k Rbar_k g_k) = (-1/4, 1/4) -> the bias moves by (+0.025, -0.025)
    step = two_teacher_episode()
    policy = build_policy("mtkd_rl", 2, {"variant": "paper", "pg_form": "prob"})
    policy.setup(step[1])
    with torch.no_grad():
        policy.agent.trunk.weight.zero_()
        policy.agent.head_logit.bias.zero_()
    one_update(policy, step)
    assert torch.allclose(policy.agent.head_logit.bias, torch.tensor([0.025, -0.025]), atol=1e-6)
    # max_grad_norm: the whole update (all agent parameters) moves by lr * clip at most
    policy = build_policy("mtkd_rl", 2, {"variant": "paper", "max_grad_norm": 0.01})
    policy.setup(step[1])
    before = torch.cat([p.detach().flatten().clone() for p in policy.agent.parameters()])
    one_update(policy, step)
    after = torch.cat([p.detach().flatten() for p in policy.agent.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.1 * 0.01, rel=1e-3)
    # a diverged agent is a clear error, not NaN weights for the student
    policy = build_policy("mtkd_rl", 2, {"variant": "paper", "lr": 1e38})
    policy.setup(step[1])
    with pytest.raises(DistillError, match="max_grad_norm"):
        for _ in range(5):
            one_update(policy, step)
    with pytest.raises(ValueError):
        POLICIES["mtkd_rl"].check_args({"variant": "official", "pg_form": "prob"})


def run_epochs(policy, step, epochs, steps_per_epoch=4):
    for epoch in range(epochs):
        policy.begin_epoch(epoch)
        for _ in range(steps_per_epoch):
            w = policy.weights(*step)
            policy.observe(step[0], w, *step[1:])
        policy.end_epoch(epoch)


def test_paper_variant_moves_toward_higher_reward_teacher_official_toward_uniform():
    step = two_teacher_episode()
    signals, teachers = step[0], step[1]
    results = {}
    for variant in ("paper", "official"):
        policy = build_policy("mtkd_rl", 2, {"variant": variant, "lr": 0.05})
        policy.setup(teachers)
        with torch.no_grad():  # start biased toward teacher 0, the teacher with the higher reward
            policy.agent.head_logit.bias.copy_(torch.tensor([1.0, -1.0]))
            policy.agent.head_feat.bias.copy_(torch.tensor([1.0, -1.0]))
        g0 = generator(policy, teachers, signals)
        run_epochs(policy, step, epochs=3)
        g1 = generator(policy, teachers, signals)
        results[variant] = (g0, g1)
    for level in (0, 1):
        p0, p1 = results["paper"][0][level], results["paper"][1][level]
        o0, o1 = results["official"][0][level], results["official"][1][level]
        assert (p1[:, 0] > p0[:, 0] + 0.01).all()  # paper: more weight on the better teacher
        gap0, gap1 = (o0[:, 0] - o0[:, 1]).abs(), (o1[:, 0] - o1[:, 1]).abs()
        assert (gap1 < gap0 - 0.01).all()  # official: pulled toward uniform, although teacher 0 is better


def test_update_every_and_reservoir_buffer_stay_bounded():
    step = two_teacher_episode(batch=2)
    policy = build_policy("mtkd_rl", 2, {"variant": "paper", "buffer": 3, "seed": 5})
    policy.setup(step[1])
    policy.begin_epoch(0)
    for _ in range(50):
        policy.observe(step[0], policy.weights(*step), *step[1:])
        assert len(policy.buffer.entries) <= 3
    kept = [e["step"] for e in policy.buffer.entries]
    assert len(kept) == 3 and len(set(kept)) == 3 and max(kept) >= 3  # later batches replace early ones
    assert policy.buffer.entries[0]["state"].dtype == torch.bfloat16
    assert policy.buffer.entries[0]["state"].device.type == "cpu"
    metrics = policy.end_epoch(0)
    assert metrics["agent_updates"] == 3 and metrics["episodes"] == 50 and policy.buffer.entries == []
    # update_every: K recorded batches -> an update and an empty buffer mid-epoch
    policy = build_policy("mtkd_rl", 2, {"variant": "paper", "buffer": 2, "update_every": 4})
    policy.setup(step[1])
    policy.begin_epoch(0)
    for i in range(10):
        policy.observe(step[0], policy.weights(*step), *step[1:])
        assert len(policy.buffer.entries) == min((i + 1) % 4, 2)
    assert policy.end_epoch(0)["agent_updates"] == 2 + 2 + 2


def test_reservoir_sampling_is_uniform():
    step = two_teacher_episode(batch=1)
    policy = build_policy("mtkd_rl", 2, {"variant": "paper", "buffer": 5, "seed": 0})
    policy.setup(step[1])
    counts = torch.zeros(20)
    trials = 1500
    for _ in range(trials):
        policy.buffer.clear()
        for i in range(20):
            policy.buffer.record({"step": i})
        for e in policy.buffer.entries:
            counts[e["step"]] += 1
    assert torch.allclose(counts / trials, torch.full((20,), 0.25), atol=0.05)


def test_state_dict_round_trip_restores_agent_buffer_optimizer_and_rng(tmp_path):
    step = two_teacher_episode(batch=3)
    args = {"variant": "paper", "buffer": 4, "momentum": 0.9, "state_norm": "running", "learnable_gammas": True}
    policy = build_policy("mtkd_rl", 2, args)
    policy.setup(step[1])
    run_epochs(policy, step, epochs=2, steps_per_epoch=3)
    policy.begin_epoch(2)
    for _ in range(6):  # mid-epoch: a full buffer after reservoir replacements
        policy.observe(step[0], policy.weights(*step), *step[1:])
    save_checkpoint(tmp_path / "ckpt", {}, {"policy": policy.state_dict()}, {})
    _, state = load_checkpoint(tmp_path / "ckpt")
    restored = build_policy("mtkd_rl", 2, args)  # no setup: the agent is rebuilt from the checkpoint
    restored.load_state_dict(state["policy"])
    assert torch.equal(restored.weights(*step).logit, policy.weights(*step).logit)
    assert [e["step"] for e in restored.buffer.entries] == [e["step"] for e in policy.buffer.entries]
    for a, b in zip(restored.buffer.entries, policy.buffer.entries):
        assert all(torch.equal(a[k], b[k]) for k in ("state", "conf", "div_logit", "div_feat", "reward"))
    assert torch.equal(restored.buffer.rng.get_state(), policy.buffer.rng.get_state())
    assert torch.equal(restored.agent.stat_sum, policy.agent.stat_sum)
    mom = [policy.optimizer.state[p]["momentum_buffer"] for p in policy.agent.parameters()]
    mom_r = [restored.optimizer.state[p]["momentum_buffer"] for p in restored.agent.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(mom, mom_r))
    for p in (policy, restored):  # continue both: identical reservoir choices and agent updates
        for _ in range(3):
            p.observe(step[0], p.weights(*step), *step[1:])
        p.end_epoch(2)
    for a, b in zip(policy.state_dict().values(), restored.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert torch.equal(restored.agent.gammas(), policy.agent.gammas())


def test_mtkd_rl_args_are_checked():
    mix = {"fusion": "mix"}
    for bad in ({"variant": "authors"}, {"gammas": [0.5, 0.5, 0.5], **mix}, {"buffer": 0}, {"lr": 0},
                {"state_norm": "batch"}, {"update_every": 0}, {"hiden": 64}, {"learnable_gammas": True, **mix},
                {"pg_form": "prob"}, {"variant": "paper", "tau": 0.1}, {"variant": "official", "kl_limit": 0.1},
                {"floor": 1.5}, {"divergence": "gated", **mix}, {"divergence": "max"}, {"warmup_weight": 0}):
        with pytest.raises(ValueError):
            POLICIES["mtkd_rl"].check_args(bad)
    POLICIES["mtkd_rl"].check_args({"gammas": {"logit": [0.2, 0.4, 0.4]}, "update_every": None, **mix})
    POLICIES["mtkd_rl"].check_args({"gammas": [0.4, 0.3, 0.3], "divergence": "gated", "floor": 0.0, **mix})
    # the default fusion is refine, which has no gammas: giving them alone names the fix
    with pytest.raises(ValueError, match=r"gammas does not apply to fusion refine \(the default; give fusion: mix"):
        POLICIES["mtkd_rl"].check_args({"gammas": [0.4, 0.3, 0.3]})
    POLICIES["mtkd_rl"].check_args({"variant": "paper", "gammas": [0.4, 0.3, 0.3]})  # paper / official: always mixed


# ----------------------------------------------------------------------------- mixture


def test_mixture_kd_equals_plain_kd_for_one_teacher_and_for_weights_1_0():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(2, 5, 7)
    kd = losses.kd_loss(s, t, 4.0)
    assert torch.allclose(losses.mixture_kd_loss(s, t[:1], torch.ones(1), 4.0), kd[0], atol=1e-6)
    assert torch.allclose(losses.mixture_kd_loss(s, t, torch.tensor([1.0, 0.0]), 4.0), kd[0], atol=1e-6)
    assert torch.allclose(losses.mixture_kd_loss(s, t, torch.tensor([[0.0, 3.0]] * 5), 4.0), kd[1], atol=1e-6)


def test_mixture_by_hand():
    # p1 = (3/4, 1/4), p2 = (1/4, 3/4) at T = 1; w = (0.5, 0.5) -> p_mix = (1/2, 1/2); student uniform -> KL 0
    t = torch.tensor([[[LN3, 0.0]], [[0.0, LN3]]])
    s = torch.zeros(1, 2)
    log_mix = losses.mixture_log_probs(t, torch.tensor([2.0, 2.0]), 1.0)
    assert torch.allclose(log_mix.exp(), torch.tensor([[0.5, 0.5]]))
    assert losses.mixture_kd_loss(s, t, torch.tensor([1.0, 1.0]), 1.0).abs().item() < 1e-6
    # w = (3/4, 1/4): p_mix = (3/4 * 3/4 + 1/4 * 1/4, ...) = (5/8, 3/8); KL(p_mix || uniform) = sum p ln(2p)
    kl = 5 / 8 * math.log(5 / 4) + 3 / 8 * math.log(3 / 4)
    assert losses.mixture_kd_loss(s, t, torch.tensor([0.75, 0.25]), 1.0).item() == pytest.approx(kl, abs=1e-6)


def test_mixture_policy_logit_term_static_and_over():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    signals, teachers, _, y = make_step([[0.0, 0.2, 0.3, 0.4], [LN3, 0.0, 1.0, 2.0]], logits=logits.tolist(), classes=5)
    student = StudentOutputs(torch.randn(4, 5), torch.zeros(4, 2), [])
    one = build_policy("mixture", 1, {})
    signals1, teachers1, _, _ = make_step([[0.1] * 4], logits=logits[:1].tolist(), classes=5)
    w1 = one.weights(signals1, teachers1, student, y)
    assert torch.allclose(one.logit_term(w1, signals1, teachers1, student, 4.0),
                          losses.kd_loss(student.logits, logits[0], 4.0), atol=1e-6)
    static = build_policy("mixture", 2, {"weights": [1, 0]})
    w = static.weights(signals, teachers, student, y)
    assert torch.allclose(static.logit_term(w, signals, teachers, student, 4.0),
                          losses.kd_loss(student.logits, logits[0], 4.0), atol=1e-6)
    over = build_policy("mixture", 2, {"over": "camkd"})
    w = over.weights(signals, teachers, student, y)
    assert torch.allclose(w.logit[0], torch.tensor([0.75, 0.25]), atol=1e-6)  # camkd, Equ. 9
    assert torch.allclose(over.logit_term(w, signals, teachers, student, 4.0),
                          losses.mixture_kd_loss(student.logits, logits, w.logit, 4.0))
    rl = build_policy("mixture", 2, {"over": "mtkd_rl", "over_args": {"variant": "paper", "buffer": 8}})
    rl.setup(teachers)
    assert rl.inner.buffer.capacity == 8 and any(k.startswith("inner.agent.") for k in rl.state_dict())
    rl.begin_epoch(0)
    rl.observe(signals, rl.weights(signals, teachers, student, y), teachers, student, y)
    assert len(rl.inner.buffer.entries) == 1 and rl.end_epoch(0)["agent_updates"] == 1
    for bad in ({"weights": [1, -1]}, {"over": "mixture"}, {"over": "nope"}, {"over_args": {"buffer": 2}},
                {"over": "mtkd_rl", "over_args": {"buffer": 0}}):
        with pytest.raises(ValueError):
            POLICIES["mixture"].check_args(bad)
    with pytest.raises(ValueError):
        build_policy("mixture", 3, {"weights": [1, 2]})


# ----------------------------------------------------------------------------- DIST


def test_dist_loss_decomposition_and_values():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(2, 6, 5)
    per_sample = losses.dist_loss(s, t, 2.0)
    assert per_sample.shape == (2, 6)
    for m in range(2):
        ps, pt = torch.softmax(s / 2, 1), torch.softmax(t[m] / 2, 1)
        inter = torch.stack([1 - torch.corrcoef(torch.stack([ps[i], pt[i]]))[0, 1] for i in range(6)])
        intra = torch.stack([1 - torch.corrcoef(torch.stack([ps[:, j], pt[:, j]]))[0, 1] for j in range(5)]).mean()
        assert torch.allclose(per_sample[m], 4.0 * (inter + intra), atol=1e-5)  # T^2 (inter_i + shared intra)
        assert per_sample[m].mean().item() == pytest.approx(4.0 * (inter.mean() + intra).item(), abs=1e-5)
    assert losses.dist_loss(s, s, 4.0).abs().max().item() < 1e-5
    assert torch.allclose(losses.dist_loss(s, t[1], 2.0), per_sample[1])


def test_signals_with_dist_keep_kl_as_t2_kl():
    torch.manual_seed(0)
    s = torch.randn(4, 5, requires_grad=True)
    teachers = TeacherOutputs(torch.randn(2, 4, 5), [torch.randn(4, 3)] * 2, [torch.randn(4, 3)] * 2)
    student = StudentOutputs(s, torch.randn(4, 3), [torch.randn(4, 3)] * 2)
    y = torch.tensor([0, 1, 2, 3])
    sig = compute_signals(student, teachers, y, 4.0, "dist")
    assert torch.allclose(sig.kd, losses.dist_loss(s, teachers.logits, 4.0))
    assert torch.allclose(sig.kl, losses.kd_loss(s, teachers.logits, 4.0))
    assert sig.kd.requires_grad and not sig.kl.requires_grad
    with pytest.raises(ValueError):
        compute_signals(student, teachers, y, 4.0, "mse")


RECIPE = {"name": "t", "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0},
          "student": "cifar_resnet8", "teachers": [{"model": "cifar_resnet14", "pretrained": False}],
          "schedule": {"name": "cosine", "epochs": 2}}


def test_recipe_keys_logit_loss_plot_and_policy_args():
    r = recipe_from_dict(RECIPE, ["distill.logit_loss=dist", "run.plot=true", "distill.policy=mtkd_rl",
                                  "distill.policy_args={variant: official, buffer: 16}"])
    assert r.distill.logit_loss == "dist" and r.run.plot is True
    assert recipe_from_dict(RECIPE).distill.logit_loss == "kd"
    for override, field in (("distill.logit_loss=kl", "distill.logit_loss"),
                            ("distill.policy_args={variant: authors}", "distill.policy_args")):
        with pytest.raises(RecipeError) as info:
            recipe_from_dict(RECIPE, ["distill.policy=mtkd_rl", override])
        assert field in str(info.value)
