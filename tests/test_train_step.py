"""Distiller.train_step: accumulation, clipping, fp16 + GradScaler, EMA, resume, compile."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import zoo  # noqa: F401
from distill.build import build_train_step
from distill.checkpoint import load_checkpoint, save_checkpoint
from distill.engine import EpochMeter
from distill.recipe import DistillConfig, OptimConfig, RunConfig
from distill.resolve import DataSpec
from distill.taps import FeatureTap
from distill.teachers import InputAdapter, Teacher

torch.set_num_threads(1)

DATA = DataSpec((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
TAP = FeatureTap("pre_logits")
CPU = torch.device("cpu")


def _vit(seed: int, classes: int = 7):
    """A BN-free student (tiny ViT): its loss on a batch is the mean of per-sample losses."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2,
                             num_classes=classes)


def _teachers():
    out = []
    for i, name in enumerate(("cifar_resnet8", "cifar_wrn_16_1")):
        torch.manual_seed(10 + i)
        out.append(Teacher(f"{i}:{name}", timm.create_model(name, num_classes=7), InputAdapter(DATA, DATA.mean, DATA.std),
                           TAP, DATA.input_size))
    return out


def _distiller(student=None, teachers=None, policy="aver", run=None, **optim):
    torch.manual_seed(0)  # projector initialisation
    optim = OptimConfig(**{"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, **optim})
    return build_train_step(student if student is not None else _vit(1), teachers if teachers is not None else _teachers(),
                           TAP, DATA.input_size, DistillConfig(policy=policy), optim,
                           run or RunConfig(device="cpu", precision="fp32"), CPU)


def _batches(n: int, batch: int = 8):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, *DATA.input_size, generator=g), torch.randint(0, 7, (batch,), generator=g))
            for _ in range(n)]


def _params(d):
    return {k: v.detach().clone() for k, v in d.trainable.state_dict().items()}


def test_accumulation_equals_one_big_step():
    """2 micro-batches of 32 give the parameters of one step on 64 (float rounding), BN-free student."""
    big, acc = _distiller(), _distiller(accum_steps=2)
    start = _params(big)
    assert all(torch.equal(start[k], v) for k, v in _params(acc).items())
    for x, y in _batches(2, 64):
        out_big, out_acc = big.train_step(x, y), acc.train_step(x, y)
        assert out_acc.per_sample.shape == (64,) and out_acc.weights.logit.shape == (64, 2)
        assert out_acc.loss.item() == pytest.approx(out_big.loss.item(), rel=1e-5)
    moved = 0.0
    for key, value in _params(big).items():
        other = _params(acc)[key]
        assert torch.allclose(value, other, atol=2e-6, rtol=1e-5), key
        moved = max(moved, (value - start[key]).abs().max().item())
    assert moved > 1e-3  # the steps did change the parameters


def test_accumulation_without_the_loss_scaling_would_differ():
    """The 1/N scaling matters: one micro-batch alone (twice the learning signal) differs."""
    one, acc = _distiller(), _distiller(accum_steps=2)
    (x, y), = _batches(1, 64)
    acc.train_step(x, y)
    one.train_step(x[:32], y[:32])
    one.train_step(x[32:], y[32:])
    diff = max((a - b).abs().max().item() for a, b in zip(_params(one).values(), _params(acc).values()))
    assert diff > 1e-4



def test_teachers_carried_with_the_batch_equal_the_live_pool_under_accumulation():
    """A step given the teachers' outputs (as the cache delivers them) equals the step that runs
    the pool itself, with the outputs cut into the accumulation's micro-batches."""
    live, carried = _distiller(accum_steps=2), _distiller(accum_steps=2)
    for x, y in _batches(2, 16):
        teachers = carried.task.pool(x)
        a, b = live(x, y), carried(x, y, teachers)
        assert b.per_sample.shape == (16,) and b.weights.logit.shape == (16, 2)
        torch.testing.assert_close(b.per_sample, a.per_sample, rtol=1e-5, atol=1e-6)
    for key, value in _params(live).items():
        torch.testing.assert_close(_params(carried)[key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, _params(_distiller())[k]) for k, v in _params(live).items())  # they trained

@pytest.mark.parametrize("mode", ["norm", "value"])
def test_clip_grad_bounds_the_gradient(mode):
    limit = 0.05
    free, clipped = _distiller(), _distiller(clip_grad=limit, clip_mode=mode)
    (x, y), = _batches(1)
    free.train_step(x, y)
    clipped.train_step(x, y)

    def size(d):
        grads = [p.grad for p in d.trainable.parameters() if p.grad is not None]
        if mode == "norm":
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        return max(g.abs().max().item() for g in grads)

    assert size(free) > 2 * limit  # without clipping the gradient is larger than the limit
    assert size(clipped) <= limit * (1 + 1e-5)


def test_agc_leaves_the_head_unclipped():
    free, agc = _distiller(), _distiller(clip_grad=1e-3, clip_mode="agc")
    (x, y), = _batches(1)
    free.train_step(x, y)
    agc.train_step(x, y)
    head_free = free.student.get_classifier().weight.grad
    head_agc = agc.student.get_classifier().weight.grad
    assert torch.equal(head_free, head_agc)
    body = "blocks.0.mlp.fc1.weight"
    g_free = dict(free.student.named_parameters())[body].grad
    g_agc = dict(agc.student.named_parameters())[body].grad
    assert g_agc.norm() < 0.5 * g_free.norm()


def _fp16_run():
    return RunConfig(device="cpu", precision="fp16", ema=True, ema_decay=0.9, ema_warmup=True)


def _poisoned(batches, at: int):
    """The batches with a NaN image in batch ``at`` (a non-finite fp16 step)."""
    out = list(batches)
    x, y = out[at]
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    out[at] = (x, y)
    return out


def _roundtrip(d, tmp_path):
    """Save the Distiller and its optimiser through a checkpoint, rebuild and load them; return the copy."""
    tensors, state = d.state_dict()
    save_checkpoint(tmp_path / "ckpt", tensors, {**state, "optimizer": d.optimizer.state_dict()}, {})
    tensors, state = load_checkpoint(tmp_path / "ckpt")
    fresh = _distiller(run=_fp16_run(), clip_grad=1.0)
    fresh.load_state_dict(tensors, state)
    fresh.optimizer.load_state_dict(state["optimizer"])
    return fresh


def test_fp16_scaler_and_ema_resume_equal_an_uninterrupted_run(tmp_path):
    batches = _poisoned(_batches(5), at=1)
    full = _distiller(run=_fp16_run(), clip_grad=1.0)
    assert full.scaler is not None and full.ema is not None
    meter = EpochMeter(CPU, 2)
    outs = []
    for x, y in batches:
        before = _params(full)
        outs.append(full.train_step(x, y))
        meter.update(outs[-1], y)
        if len(outs) == 2:  # the NaN step: skipped by the scaler, parameters untouched, scale halved
            assert not outs[-1].finite.item()
            assert all(torch.equal(before[k], v) for k, v in _params(full).items())
    assert [o.finite.item() for o in outs] == [True, False, True, True, True]
    assert full.scaler.get_scale() < 2.0 ** 16  # lowered: the NaN step (and fp16 gradient overflows) skipped
    values = meter.read()
    assert values["skipped"] == 1 and values["loss"] == values["loss"]  # the skipped step is not in the mean

    cut = _distiller(run=_fp16_run(), clip_grad=1.0)
    for x, y in batches[:3]:
        cut.train_step(x, y)
    resumed = _roundtrip(cut, tmp_path)
    assert resumed.scaler.state_dict() == cut.scaler.state_dict() and resumed.ema_updates == 3
    assert resumed.scaler.get_scale() < 2.0 ** 16
    for x, y in batches[3:]:
        resumed.train_step(x, y)
    for key, value in _params(full).items():
        assert torch.equal(value, _params(resumed)[key]), key
    ema_full, ema_resumed = full.ema.module.state_dict(), resumed.ema.module.state_dict()
    for key, value in ema_full.items():
        assert torch.equal(value, ema_resumed[key]), key
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    student = full.student.state_dict()
    assert any(not torch.equal(v, student[k]) for k, v in ema_full.items())  # the EMA is not the student


def test_ema_follows_timm_decay():
    """As timm's train.py (``update(model, step=num_updates)``): the first update copies the
    student, later ones are EMA = d * EMA + (1 - d) * student (no warm-up)."""
    run = RunConfig(device="cpu", precision="fp32", ema=True, ema_decay=0.75)
    d = _distiller(run=run)
    (x, y), (x2, y2) = _batches(2)
    d.train_step(x, y)
    first = copy.deepcopy(d.student.state_dict())
    for key, value in d.ema.module.state_dict().items():
        assert torch.equal(value, first[key]), key
    d.train_step(x2, y2)
    second = d.student.state_dict()
    moved = 0.0
    for key, value in d.ema.module.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.75 * first[key] + 0.25 * second[key], atol=1e-6), key
            moved = max(moved, (second[key] - first[key]).abs().max().item())
    assert moved > 1e-3


def test_compiled_step_matches_eager():
    """run.compile (inductor on CPU: student + projectors, and the teacher, compiled separately)
    gives the eager losses to 1e-4 over three steps. One-block 16-px ViTs keep compiling ~30 s."""
    def vit(seed):
        torch.manual_seed(seed)
        return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=16,
                                 num_heads=1, mlp_ratio=1, num_classes=7)

    def teachers():
        return [Teacher("0:t", vit(20), InputAdapter(DATA, DATA.mean, DATA.std), TAP, DATA.input_size)]

    eager = _distiller(vit(3), teachers())
    compiled = _distiller(vit(3), teachers(), run=RunConfig(device="cpu", precision="fp32", compile=True))
    for x, y in _batches(3):
        a, b = eager.train_step(x, y), compiled.train_step(x, y)
        assert b.loss.item() == pytest.approx(a.loss.item(), abs=1e-4)
    assert compiled.trainable._compiled_call_impl is not None  # the compiled path ran
    assert "student.head.weight" in compiled.state_dict()[0]  # keys unchanged by compiling in place


def _recipe(run_dir, **run):
    from distill.recipe_load import recipe_from_dict

    return recipe_from_dict({
        "name": "tiny", "output_dir": str(run_dir),
        "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0, "train_subset": 256, "aug_repeats": 3},
        "student": "cifar_resnet8",
        "teachers": [{"model": "cifar_resnet14", "pretrained": False}, {"model": "cifar_resnet8", "pretrained": False}],
        "optim": {"lr": 0.05, "accum_steps": 2, "clip_grad": 5.0},
        "schedule": {"name": "multistep", "epochs": 2, "milestones": [1]},
        "run": {"progress": False, "precision": "fp16", "ema": True, "ema_decay": 0.9, **run},
    })


def test_trainer_resume_with_fp16_ema_accumulation_equals_uninterrupted(tmp_path, monkeypatch):
    """Through RecipeRunner and checkpoint files: student, EMA, projectors and scaler resume exactly."""
    import json

    from safetensors.torch import load_file

    from distill.engine import Trainer
    from distill.pipeline import RecipeRunner

    full = RecipeRunner(_recipe(tmp_path / "full")).run()
    original = Trainer._save

    def crash_after_first_epoch(self, name, epoch):
        original(self, name, epoch)
        if name == "last" and epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        RecipeRunner(_recipe(tmp_path / "cut")).run()
    monkeypatch.setattr(Trainer, "_save", original)
    RecipeRunner(_recipe(tmp_path / "cut"), resume=True).run()
    a = load_file(str(tmp_path / "full" / "last.safetensors"))
    b = load_file(str(tmp_path / "cut" / "last.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = json.loads((tmp_path / "full" / "last.json").read_text())
    assert state["scaler"]["scale"] > 0 and state["ema_updates"] == 2 * (256 // 32)
    header = (tmp_path / "full" / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"val_top1", "val_ema_top1", "train_skipped"} <= set(header)
    assert full.student["epochs"] == 2

    from distill import cli  # distill-push --checkpoint ema exports the EMA student

    out = tmp_path / "export"
    assert cli.push_main([str(tmp_path / "full"), "--local-dir", str(out), "--checkpoint", "ema"]) == 0
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == {k[len("ema."):] for k in a if k.startswith("ema.")}
    for key, value in exported.items():
        assert torch.equal(value, a["ema." + key]), key
    assert any(not torch.equal(v, a["student." + k]) for k, v in exported.items())


def test_tensorboard_log(tmp_path):
    """run.log=tensorboard writes the summary's scalars, or fails in one line when tensorboard is missing."""
    from distill.errors import DistillError
    from distill.logger import open_logger

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(DistillError, match="tensorboard package is not installed"):
            open_logger("tensorboard", tmp_path)
        return
    logger = open_logger("tensorboard", tmp_path)
    logger.log({"epoch": 1, "train_loss": 1.5, "w_logit_mean/0:t": 0.25}, 1)
    logger.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train_loss", "w_logit_mean/0:t"}
    assert events.Scalars("train_loss")[0].value == 1.5
    assert open_logger("csv", tmp_path) is None
