import math

import pytest
import torch

from distill import losses

torch.set_num_threads(1)


def test_cross_entropy_matches_hand_value_and_soft_targets():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    ce = losses.cross_entropy(logits, torch.tensor([2, 0]))
    assert ce.shape == (2,)
    assert ce[0].item() == pytest.approx(math.log(1 + math.exp(-1) + math.exp(-2)), abs=1e-6)
    assert ce[1].item() == pytest.approx(math.log(3), abs=1e-6)
    soft = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    ce_soft = losses.cross_entropy(logits, soft)
    assert ce_soft[0].item() == pytest.approx(ce[0].item(), abs=1e-6)
    assert ce_soft[1].item() == pytest.approx(math.log(3), abs=1e-6)


def test_cross_entropy_broadcasts_over_teachers():
    logits = torch.randn(3, 4, 5)
    y = torch.tensor([0, 1, 2, 3])
    ce = losses.cross_entropy(logits, y)
    assert ce.shape == (3, 4)
    for m in range(3):
        assert torch.allclose(ce[m], torch.nn.functional.cross_entropy(logits[m], y, reduction="none"), atol=1e-6)


def test_kd_loss_hand_value_with_temperature_squared():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert losses.kd_loss(student, teacher, 1.0).item() == pytest.approx(kl, abs=1e-6)
    # at T=2 the teacher logits [2 ln 3, 0] give the same distribution; the loss is x T^2
    assert losses.kd_loss(student, 2 * teacher, 2.0).item() == pytest.approx(4 * kl, abs=1e-6)


def test_kd_loss_per_teacher_and_zero_for_identical():
    s = torch.randn(4, 6)
    t = torch.stack([s, torch.randn(4, 6)])
    kd = losses.kd_loss(s, t, 4.0)
    assert kd.shape == (2, 4)
    assert torch.allclose(kd[0], torch.zeros(4), atol=1e-5)
    assert (kd[1] > 0).all()


def test_kd_gradient_flows_to_student_only():
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    losses.kd_loss(s, t, 4.0).sum().backward()
    assert s.grad is not None and t.grad is None


def test_fitnet_loss_hand_value():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert losses.fitnet_loss(s, t).tolist() == [2.5, 2.0]
    maps = losses.fitnet_loss(torch.ones(3, 2, 4, 4), torch.zeros(3, 2, 4, 4))
    assert maps.tolist() == [1.0, 1.0, 1.0]
