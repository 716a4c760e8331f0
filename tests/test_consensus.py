"""Teacher consensus on the dark knowledge (``distill.policies.consensus``) and ``mtkd_rl``'s
``prior: consensus``: the formula against a direct computation, its invariances, and a teacher
whose non-argmax logits are reversed (top-1 and CE intact) outvoted at the logit level only, on
real distillation steps through the Distiller with the tiny pools of ``test_mtkd_rl_align``."""

import math
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the tiny pools of test_mtkd_rl_align
sys.path.insert(0, str(HERE.parent / "benchmarks"))  # the dark corruption of the discrimination pools

from corruptions import reverse_dark_knowledge  # noqa: E402
from distill.policies import build_policy  # noqa: E402
from distill.policies.camkd import confidence_weights  # noqa: E402
from distill.policies.consensus import consensus_prior, consensus_weights, dark_disagreement  # noqa: E402
from test_mtkd_rl_agent import one_step  # noqa: E402
from test_mtkd_rl_align import BATCH, TinyNet, dataset, distil, trained_teacher  # noqa: E402


class DarkNet(TinyNet):
    """A trained teacher whose non-argmax logits are put in reverse rank order on every sample."""

    def __init__(self, trained: TinyNet):
        super().__init__()
        self.load_state_dict(trained.state_dict())

    def forward_head(self, f, pre_logits: bool = False):
        return f if pre_logits else reverse_dark_knowledge(self.fc(f))


@pytest.fixture(scope="module")
def good_teachers():
    return [trained_teacher(s) for s in range(3)]


def direct_weights(logits, labels):
    """Return the consensus weights (B, M) computed one number at a time from the module docstring."""
    m, b, c = logits.shape
    out = torch.zeros(b, m, dtype=torch.float64)
    for i in range(b):
        p = []
        for k in range(m):
            z = [float(logits[k, i, j]) for j in range(c) if j != labels[i]]
            top = max(z)
            s = sum(math.exp(v - top) for v in z)
            p.append([math.exp(v - top) / s for v in z])
        d = []
        for k in range(m):
            q = [sum(p[o][j] for o in range(m) if o != k) / (m - 1) for j in range(c - 1)]
            d.append(sum(p[k][j] * math.log(p[k][j] / q[j]) for j in range(c - 1)))
        e = [math.exp(v - max(d)) for v in d]
        for k in range(m):
            out[i, k] = (1 - e[k] / sum(e)) / (m - 1)
    return out


def test_consensus_weights_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 6, 7, generator=g) * 3, torch.randint(0, 7, (6,), generator=g)
    a = consensus_weights(logits, labels)
    assert a.shape == (6, 4)
    assert torch.allclose(a.double(), direct_weights(logits, labels), atol=1e-6)
    assert torch.allclose(a.sum(1), torch.ones(6), atol=1e-6)
    # soft targets (mixup): the label is each row's largest target class
    soft = torch.nn.functional.one_hot(labels, 7).float() * 0.6 + 0.4 / 7
    assert torch.equal(consensus_weights(logits, soft), a)
    # the label's own logit does not enter: change it and nothing moves
    moved = logits.clone()
    moved[:, torch.arange(6), labels] += 5.0
    assert torch.allclose(consensus_weights(moved, labels), a, atol=1e-6)


def test_identical_teachers_leave_the_prior_unchanged_and_two_teachers_are_refused():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(1, 5, 10, generator=g).expand(4, 5, 10), torch.randint(0, 10, (5,), generator=g)
    assert dark_disagreement(logits, labels).abs().max() < 1e-6  # leave-one-out mean: float rounding only
    assert torch.allclose(consensus_weights(logits, labels), torch.full((5, 4), 0.25), atol=1e-7)
    c = torch.softmax(torch.randn(5, 4, generator=g), 1)
    assert torch.allclose(consensus_prior(c, logits, labels), c, atol=1e-6)
    with pytest.raises(ValueError, match="at least 3 teachers"):
        consensus_weights(logits[:2], labels)
    with pytest.raises(ValueError, match="at least 3 teachers"):
        build_policy("mtkd_rl", 2, {"prior": "consensus"})
    with pytest.raises(ValueError, match="prior consensus applies to fusion refine"):
        build_policy("mtkd_rl", 4, {"prior": "consensus", "fusion": "mix"})
    with pytest.raises(ValueError, match="prior auto applies to fusion refine"):
        build_policy("mtkd_rl", 4, {"prior": "auto", "fusion": "mix"})
    with pytest.raises(ValueError, match="prior must be one of auto, confidence, consensus"):
        build_policy("mtkd_rl", 4, {"prior": "vote"})
    # auto (the default) is the consensus where it applies, else the confidence
    assert [build_policy("mtkd_rl", m, args).prior for m, args in
            ((4, {}), (3, {"prior": "auto"}), (2, {}), (4, {"fusion": "mix"}), (4, {"variant": "paper"}),
             (4, {"prior": "confidence"}))] == ["consensus", "consensus", "confidence", "confidence", "confidence",
                                                "confidence"]


def test_weights_at_initialisation_are_the_consensus_prior_at_the_logit_level_and_c_at_the_feature_level(
        good_teachers):
    models = good_teachers + [DarkNet(good_teachers[0])]
    policy, out = one_step(models, {})  # the default: prior auto, the consensus with M >= 3
    c = confidence_weights(out.signals.teacher_ce)
    _, y = dataset(BATCH, seed=0)  # one_step's batch
    prior = consensus_prior(c, out.teachers.logits, y)
    assert (out.weights.logit - prior).abs().max() <= 1e-6
    assert (out.weights.feat - c).abs().max() <= 1e-6
    # the reversed teacher keeps its confidence (top-1 and CE intact) and loses the consensus
    assert c[:, 3].mean() * 4 > 0.8
    assert prior[:, 3].mean() * 4 < 0.5


def test_the_reversed_teacher_is_outvoted_at_the_logit_level_over_training(good_teachers):
    models = good_teachers + [DarkNet(good_teachers[0])]
    means, metrics = distil(models, epochs=3)  # the default: prior auto, the consensus here
    assert all(metrics[e]["agent_updates"] > 0 for e in (1, 2))
    shares = means[1:] * 4  # x uniform, epochs after the warm-up; (epochs, level, teacher)
    assert (shares[:, 0, 3] < 0.5).all(), shares[:, 0]  # logit level: outvoted
    assert (shares[:, 1, 3] > 0.8).all(), shares[:, 1]  # feature level: its features are intact
    confidence, _ = distil(models, epochs=3, args={"prior": "confidence"})  # Equ. 9's prior cannot see it
    assert (confidence[1:, 0, 3] * 4 > 0.8).all(), confidence[:, 0]
