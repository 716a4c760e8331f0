"""The epoch meter's weight statistics, against hand-computed numbers."""

from types import SimpleNamespace

import math

import torch

from distill.engine import EpochMeter
from distill.policies.base import Weights


def _step(w_logit, teacher_logits, y):
    b = y.shape[0]
    return SimpleNamespace(per_sample=torch.zeros(b), loss=torch.tensor(0.0), parts={}, finite=None,
                           logits=torch.zeros(b, teacher_logits.shape[-1]),
                           weights=Weights(w_logit, torch.full_like(w_logit, 0.5)),
                           teachers=SimpleNamespace(logits=teacher_logits))


def test_weight_on_wrong_teachers_relative_to_uniform():
    y = torch.tensor([0, 1, 2])
    eye = torch.eye(3)
    # teacher 0 is right on every sample; teacher 1 misses samples 0 and 2 (predicts 1, 1, 1)
    logits = torch.stack([eye[[0, 1, 2]], eye[[1, 1, 1]]])  # (M=2, B=3, C=3)
    w = torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.6, 0.4]])
    meter = EpochMeter(torch.device("cpu"), 2)
    meter.update(_step(w, logits, y), y)
    stats = meter.weight_stats(["a", "b"])
    # wrong pairs: (0, b) weight 0.2 and (2, b) weight 0.4; mean 0.3, times M = 2
    assert math.isclose(stats["w_logit_wrong"], 0.6, rel_tol=1e-6)
    assert math.isclose(stats["w_logit_mean/a"], (0.8 + 0.5 + 0.6) / 3, rel_tol=1e-6)
    # equal weights give exactly 1.0; no wrong teacher gives NaN
    meter = EpochMeter(torch.device("cpu"), 2)
    meter.update(_step(torch.full((3, 2), 0.5), logits, y), y)
    assert math.isclose(meter.weight_stats(["a", "b"])["w_logit_wrong"], 1.0, rel_tol=1e-6)
    meter = EpochMeter(torch.device("cpu"), 2)
    meter.update(_step(w, torch.stack([eye, eye]), y), y)
    assert math.isnan(meter.weight_stats(["a", "b"])["w_logit_wrong"])
