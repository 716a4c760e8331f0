"""distill-pool check on real files: the shared ResNet-56 weights, once as published and once with its
classifier rows shifted c -> c + 3, on real CIFAR-10 JPEGs."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from distill import cli
from distill.data import IMAGENET_MEAN, IMAGENET_STD
from distill.paths import weights_dir
from distill.pool_check import ECE_BINS, PoolStats
from distill.recipe_load import recipe_from_dict

from .conftest import SHARED_DATA

torch.set_num_threads(1)

RESNET56 = SHARED_DATA / "weights" / "akamaster_resnet_cifar10" / "resnet56-4bfd9763.th"
SPEC = "cifar_resnet56.akamaster_cifar10"
LIMIT = 100  # 10 images per class: enough to assess the class order (5 per class)
SHIFT = 3

needs_weights = pytest.mark.skipif(not RESNET56.is_file(), reason=f"shared weights not found: {RESNET56}")


def published_resnet56():
    """Return the ResNet-56 with the shared weights (pre-filled download cache, as offline)."""
    from distill.resolve import resolve_model

    weights_dir().mkdir(parents=True, exist_ok=True)
    shutil.copy(RESNET56, weights_dir())
    return resolve_model(SPEC, pretrained=True).model.eval()


def shifted_weights_file(path):
    """Write the ResNet-56 with classifier rows moved c -> c + SHIFT (mod 10) to ``path``; return it."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in published_resnet56().state_dict().items()}
    for key in ("fc.weight", "fc.bias"):
        state[key] = torch.roll(state[key], SHIFT, 0).contiguous()  # row c + 3 holds the old row c
    save_file(state, str(path))
    return path


def recipe_dict(root, teachers, **run):
    return {"name": "poolcheck", "data": {"dataset": "cifar10", "root": str(root), "download": False,
                                          "num_workers": 0, "batch_size": 32, "eval_batch_size": 50},
            "student": {"model": "cifar_resnet8"}, "teachers": teachers,
            "run": {"device": "cpu", "progress": False, **run}}


def independent_metrics(root, limit):
    """Return (top-1 %, mean NLL) of the published ResNet-56 on the check's images, computed here."""
    from distill.data import balanced_subset
    from torchvision import datasets, transforms as T

    folder = datasets.ImageFolder(str(root / "test"), transform=T.Compose(
        [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    idx = balanced_subset(folder.targets, limit)
    x = torch.stack([folder[i][0] for i in idx])
    y = torch.tensor([folder.targets[i] for i in idx])
    with torch.no_grad():
        logits = published_resnet56()(x)
    return 100.0 * int((logits.argmax(1) == y).sum()) / len(y), F.cross_entropy(logits, y).item()


@needs_weights
def test_shifted_teacher_is_found_and_its_printed_line_restores_the_original(cifar10_jpeg_root, tmp_path, capsys):
    shifted = shifted_weights_file(tmp_path / "resnet56_shift3.safetensors")
    recipe = recipe_dict(cifar10_jpeg_root, [SPEC, {"model": SPEC, "weights": str(shifted)}])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out_dir = tmp_path / "report"
    code = cli.pool_main(["check", str(path), "--limit", str(LIMIT), "--offline", "--output-dir", str(out_dir)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads((out_dir / "pool_report.json").read_text())
    original, moved = report["teachers"]
    top1, nll = independent_metrics(cifar10_jpeg_root, LIMIT)
    assert report["images"] == LIMIT
    assert original["top1"] == pytest.approx(top1, abs=1e-9)
    assert original["nll"] == pytest.approx(nll, rel=1e-4)
    assert original["verdict"] == "keep" and not original["permutation"]["found"]
    # the shifted teacher predicts c + 3 wherever the original predicts c: it never agrees with it
    assert report["agreement"][0][1] == 0.0 and report["agreement"][0][0] == 100.0
    assert moved["top1"] < report["chance"]
    perm = moved["permutation"]
    assert perm["found"] and perm["classes"] == [(c + SHIFT) % 10 for c in range(10)]
    assert perm["top1_after"] == pytest.approx(original["top1"], abs=1e-9)
    assert moved["verdict"] == "check" and perm["line"] in moved["reason"]
    line = next(l.split("fix: ", 1)[1] for l in printed.splitlines() if "fix: " in l)
    assert line == "classes: [3, 4, 5, 6, 7, 8, 9, 0, 1, 2]"
    figure = (out_dir / "pool_report.png")
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(str(figure))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400

    # with the printed line the shifted teacher scores the original's top-1 on the same images
    from distill.pool_command import check_pool

    fixed = {"model": SPEC, "weights": str(shifted), **yaml.safe_load(line)}
    again = check_pool(recipe_from_dict(recipe_dict(cifar10_jpeg_root, [SPEC, fixed])), "val", LIMIT, progress=False)
    original2, mapped = again["teachers"]
    assert mapped["top1"] == pytest.approx(original["top1"], abs=1e-9)
    assert mapped["nll"] == pytest.approx(original["nll"], rel=1e-6)
    assert again["agreement"][0][1] == 100.0 and again["mean_kl"][0][1] == pytest.approx(0.0, abs=1e-6)
    assert mapped["verdict"] == "keep" and not mapped["permutation"]["found"]


def test_pool_stats_match_a_direct_computation():
    """Every statistic of two made-up teachers (one with a NaN row) against numpy, written out here."""
    gen = torch.Generator().manual_seed(0)
    m, b, c = 2, 40, 4
    logits = torch.randn(m, b, c, generator=gen) * 3
    logits[1, 5, 2] = float("nan")
    y = torch.randint(0, c, (b,), generator=gen)
    stats = PoolStats(m, c, torch.device("cpu"))
    stats.update(logits[:, :25], y[:25])
    stats.update(logits[:, 25:], y[25:])
    report = stats.summary(["a", "b"], [None, None])
    lg = logits.double().numpy()
    yy = y.numpy()
    for i, t in enumerate(report["teachers"]):
        ok = np.isfinite(lg[i]).all(1)
        logp = lg[i] - np.log(np.exp(lg[i] - lg[i].max(1, keepdims=True)).sum(1, keepdims=True)) \
            - lg[i].max(1, keepdims=True)
        p = np.exp(logp)
        pred = lg[i].argmax(1)
        hit = (pred == yy) & ok
        assert t["top1"] == pytest.approx(100 * hit.mean())
        assert t["non_finite"] == int((~ok).sum())
        assert t["nll"] == pytest.approx(-logp[ok, yy[ok]].mean())
        conf = p.max(1)
        ece = 0.0
        for k in range(ECE_BINS):
            inside = ok & (conf > k / ECE_BINS) & (conf <= (k + 1) / ECE_BINS)
            if inside.any():
                ece += inside.sum() / ok.sum() * abs(conf[inside].mean() - hit[inside].mean())
        assert t["ece"] == pytest.approx(ece)
        per_class = [100 * hit[yy == k].mean() for k in range(c)]
        assert t["class_top1"]["min"] == pytest.approx(min(per_class))
        assert t["class_top1"]["max"] == pytest.approx(max(per_class))
    ok = np.isfinite(lg).all(2).all(0)
    logp = torch.log_softmax(logits.double(), -1).numpy()
    kl01 = (np.exp(logp[0]) * (logp[0] - logp[1])).sum(1)[ok].mean()
    assert report["mean_kl"][0][1] == pytest.approx(kl01)
    clean = np.where(np.isfinite(lg).all(2, keepdims=True), lg, 0.0)
    probs = np.exp(torch.log_softmax(torch.from_numpy(clean), -1).numpy())
    assert report["ensemble_top1"] == pytest.approx(100 * (probs.mean(0).argmax(1) == yy).mean())
    assert report["mixture_top1"] == pytest.approx(100 * (np.log(probs).mean(0).argmax(1) == yy).mean())
