"""benchmarks/first_order_rewards.py: the statistics and the all-parameter reward against the
policy's closed-form classifier-space reward and a per-sample autograd loop."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import first_order_rewards as fo  # noqa: E402
import timm  # noqa: E402
import zoo  # noqa: E402,F401
from distill.losses import kd_loss  # noqa: E402


def test_pair_statistics_rank_the_watched_teacher_against_the_others():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 3.0]])
    stats = fo.pair_statistics(rewards, torch.tensor([True, True, False]), index=0)
    # sample 0: (1 - 2.5) / std(1, 2, 3) = -1.5; sample 1: (3 - 1.5) / 1 = +1.5
    assert stats == {"z": pytest.approx(0.0), "lowest": 0.5, "pairs": 2}
    stats = fo.pair_statistics(rewards, torch.tensor([True, False, True]), index=1)
    # sample 0: (2 - 2) / 1 = 0; sample 2: (0 - 1.5) / std(0, 0, 3) = -1.5 / sqrt(3)
    assert stats["z"] == pytest.approx(-1.5 / 3 ** 0.5 / 2)
    assert stats["lowest"] == 0.0  # the least of (1, 2, 3) and of (0, 0, 3) is teacher 0's, not 1's


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet8", num_classes=10).eval()
    for module in model.modules():  # non-trivial running statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model


def test_all_parameter_reward_is_each_samples_own_gradient_against_the_heldout_one(student):
    torch.manual_seed(1)
    x, teachers, xh, yh = torch.randn(5, 3, 32, 32), torch.randn(2, 5, 10) * 3, torch.randn(7, 3, 32, 32), torch.arange(7)
    heldout = fo.parameter_gradient(student, xh, yh, chunk=3)
    params = list(student.parameters())
    truth_h = torch.autograd.grad(F.cross_entropy(student(xh), yh), params)
    for name, g in zip(dict(student.named_parameters()), truth_h):
        torch.testing.assert_close(heldout[name], g, rtol=1e-4, atol=1e-6)
    got = fo.parameter_rewards(student, x, teachers, 4.0, heldout, chunk=2)
    for i in range(5):
        for m in range(2):
            own = torch.autograd.grad(kd_loss(student(x[i:i + 1]), teachers[m, i:i + 1], 4.0)[0], params)
            truth = sum((a * b).sum() for a, b in zip(own, truth_h))
            assert got[i, m].item() == pytest.approx(truth.item(), rel=1e-3, abs=1e-7)


def test_the_policys_classifier_space_reward_is_the_all_parameter_one_restricted_to_the_classifier(student):
    torch.manual_seed(2)
    x, teachers, xh, yh = torch.randn(6, 3, 32, 32), torch.randn(3, 6, 10) * 3, torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    heldout = fo.parameter_gradient(student, xh, yh)
    classifier = {name for name, _ in student.named_parameters()
                  if name.startswith(tuple(n for n, m in student.named_modules() if m is student.get_classifier()))}
    assert classifier  # weight and bias of the linear classifier
    restricted = {k: (v if k in classifier else torch.zeros_like(v)) for k, v in heldout.items()}
    want = fo.parameter_rewards(student, x, teachers, 4.0, restricted)
    with torch.no_grad():
        logits, embedding = fo.student_parts(student, x)
        held_logits, held_embedding = fo.student_parts(student, xh)
    g = fo.kd_logit_gradients(logits, teachers, 4.0)
    got = fo.classifier_gradient(held_logits, yh, held_embedding, bias=True).rewards(g, embedding)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    assert want.abs().max() > 1e-4  # not trivially zero


def test_the_command_refuses_a_corruption_whose_logit_rewards_it_does_not_measure(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fo.main(["some/run", "--corrupt", "3:noise_half"])
    assert exit_info.value.code == 2
    assert "--corrupt: '3:noise_half' is not INDEX:KIND with KIND one of dark" in capsys.readouterr().err
