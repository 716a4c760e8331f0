"""Distiller, teacher pool, taps and projectors on small zoo models."""

import pytest
import timm
import torch

import zoo  # noqa: F401
from distill import losses
from distill.distiller import Distiller
from distill.policies import build_policy
from distill.projectors import MapProjector, VectorProjector
from distill.resolve import DataSpec
from distill.taps import FeatureTap, parse_feature_tap
from distill.teachers import InputAdapter, Teacher, TeacherPool

torch.set_num_threads(1)

DATA = DataSpec((3, 16, 16), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def _pool(tap, names=("cifar_resnet14", "cifar_wrn_16_1"), target_norm=None):
    teachers = []
    for i, name in enumerate(names):
        torch.manual_seed(i)
        model = timm.create_model(name, num_classes=7)
        mean, std = target_norm or (DATA.mean, DATA.std)
        teachers.append(Teacher(f"{i}:{name}", model, InputAdapter(DATA, mean, std), tap, DATA.input_size))
    return TeacherPool(teachers)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 6])


def test_input_adapter_renormalises_and_resizes():
    adapter = InputAdapter(DATA, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), size=24)
    x, _ = _batch()
    raw = x * torch.tensor(DATA.std).view(1, 3, 1, 1) + torch.tensor(DATA.mean).view(1, 3, 1, 1)
    expected = (raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = adapter(x)
    assert out.shape == (4, 3, 24, 24)
    resized = torch.nn.functional.interpolate(expected, size=(24, 24), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(out, resized, atol=1e-5)
    same = InputAdapter(DATA, DATA.mean, DATA.std)
    assert not same.renormalise and same.size is None and same(x) is x


def test_aver_loss_is_equation_2_with_equal_weights():
    torch.manual_seed(0)
    pool = _pool(FeatureTap("pre_logits"))
    student = timm.create_model("cifar_resnet8", num_classes=7)
    distiller = Distiller(student, pool, build_policy("aver", 2, {}), FeatureTap("pre_logits"), DATA.input_size,
                          alpha=1.0, beta=5.0, temperature=4.0)
    x, y = _batch()
    out = distiller(x, y)
    # recompute by hand from independent forward passes
    distiller.trainable.eval(), student.train()
    with torch.no_grad():
        t_logits = [t.model(x) for t in pool.teachers]
        t_feats = [t.model.forward_head(t.model.forward_features(x), pre_logits=True) for t in pool.teachers]
    s_feat = student.forward_head(student.forward_features(x), pre_logits=True)
    s_logits = student.get_classifier()(s_feat)
    ce = losses.cross_entropy(s_logits, y)
    kd = sum(losses.kd_loss(s_logits, t, 4.0) for t in t_logits) / 2
    feat = sum(losses.fitnet_loss(p(s_feat), f) for p, f in zip(distiller.trainable.projectors, t_feats)) / 2
    expected = ce + kd + 5.0 * feat
    assert out.per_sample.shape == (4,)
    assert torch.allclose(out.per_sample, expected, atol=1e-5)
    assert torch.allclose(out.loss, expected.mean(), atol=1e-5)
    assert torch.equal(out.weights.logit, torch.full((4, 2), 0.5))


def test_teachers_run_once_frozen_in_eval_and_get_no_grad():
    pool = _pool(FeatureTap("pre_logits"))
    distiller = Distiller(timm.create_model("cifar_resnet8", num_classes=7), pool, build_policy("aver", 2, {}),
                          FeatureTap("pre_logits"), DATA.input_size)
    distiller.trainable.train()
    pool.train()
    x, y = _batch()
    out = distiller(x, y)
    out.loss.backward()
    assert all(not t.model.training for t in pool.teachers)
    assert all(p.grad is None and not p.requires_grad for p in pool.parameters())
    assert all(p.grad is not None for p in distiller.trainable.projectors.parameters())
    assert out.signals.teacher_ce.shape == (2, 4) and out.signals.cos.shape == (2, 4)
    assert not out.signals.cos.requires_grad and not out.signals.kl.requires_grad


def test_teacher_forward_features_called_once_per_step_in_inference_mode():
    pool = _pool(FeatureTap("pre_logits"))
    counts = {"n": 0, "modes": []}
    for t in pool.teachers:
        original = t.model.forward_features

        def counted(x, original=original):
            counts["n"] += 1
            counts["modes"].append(torch.is_inference_mode_enabled())
            return original(x)

        t.model.forward_features = counted
    distiller = Distiller(timm.create_model("cifar_resnet8", num_classes=7), pool, build_policy("aver", 2, {}),
                          FeatureTap("pre_logits"), DATA.input_size)
    counts["n"], counts["modes"] = 0, []
    x, y = _batch()
    distiller(x, y).loss.backward()
    assert counts["n"] == 2  # one pass per teacher
    assert counts["modes"] == [True, True]


def test_last_map_tap_sizes_map_projectors():
    pool = _pool(FeatureTap("last_map"), names=("cifar_wrn_16_2", "cifar_resnet8x4"))
    student = timm.create_model("cifar_resnet8", num_classes=7)
    distiller = Distiller(student, pool, build_policy("aver", 2, {}), FeatureTap("last_map"), DATA.input_size)
    projectors = distiller.trainable.projectors
    assert all(isinstance(p, MapProjector) for p in projectors)
    x, y = _batch()
    out = distiller(x, y)
    for projected, feature in zip(out.student.projected, out.teachers.features):
        assert projected.shape == feature.shape and feature.ndim == 4
    assert out.signals.feat.shape == (2, 4)


def test_stage_tap_uses_forward_intermediates():
    tap = parse_feature_tap("1")
    pool = _pool(tap, names=("cifar_resnet14",))
    student = timm.create_model("cifar_resnet8", num_classes=7)
    distiller = Distiller(student, pool, build_policy("aver", 1, {}), tap, DATA.input_size)
    x, y = _batch()
    out = distiller(x, y)
    assert out.teachers.features[0].shape == (4, 32, 8, 8)  # stage 1 of a CIFAR ResNet at 16 px
    assert out.student.projected[0].shape == (4, 32, 8, 8)


def test_vector_projectors_for_pre_logits_and_no_teacher_mode():
    pool = _pool(FeatureTap("pre_logits"))
    distiller = Distiller(timm.create_model("cifar_resnet8", num_classes=7), pool, build_policy("aver", 2, {}),
                          FeatureTap("pre_logits"), DATA.input_size)
    assert [type(p) for p in distiller.trainable.projectors] == [VectorProjector, VectorProjector]
    alone = Distiller(timm.create_model("cifar_resnet8", num_classes=7), TeacherPool([]), None,
                      FeatureTap("pre_logits"), DATA.input_size)
    x, y = _batch()
    out = alone(x, y)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, y))
    assert out.weights is None and len(alone.trainable.projectors) == 0


def test_unknown_feature_tap_rejected():
    with pytest.raises(ValueError):
        parse_feature_tap("middle")
