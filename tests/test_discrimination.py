"""The discrimination benchmark's corrupted teachers: every path to their logits and
features (the tap's split head, the tapped map, a head applied to another feature) carries
the corruption the study claims, so the benchmark measures what its tables say."""

import sys
from pathlib import Path

import pytest
import timm
import torch

import zoo  # noqa: F401  (registers the CIFAR archs)
from distill.taps import TappedModel, parse_feature_tap

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import discrimination  # noqa: E402


@pytest.fixture(scope="module")
def inner():
    torch.manual_seed(0)
    return timm.create_model("cifar_resnet8", num_classes=10).eval()


def _tapped(model, tap="last_map"):
    return TappedModel(model, parse_feature_tap(tap), (3, 32, 32))


def _corrupted(inner, kind, index):
    return discrimination.CorruptedModel(inner, kind, index).eval()  # frozen, as a teacher


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_blind_teacher_is_wrong_exactly_on_its_classes_through_the_tap(inner, index):
    torch.manual_seed(1)
    x = torch.randn(64, 3, 32, 32)
    clean = _tapped(inner)(x).logits
    out = _tapped(_corrupted(inner, "blind", index))(x)
    blind = clean.argmax(-1) % discrimination.BLIND_PERIOD == index
    assert torch.equal(out.logits[blind], clean[blind].roll(1, dims=-1))
    assert torch.equal(out.logits[~blind], clean[~blind])
    # the head CA-MKD applies to a projected feature carries the same corruption
    assert torch.allclose(_tapped(_corrupted(inner, "blind", index)).head(out.feature), out.logits)


def test_shift_teacher_rolls_every_logit_and_keeps_its_feature(inner):
    x = torch.randn(8, 3, 32, 32)
    clean = _tapped(inner)(x)
    for tap in ("last_map", "pre_logits"):
        model = _corrupted(inner, "shift", 3)
        out = _tapped(model, tap)(x)
        assert torch.equal(out.logits, clean.logits.roll(1, dims=-1))
        assert torch.allclose(_tapped(model, tap).head(out.feature), out.logits)
    assert torch.equal(out.embedding, clean.embedding)


def test_noise_feature_teacher_exposes_noise_keeps_logits_and_its_head_reads_its_input(inner):
    x = torch.randn(8, 3, 32, 32)
    clean = _tapped(inner)(x)
    model = _corrupted(inner, "noise_feature", 3)
    tapped = _tapped(model)
    out = tapped(x)
    assert torch.equal(out.logits, clean.logits) and torch.equal(out.embedding, clean.embedding)
    assert torch.equal(out.feature, torch.sin(1000.0 * clean.feature))
    # a head applied to any other map (a student's projected feature) is the real head on that map
    other = torch.randn_like(clean.feature)
    assert torch.allclose(tapped.head(other), inner.forward_head(other))
    assert not torch.allclose(tapped.head(out.feature.clone()), out.logits, atol=1e-2)
