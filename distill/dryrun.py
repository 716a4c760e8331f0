"""``distill-train RECIPE --dry-run [--offline]``: check a recipe end to end without its data.

Resolves every model (with ``offline``: the Hugging Face Hub is put in offline mode and a
model whose weights are not in the local cache is built at random init with its pretrained
config kept, so its data config — input size, mean, std — is still right), builds the whole
Distiller, and runs one forward / backward / optimiser step (plus the policy's
observe / end-of-epoch update) on a synthetic batch of the recipe's input size and
per-process batch size, with the recipe's mixup / label smoothing applied (soft targets).

Memory per step is *measured*:

- on CUDA: ``torch.cuda.max_memory_allocated`` over the step (everything resident);
- on CPU: the bytes of teacher and trainable parameters, gradients, optimiser state (read
  from the optimiser after the step), the input batch, and the activations the student's
  autograd graph saved for backward (``torch.autograd.graph.saved_tensors_hooks``,
  counting each storage once and leaving out parameters). Teachers run under
  ``inference_mode`` and save nothing; their transient activations are not counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch

from . import distributed
from .data import DATASETS, build_mixup
from .distiller import Distiller
from .engine import build_optimizer, build_scheduler, mix_batch, resolve_device, seed_everything
from .classes import fit_class_count
from .errors import DistillError
from .fetch import offline as hub_offline
from .fetch import weights_reachable_offline
from .pipeline import make_teacher
from .policies import build_policy
from .recipe import Recipe, teacher_configs
from .registry import DataSpec, ResolvedModel, _data_spec, count_params, resolve_model
from .taps import parse_feature_tap
from .teachers import TeacherPool
from .weightfile import label

# training-split sizes used for the step count
TRAIN_SIZES = {"digits": 1438, "cifar10": 50_000, "cifar100": 50_000, "imagefolder": 1_281_167}
DIGITS_MEAN_STD = ((0.3059,), (0.3765,))  # what the digits bundle computes at 8x8 (documented in data.py)


@dataclass
class DryRunReport:
    """What a dry run built and measured."""

    lines: List[Tuple[str, str]] = field(default_factory=list)
    teachers: List[Dict[str, Any]] = field(default_factory=list)
    memory_bytes: int = 0
    memory_what: str = ""
    seconds: float = 0.0

    def add(self, key: str, value: Any) -> None:
        self.lines.append((key, str(value)))

    def table(self) -> str:
        """Return the report as aligned text."""
        width = max(len(k) for k, _ in self.lines) + 2
        return "\n".join(f"{k:<{width}}{v}" for k, v in self.lines)


def data_spec(recipe: Recipe) -> Tuple[DataSpec, int]:
    """Return the recipe's data spec and class count without reading the dataset."""
    cfg = recipe.data
    info = DATASETS[cfg.dataset]
    size = cfg.input_size or info.input_size
    if cfg.mean is not None:
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    elif info.mean is not None:
        mean, std = info.mean, info.std
    else:
        mean, std = DIGITS_MEAN_STD
    num_classes = info.num_classes or cfg.num_classes or 1000
    return DataSpec((info.channels, size, size), tuple(mean), tuple(std)), num_classes


def _resolve(cfg, where: str, num_classes: int, in_chans: int, offline: bool, data: DataSpec,
             trained_here: bool, dataset: str) -> Tuple[ResolvedModel, str]:
    """Return a model as the real run would have it, and a note on where its weights came from."""
    import timm

    note = f"weights file {label(cfg.model, cfg.weights)}" if cfg.weights else \
        "pretrained" if cfg.pretrained else "random init"
    try:
        if offline and cfg.pretrained and not cfg.weights and weights_reachable_offline(cfg.model) is False:
            raise DistillError(f"{where}: {cfg.model}: weights not in the local cache")
        resolved = resolve_model(cfg.model, pretrained=cfg.pretrained, weights=cfg.weights,
                                 num_classes=num_classes, in_chans=in_chans, model_args=cfg.model_args, where=where,
                                 new_keys=cfg.new_keys)
    except Exception as exc:  # weights unreachable (offline): random init, pretrained cfg kept
        if not offline or not cfg.pretrained or cfg.weights:  # a weights file is local: its errors stand
            raise
        model = timm.create_model(cfg.model, pretrained=False, **cfg.model_args)
        resolved = ResolvedModel(model, cfg.model.split(".")[0], _data_spec(model),
                                 {"spec": cfg.model, "offline": f"random init ({type(exc).__name__})"},
                                 dict(cfg.model_args))
        note = "random init (offline; pretrained config kept)"
    if trained_here:  # trained on the recipe's data first: it sees the data as is
        resolved.data = data
        note = f"trained here ({cfg.train.epochs} epochs) from {note}"
    fit_class_count(resolved.model, num_classes, where.rsplit(".", 1)[0], dataset,
                    trained_here=trained_here or where == "student.model", weights_file=cfg.weights)
    if cfg.weights and not trained_here and where != "student.model":  # a frozen teacher: whose mean/std
        mean_from = "the recipe" if getattr(cfg, "mean", None) is not None else \
            f"the file's config ({resolved.source.get('data_config', 'its distill metadata')})" \
            if resolved.data is not None else \
            "the dataset (the file carries none)"
        note += f", mean/std from {mean_from}"
    return resolved, note


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def dry_run(recipe: Recipe, offline: bool = False) -> DryRunReport:
    """Build everything ``recipe`` needs and run one training step on a synthetic batch."""
    started = time.perf_counter()
    report = DryRunReport()
    data, num_classes = data_spec(recipe)
    device = resolve_device(recipe.run.device)
    tap = parse_feature_tap(recipe.distill.features)
    batch = distributed.local_batch_size(recipe.data.batch_size)  # the recipe's batch is global
    seed_everything(recipe.seed)
    report.add("recipe", recipe.name)
    report.add("data", f"{recipe.data.dataset}: {num_classes} classes, input {tuple(data.input_size)}, "
                       f"mean {tuple(round(m, 4) for m in data.mean)}, std {tuple(round(s, 4) for s in data.std)}")

    with hub_offline(offline):
        teachers = []
        for i, cfg in enumerate(teacher_configs(recipe)):
            where = f"teachers[{i}].model"
            resolved, note = _resolve(cfg, where, num_classes, data.input_size[0], offline, data,
                                      cfg.train is not None, recipe.data.dataset)
            teacher = make_teacher(f"{i}:{label(cfg.model, cfg.weights)}", cfg, resolved, data, tap)
            teachers.append(teacher)
            report.teachers.append({"name": teacher.name, "params": count_params(resolved.model), "note": note,
                                    "size": teacher.adapter.size or tuple(data.input_size[1:]),
                                    "renormalise": teacher.adapter.renormalise})
        student, s_note = _resolve(recipe.student, "student.model", num_classes, data.input_size[0], offline,
                                   data, False, recipe.data.dataset)
    pool = TeacherPool(teachers).to(device)
    policy = build_policy(recipe.distill.policy, len(pool), recipe.distill.policy_args) if len(pool) else None
    student.model.to(device)
    distiller = Distiller(student.model, pool, policy, tap, data.input_size, recipe.distill.alpha,
                          recipe.distill.beta, recipe.distill.temperature, recipe.distill.logit_loss)
    distiller.to(device)
    optimizer = build_optimizer(distiller.trainable, recipe.optim)
    size = TRAIN_SIZES[recipe.data.dataset]
    if recipe.data.train_subset:
        size = min(size, recipe.data.train_subset)
    steps = max(1, size // recipe.data.batch_size)
    scheduler = build_scheduler(optimizer, recipe.schedule, steps)

    # one step on a synthetic batch
    x = torch.randn(batch, *data.input_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    mixup = build_mixup(recipe.data, num_classes)
    if mixup is not None:
        x, y = mix_batch(mixup, x, y)
    distiller.trainable.train()
    if policy is not None:
        policy.begin_epoch(0)
    params = {p.untyped_storage().data_ptr() for p in distiller.trainable.parameters()}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = distiller(x, y)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    if not torch.isfinite(out.loss.detach()).item():
        raise DistillError(f"{recipe.name}: the dry-run step gave a non-finite loss")
    if policy is not None and out.signals is not None:
        policy.observe(out.signals, out.weights, out.teachers, out.student, y)
        policy.end_epoch(0)
    trainable_bytes = _tensor_bytes(distiller.trainable.parameters())
    grad_bytes = _tensor_bytes(p.grad for p in distiller.trainable.parameters() if p.grad is not None)
    state_bytes = _tensor_bytes(v for st in optimizer.state.values() for v in st.values()
                                if isinstance(v, torch.Tensor))
    teacher_bytes = _tensor_bytes(pool.parameters())
    activation_bytes = sum(saved.values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        report.memory_bytes = torch.cuda.max_memory_allocated(device)
        report.memory_what = f"torch.cuda.max_memory_allocated over the step (before it: {_mib(base)})"
    else:
        report.memory_bytes = (teacher_bytes + trainable_bytes + grad_bytes + state_bytes + activation_bytes
                               + x.numel() * x.element_size())
        report.memory_what = (f"CPU sum: teacher params {_mib(teacher_bytes)} + trainable params "
                              f"{_mib(trainable_bytes)} + grads {_mib(grad_bytes)} + optimiser state "
                              f"{_mib(state_bytes)} + activations saved for backward {_mib(activation_bytes)} "
                              f"+ input batch")

    feats = [tuple(f.shape[1:]) for f in out.teachers.features] if out.teachers is not None else []
    for t, f in zip(report.teachers, feats):
        t["feature"] = f
        report.add(f"teacher {t['name']}", f"{t['params'] / 1e6:.1f}M params, input {t['size']}"
                   f"{' re-normalised' if t['renormalise'] else ''}, feature {f}, {t['note']}")
    s_feat = tuple(out.student.feature.shape[1:])
    report.add(f"student {recipe.student.model}", f"{count_params(student.model) / 1e6:.1f}M params, input "
               f"{tuple(data.input_size)}, feature {s_feat} ({recipe.distill.features}), {s_note}")
    for name, proj in zip(pool.names, distiller.trainable.projectors):
        report.add(f"projector -> {name}", f"{type(proj).__name__}, {count_params(proj) / 1e3:.1f}k params")
    report.add("policy", f"{recipe.distill.policy} {recipe.distill.policy_args or ''}".strip()
               + f" (alpha {recipe.distill.alpha}, beta {recipe.distill.beta}, T {recipe.distill.temperature})")
    o = recipe.optim
    report.add("optimiser", f"{type(optimizer).__name__} lr {o.lr} (global batch {recipe.data.batch_size}), "
                            f"weight decay {o.weight_decay}"
               + (f", momentum {o.momentum}, nesterov {o.nesterov}" if o.name == "sgd" else ""))
    s = recipe.schedule
    report.add("schedule", f"{type(scheduler).__name__}: {s.name}, {s.epochs} epochs"
               + (f", x{s.decay_rate} at {s.milestones}" if s.name == "multistep" else "")
               + (f", warm-up {s.warmup_epochs} epochs from {s.warmup_lr}" if s.warmup_epochs else "")
               + (f", min lr {s.min_lr}" if s.name == "cosine" else ""))
    report.add("targets", "soft (B, C): mixup / cutmix / label smoothing" if mixup is not None else "class indices")
    report.add("steps", f"{steps:,} per epoch ({size:,} training images / global batch "
                        f"{recipe.data.batch_size}), {steps * s.epochs:,} in all; per-process batch {batch}")
    report.add("step loss", f"{out.loss.item():.4f} (ce {out.parts['ce'].item():.4f})")
    report.add("memory per step", f"{_mib(report.memory_bytes)} at batch {batch} [{report.memory_what}]")
    report.seconds = time.perf_counter() - started
    report.add("dry run took", f"{report.seconds:.1f} s on {device}")
    return report
