"""``distill-train RECIPE --dry-run [--offline]``: check a recipe end to end without its data.

Resolves every model (with ``offline``: the Hugging Face Hub is put in offline mode and a
model whose weights are not in the local cache is built at random init with its pretrained
config kept, so its data config — input size, mean, std — is still right), builds the
training step with the trainer's builder (:func:`distill.build.build_train_step`; ``run.compile``
is reported but not applied: compiling takes minutes and checks nothing about the wiring),
and runs the :class:`~distill.step.TrainStep` — the trainer's step, with the
recipe's precision, accumulation, clipping, EMA and channels-last — plus the policy's
end-of-epoch update on *tiny* synthetic batches of the recipe's input size, with the
recipe's mixup / label smoothing applied (soft targets). Progress goes to stderr as it builds.

Memory per step of the real batch is *estimated* from two tiny micro-batches (2 and 4):

- activations: on CPU, the bytes the step's autograd graph saved for backward
  (``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters left out;
  teachers run under ``inference_mode`` and save nothing); on CUDA, the step's
  ``torch.cuda.max_memory_allocated`` above what was resident before it. Either is fitted
  as ``a + k * B`` through the two sizes and read at the real micro-batch
  (per-process batch / ``optim.accum_steps``);
- plus what does not grow with the batch: teacher and trainable parameters, gradients,
  optimiser state (read after the step), the EMA copy, and the real input batch.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch

from . import distributed
from .build import build_train_step
from .data import build_mixup, dataset_info
from .classes import fit_class_count
from .engine import mix_batch
from .errors import DistillError
from .fetch import offline as hub_offline
from .fetch import weights_reachable_offline
from .optim import build_scheduler
from .pipeline import make_teacher
from .recipe import Recipe
from .recipe_load import teacher_configs
from .resolve import DataSpec, ResolvedModel, count_params, model_data_spec, resolve_model
from .runtime import resolve_device, seed_everything
from .step import TrainStep, saved_activation_bytes
from .taps import parse_feature_tap
from .weightfile import label


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
    info = dataset_info(cfg.dataset)
    size = cfg.input_size or info.input_size
    mean, std = (tuple(cfg.mean), tuple(cfg.std)) if cfg.mean is not None else (info.mean, info.std)
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
        resolved = ResolvedModel(model, cfg.model.split(".")[0], model_data_spec(model),
                                 {"spec": cfg.model, "offline": f"random init ({type(exc).__name__})"},
                                 dict(cfg.model_args))
        note = "random init (offline; pretrained config kept)"
    if trained_here:  # trained on the recipe's data first: it sees the data as is
        resolved.data = data
        note = f"trained here ({cfg.train.epochs} epochs) from {note}"
    if getattr(cfg, "classes", None) is None:  # a teacher's class map checks its own columns
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


_STARTED = [time.perf_counter()]


def _stderr(message: str) -> None:
    print(f"dry run [{time.perf_counter() - _STARTED[0]:5.1f} s]: {message}", file=sys.stderr, flush=True)


TINY_BATCHES = (2, 4)  # the micro-batch sizes the step is measured at


def _synthetic_batch(batch: int, data: DataSpec, num_classes: int, mixup, device: torch.device,
                     gen: torch.Generator):
    x = torch.randn(batch, *data.input_size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    return mix_batch(mixup, x, y) if mixup is not None else (x, y)


def _measure_step(step: TrainStep, x: torch.Tensor, y: torch.Tensor) -> Tuple[Any, int]:
    """Run one training step; return its output and the activation bytes it held (see module doc)."""
    device = x.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    out, saved = saved_activation_bytes(lambda: step(x, y), step.trainable.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    return out, saved


def dry_run(recipe: Recipe, offline: bool = False, say: Callable[[str], None] = _stderr) -> DryRunReport:
    """Build everything ``recipe`` needs and run its training step on tiny synthetic batches;
    return the report (the real batch's memory per step is extrapolated, see the module doc)."""
    started = _STARTED[0] = time.perf_counter()
    report = DryRunReport()
    data, num_classes = data_spec(recipe)
    device = resolve_device(recipe.run.device)
    tap = parse_feature_tap(recipe.distill.features)
    batch = distributed.local_batch_size(recipe.data.batch_size)  # the recipe's batch is global
    o, r = recipe.optim, recipe.run
    micro = max(1, batch // o.accum_steps)
    seed_everything(recipe.seed)
    report.add("recipe", recipe.name)
    report.add("data", f"{recipe.data.dataset}: {num_classes} classes, input {tuple(data.input_size)}, "
                       f"mean {tuple(round(m, 4) for m in data.mean)}, std {tuple(round(s, 4) for s in data.std)}")

    with hub_offline(offline):
        teachers = []
        configs = teacher_configs(recipe)
        for i, cfg in enumerate(configs):
            say(f"building teacher {i + 1}/{len(configs)}: {cfg.model}")
            where = f"teachers[{i}].model"
            resolved, note = _resolve(cfg, where, num_classes, data.input_size[0], offline, data,
                                      cfg.train is not None, recipe.data.dataset)
            if isinstance(cfg.classes, list) and all(isinstance(v, int) for v in cfg.classes) or cfg.classes is None:
                built = cfg
            else:  # label names need the data's class names: the first C columns stand in for the shapes
                built = dataclasses.replace(cfg, classes=list(range(num_classes)))
                note += "; classes: label names matched to the data's classes at run time (not checked here)"
            teacher = make_teacher(f"{i}:{label(cfg.model, cfg.weights)}", built, resolved, data, tap,
                                   num_classes=num_classes, where=f"teachers[{i}]")
            teachers.append(teacher)
            report.teachers.append({"name": teacher.name, "params": count_params(resolved.model), "note": note,
                                    "size": teacher.adapter.size or tuple(data.input_size[1:]),
                                    "renormalise": teacher.adapter.renormalise})
        say(f"building student: {recipe.student.model}")
        student, s_note = _resolve(recipe.student, "student.model", num_classes, data.input_size[0], offline,
                                   data, False, recipe.data.dataset)
    say("assembling the Distiller (projectors sized on a dummy batch, policy, optimiser)")
    eager = dataclasses.replace(r, compile=False)  # compiling takes minutes and checks nothing about the wiring
    step = build_train_step(student.model, teachers, tap, tuple(data.input_size), recipe.distill, o, eager,
                            device, wrap_ddp=False)
    distiller = step.task
    pool, policy, optimizer = distiller.pool, distiller.policy, step.optimizer
    size = dataset_info(recipe.data.dataset).train_size
    if recipe.data.train_subset:
        size = min(size, recipe.data.train_subset)
    steps = max(1, size // recipe.data.batch_size)
    scheduler = build_scheduler(optimizer, recipe.schedule, steps)

    # the trainer's step on tiny batches: one micro-batch each (activation memory grows with it) ...
    mixup = build_mixup(recipe.data, num_classes)
    gen = torch.Generator().manual_seed(recipe.seed)
    distiller.trainable.train()
    if policy is not None:
        policy.begin_epoch(0)
    accum = step.settings.accum_steps
    step.settings.accum_steps = 1
    tiny = [b for b in TINY_BATCHES if b < micro] + [micro] if micro <= TINY_BATCHES[-1] else list(TINY_BATCHES)
    measured: Dict[int, int] = {}
    out = None
    for b in tiny:
        say(f"train_step on a synthetic micro-batch of {b}")
        x, y = _synthetic_batch(b, data, num_classes, mixup, device, gen)
        out, measured[b] = _measure_step(step, x, y)
        if not torch.isfinite(out.loss).item():
            raise DistillError(f"{recipe.name}: the dry-run step gave a non-finite loss")
    step.settings.accum_steps = accum
    # ... and once with the recipe's accumulation, on accum_steps tiny micro-batches
    if accum > 1:
        say(f"train_step with accumulation: {accum} micro-batches of {tiny[0]}")
        x, y = _synthetic_batch(tiny[0] * accum, data, num_classes, mixup, device, gen)
        acc_out = step(x, y)
        if not torch.isfinite(acc_out.loss).item():
            raise DistillError(f"{recipe.name}: the dry-run accumulated step gave a non-finite loss")
    if policy is not None:
        policy.end_epoch(0)
    say("done; estimating the real batch's memory")

    sizes = sorted(measured)
    if len(sizes) >= 2:
        b0, b1 = sizes[-2], sizes[-1]
        slope = (measured[b1] - measured[b0]) / (b1 - b0)
        activations = max(0.0, measured[b1] + slope * (micro - b1))
        fit = f"fitted a + k*B through micro-batches {b0} and {b1} ({_mib(measured[b0])}, {_mib(measured[b1])})"
    else:
        activations = float(measured[sizes[0]])
        fit = f"measured at micro-batch {sizes[0]} (the real one)"
    trainable_bytes = _tensor_bytes(distiller.trainable.parameters())
    grad_bytes = _tensor_bytes(p.grad for p in distiller.trainable.parameters() if p.grad is not None)
    state_bytes = _tensor_bytes(v for st in optimizer.state.values() for v in st.values()
                                if isinstance(v, torch.Tensor))
    ema_bytes = _tensor_bytes(distiller.ema.module.parameters()) if distiller.ema is not None else 0
    teacher_bytes = _tensor_bytes(pool.parameters())
    input_bytes = batch * int(torch.tensor(data.input_size).prod()) * 4
    what = "peak allocated above the resident" if device.type == "cuda" else "saved for backward"
    report.memory_bytes = int(teacher_bytes + trainable_bytes + grad_bytes + state_bytes + ema_bytes + input_bytes
                              + activations)
    report.memory_what = (f"estimated: activations ({what}) {_mib(activations)} at micro-batch {micro}, {fit}; "
                          f"+ teacher params {_mib(teacher_bytes)} + trainable params {_mib(trainable_bytes)} + "
                          f"grads {_mib(grad_bytes)} + optimiser state {_mib(state_bytes)}"
                          + (f" + EMA {_mib(ema_bytes)}" if ema_bytes else "") + f" + input batch {_mib(input_bytes)}")

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
    resolved = policy.extra_repr() if policy is not None else ""
    report.add("policy", f"{recipe.distill.policy} {recipe.distill.policy_args or ''}".strip()
               + f" (alpha {recipe.distill.alpha}, beta {recipe.distill.beta}, T {recipe.distill.temperature}"
               + (f"; {resolved})" if resolved else ")"))
    report.add("optimiser", f"{type(optimizer).__name__} lr {o.lr} (global batch {recipe.data.batch_size}), "
                            f"weight decay {o.weight_decay}"
               + (f", momentum {o.momentum}, nesterov {o.nesterov}" if o.name == "sgd" else ""))
    s = recipe.schedule
    report.add("schedule", f"{type(scheduler).__name__}: {s.name}, {s.epochs} epochs"
               + (f", x{s.decay_rate} at {s.decay_epochs()}" if s.name == "multistep" else "")
               + (f", warm-up {s.warmup_epochs} epochs from {s.warmup_lr}" if s.warmup_epochs else "")
               + (f", min lr {s.min_lr}" if s.name == "cosine" else ""))
    st = step.settings
    report.add("precision", f"{st.precision} (run.precision {r.precision})"
               + (", fp16 GradScaler (state in checkpoints)" if step.scaler is not None else ""))
    report.add("compile", "torch.compile of the student and of each teacher (not applied in the dry run)"
               if r.compile else "off (eager)")
    report.add("channels_last", "on: student, teachers and batches" if r.channels_last else "off")
    report.add("EMA", f"ModelEmaV3 of the student, decay {r.ema_decay}{', warm-up' if r.ema_warmup else ''}; "
                      "evaluated each epoch beside it" if r.ema else "off")
    report.add("accumulation", f"{accum} micro-batches of {micro} per optimiser step" if accum > 1
               else f"off (one micro-batch of {micro})")
    report.add("clipping", f"{o.clip_mode} {o.clip_grad} (timm dispatch_clip_grad, after unscaling)"
               if o.clip_grad is not None else "off")
    report.add("repeats", f"{recipe.data.aug_repeats} augmented repeats per image (RepeatAugSampler)"
               if recipe.data.aug_repeats > 1 else "off")
    report.add("targets", "soft (B, C): mixup / cutmix / label smoothing" if mixup is not None else "class indices")
    report.add("steps", f"{steps:,} per epoch ({size:,} training images / global batch "
                        f"{recipe.data.batch_size}), {steps * s.epochs:,} in all; per-process batch {batch}")
    report.add("step loss", f"{out.loss.item():.4f} (ce {out.parts['ce'].item():.4f}) at micro-batch {tiny[-1]}")
    report.add("memory per step", f"{_mib(report.memory_bytes)} at batch {batch} [{report.memory_what}]")
    report.seconds = time.perf_counter() - started
    report.add("dry run took", f"{report.seconds:.1f} s on {device}")
    return report
