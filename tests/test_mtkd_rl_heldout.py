"""MTKD-RL ``reward: heldout``: the cheap classifier-space alignment equals its autograd
definition, it values dark knowledge that the same-sample cosine penalises (sklearn digits),
and the policy records, checkpoints and validates it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)

from distill import losses  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.policies import build_policy  # noqa: E402
from distill.policies.mtkd_rl import HeldoutGradient, PerSampleTerms, heldout_rewards  # noqa: E402
from distill.policies.mtkd_rl.persample import logit_terms  # noqa: E402

from .test_mtkd_rl import teacher_cache  # noqa: E402,F401 (fixture)
from .test_mtkd_rl_align import BATCH, TinyNet, dataset, distil, make_pool, trained_teacher  # noqa: E402

B, C, D, M, T = 32, 10, 16, 3, 4.0


def cheap_rewards(logits, teacher_logits, embedding, heldout, logit_loss="kd"):
    leaf, objective = logit_terms(logits, teacher_logits, T, logit_loss)
    terms = PerSampleTerms(leaf, objective, leaf, [], [])  # the feature half is not read here
    return heldout_rewards(terms, embedding, heldout)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("logit_loss", ["kd", "dist"])
def test_heldout_reward_equals_the_parameter_space_inner_product(bias, logit_loss):
    torch.manual_seed(0)
    fc = nn.Linear(D, C, bias=bias)
    h, h_held = torch.randn(B, D).relu(), torch.randn(B, D).relu()
    y_held = torch.randint(0, C, (B,))
    teacher_logits = torch.randn(M, B, C) * 3
    params = [p for p in fc.parameters()]
    # autograd truth: the held-out batch's mean CE gradient w.r.t. the classifier's parameters ...
    held_grad = torch.autograd.grad(F.cross_entropy(fc(h_held), y_held), params)
    heldout = HeldoutGradient()
    heldout.update(fc(h_held), y_held, h_held, bias)
    with torch.no_grad():
        logits = fc(h)
    u = cheap_rewards(logits, teacher_logits, h, heldout, logit_loss)
    term = losses.kd_loss if logit_loss == "kd" else losses.dist_loss
    for i in range(B):
        for m in range(M):
            # ... and sample i's full gradient of teacher m's term w.r.t. them (only z_i moves with
            # the parameters: sample i's own gradient; DIST's batch term through z_i alone)
            z = torch.cat([logits[:i], fc(h[i:i + 1]), logits[i + 1:]])
            grads = torch.autograd.grad(term(z, teacher_logits[m], T)[i], params)
            truth = sum((g * G).sum() for g, G in zip(grads, held_grad))
            assert abs(u[i, m].item() - truth.item()) <= 1e-5, (i, m, u[i, m].item(), truth.item())
    assert u.abs().max() > 1e-2  # not trivially zero


def test_no_heldout_batch_yet_gives_zero_rewards():
    logits, teacher_logits = torch.randn(4, C), torch.randn(M, 4, C)
    assert torch.equal(cheap_rewards(logits, teacher_logits, torch.randn(4, D), HeldoutGradient()),
                       torch.zeros(4, M))


# ----------------------------------------------------------------------------- dark knowledge, digits


def digits_split():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return torch.tensor(x, dtype=torch.float32)[order] / 16, torch.tensor(y)[order]


def sgd_train(net, x, y, steps, seed):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net


def permute_dark_knowledge(logits):
    """Each sample's non-argmax logits shifted cyclically among themselves: argmax, top-1 and the
    CE wherever the argmax is the label unchanged; the similarity structure destroyed."""
    out = logits.clone()
    top = logits.argmax(1, keepdim=True)
    order = torch.arange(logits.shape[1]).expand_as(logits)
    others = order[order != top].view(len(logits), -1)  # non-argmax classes, ascending
    out.scatter_(1, others, logits.gather(1, others.roll(1, 1)))
    return out


def test_heldout_reward_values_dark_knowledge_that_the_same_sample_cosine_penalises():
    """A student (MLP, 71% on held-out digits after 30 SGD steps) distilled from a teacher
    (MLP, 97%): the teacher's soft labels against the same logits with the non-argmax mass
    permuted. The held-out reward ranks the true teacher higher on average and on most
    samples; the same-sample cosine (reward align) ranks the permuted one higher on > 80% of
    samples, the issue's complaint."""
    torch.manual_seed(0)
    x, y = digits_split()
    x_train, y_train, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]
    teacher = sgd_train(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), x_train, y_train, 600, 1)
    student = sgd_train(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), x_train, y_train, 30, 1)
    with torch.no_grad():
        assert (teacher(x_test).argmax(1) == y_test).float().mean() > 0.95
        assert 0.6 < (student(x_test).argmax(1) == y_test).float().mean() < 0.8
        good = teacher(x_train)
        bad = permute_dark_knowledge(good)
        assert torch.equal(good.argmax(1), bad.argmax(1))
        right = good.argmax(1) == y_train
        assert torch.allclose(losses.cross_entropy(good, y_train)[right], losses.cross_entropy(bad, y_train)[right],
                              atol=1e-6)
        h = student[:2](x_train)
        z = student[2](h)
    heldout, u, cos = HeldoutGradient(), [], []
    onehot = F.one_hot(y_train, 10).float()
    for start in range(0, 1200, BATCH):  # the previous batch is the held-out one
        s = slice(start, start + BATCH)
        if start:
            u.append(cheap_rewards(z[s], torch.stack([good[s], bad[s]]), h[s], heldout))
            cos.append(torch.stack([F.cosine_similarity(z[s].softmax(1) - onehot[s], (z[s] / T).softmax(1)
                                                        - (t[s] / T).softmax(1), dim=1) for t in (good, bad)], 1))
        heldout.update(z[s], y_train[s], h[s], True)
    u, cos = torch.cat(u), torch.cat(cos)
    mean_good, mean_bad = u.mean(0).tolist()
    assert mean_good > 1.3 * mean_bad > 0, (mean_good, mean_bad)
    assert (u[:, 0] > u[:, 1]).float().mean() > 0.6
    assert (cos[:, 0] > cos[:, 1]).float().mean() < 0.2


# ----------------------------------------------------------------------------- the policy


def test_policy_rewards_through_the_distiller_and_checkpoint():
    from distill.distiller import Distiller
    from .test_mtkd_rl_align import DATA, TAP

    torch.manual_seed(0)
    teachers = [trained_teacher(s) for s in range(2)]
    policy = build_policy("mtkd_rl", 2, {"reward": "heldout", "warmup_epochs": 0})
    distiller = Distiller(TinyNet(hidden=8), make_pool(teachers), policy, TAP, DATA.input_size)
    x, y = dataset(2 * BATCH, seed=3)
    policy.begin_epoch(0)
    out = distiller(x[:BATCH], y[:BATCH])
    first = policy._step_cache[1]["reward"]
    assert torch.equal(first[0], torch.zeros(BATCH, 2)) and first[1].abs().sum() > 0  # no held-out batch yet
    policy.observe(out.signals, out.weights, out.teachers, out.student, y[:BATCH])
    held = policy.get_extra_state()["heldout"]
    fc = distiller.student.fc
    torch.testing.assert_close(held["weight"], torch.autograd.grad(
        F.cross_entropy(out.student.logits, y[:BATCH]), fc.weight, retain_graph=True)[0])
    out2 = distiller(x[BATCH:], y[BATCH:])
    second = policy._step_cache[1]["reward"][0]
    expected = cheap_rewards(out2.student.logits, out2.teachers.logits, out2.student.embedding, policy.heldout)
    assert torch.allclose(second, expected, atol=1e-6) and second.abs().sum() > 0
    restored = build_policy("mtkd_rl", 2, {"reward": "heldout", "warmup_epochs": 0})
    restored.setup(out.teachers)
    restored.set_extra_state(policy.get_extra_state())
    assert torch.equal(restored.heldout.weight, policy.heldout.weight)
    assert torch.equal(restored.heldout.bias, policy.heldout.bias)


def test_identical_teachers_stay_uniform_under_heldout():
    teacher = trained_teacher(0)
    means, metrics = distil([teacher] * 3, epochs=3, args={"reward": "heldout"})
    assert (means - 1 / 3).abs().max() < 0.01
    assert metrics[-1]["agent_updates"] > 0


def test_reward_option_is_validated():
    with pytest.raises(ValueError, match="reward must be one of align, heldout"):
        build_policy("mtkd_rl", 2, {"reward": "held"})
    with pytest.raises(ValueError, match="reward does not apply to variant paper"):
        build_policy("mtkd_rl", 2, {"variant": "paper", "reward": "heldout"})
    policy = build_policy("mtkd_rl", 2, {"reward": "heldout"})
    with pytest.raises(DistillError, match=r"reward heldout \(the default\) needs a student whose logits are its linear "
                                         r"classifier .*give policy_args: \{reward: align\}"):
        policy.bind_student([nn.Linear(2, 2)] * 2, None)


def test_heldout_resume_is_bit_identical(tmp_path, teacher_cache, monkeypatch):
    # the held-out gradient of the last batch before the checkpoint has to survive it
    from . import test_mtkd_rl as end_to_end

    monkeypatch.setitem(end_to_end.RESUME_ARGS, "heldout", {"buffer": 5, "reward": "heldout"})
    end_to_end.test_mtkd_rl_resume_is_bit_identical("heldout", tmp_path, teacher_cache, monkeypatch)
