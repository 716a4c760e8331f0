"""From a recipe to trained models: teacher preparation (load, or train / fine-tune and
cache), distillation, the optional student-alone baseline, and the final report."""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .data import DataBundle, build_data, build_loader, build_mixup, eval_sampler, train_sampler
from . import distributed
from .classes import fit_class_count
from .build import build_train_step
from .classmap import resolve_class_map
from .engine import Trainer, TrainResult, evaluate
from .errors import DistillError
from .fileio import ensure_dir, read_json, write_text
from .manifest import content_hash, record_differences, record_hash
from .optim import build_scheduler
from .recipe import Recipe, TeacherConfig, to_dict
from .recipe_load import teacher_configs
from .resolve import DataSpec, ResolvedModel, load_student_checkpoint, resolve_model
from .runtime import autocast_dtype, resolve_device, seed_everything
from .taps import FeatureTap, parse_feature_tap
from .teachers import InputAdapter, Teacher
from .weightfile import label


@dataclass
class RunReport:
    """Test accuracies of everything a recipe trained or used, for printing and results.json."""

    dataset: str
    num_val: int
    teachers: List[Dict[str, Any]] = field(default_factory=list)
    student: Dict[str, Any] = field(default_factory=dict)
    baseline: Optional[Dict[str, Any]] = None
    class_names: List[str] = field(default_factory=list)  # label of each class index (config.json on push)

    def table(self) -> str:
        """Return the report as an aligned text table."""
        rows = [(f"teacher {t['name']}", t["top1"], t["top5"]) for t in self.teachers]
        label = f"student {self.student['name']}" + (" (distilled)" if self.teachers else "")
        rows.append((label, self.student["final_top1"], self.student["final_top5"]))
        if self.baseline is not None:
            rows.append((f"student {self.baseline['name']} (alone)", self.baseline["final_top1"],
                         self.baseline["final_top5"]))
        width = max(len(r[0]) for r in rows) + 2
        lines = [f"test accuracy on {self.dataset} ({self.num_val} images)",
                 f"{'model':<{width}}{'top1':>8}{'top5':>8}"]
        lines += [f"{name:<{width}}{top1:>8.2f}{top5:>8.2f}" for name, top1, top5 in rows]
        return "\n".join(lines)


def _say(message: str) -> None:
    """Print a run message to stderr (rank 0 only under torchrun)."""
    if distributed.is_main():
        print(message, file=sys.stderr, flush=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _loaders(recipe: Recipe, bundle: DataBundle):
    data = recipe.data  # batch sizes are global: each of N processes loads batch / N
    batch = distributed.local_batch_size(data.batch_size)
    eval_batch = distributed.local_batch_size(data.eval_batch_size or 2 * data.batch_size)
    # under torchrun: batch-aligned training shards and sharded evaluation (distill.data.sampling)
    train = build_loader(bundle.train, batch, True, data.num_workers, recipe.seed,
                         sampler=train_sampler(len(bundle.train), data.batch_size, recipe.seed, data.aug_repeats))
    val = build_loader(bundle.val, eval_batch, False, data.num_workers, recipe.seed,
                       sampler=eval_sampler(len(bundle.val)))
    return train, val


def teacher_input_size(cfg: TeacherConfig, resolved_data: Optional[DataSpec], data: DataSpec) -> Optional[int]:
    """Return the square size teacher ``cfg`` sees the batch at (None: the data's own size).

    ``cfg.input_size`` wins. Otherwise a teacher whose weights carry a data config (timm
    pretrained, Hub, weights file) is resized to that config's size when it differs from
    the data's (a 384-px teacher beside 224-px ones); teachers trained here on the recipe's
    data, or built at random, see the data as is.
    """
    if cfg.input_size is not None:
        return cfg.input_size
    if resolved_data is not None and tuple(resolved_data.input_size[1:]) != tuple(data.input_size[1:]):
        return int(resolved_data.input_size[-1])
    return None


def make_teacher(name: str, cfg: TeacherConfig, resolved: ResolvedModel, data: DataSpec, tap: FeatureTap,
                 class_names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                 where: str = "teachers") -> Teacher:
    """Return the frozen :class:`Teacher` of a resolved model with its input adapter and class map.

    Normalisation: ``cfg.mean/std``, else the weights' data config, else the data's.
    Resolution: :func:`teacher_input_size`. Class map: ``cfg.classes`` resolved against the
    data's ``class_names`` (:func:`distill.classmap.resolve_class_map`; ``num_classes``
    defaults to their count).
    """
    spec = resolved.data or data
    mean, std = (cfg.mean, cfg.std) if cfg.mean is not None else (spec.mean, spec.std)
    size = teacher_input_size(cfg, resolved.data, data)
    adapter = InputAdapter(data, mean, std, size)
    input_shape = (data.input_size[0], *((size, size) if size else data.input_size[1:]))
    count = num_classes if num_classes is not None else len(class_names or ())
    index = resolve_class_map(cfg.classes, resolved.model, class_names, count, f"{where}.classes")
    return Teacher(name, resolved.model, adapter, tap, input_shape, index)


TEACHER_METRICS = "teacher_metrics.json"  # in the run directory: {teacher key: metrics}


def _metrics_entry(entry: Any) -> bool:
    """Return whether ``entry`` is a stored metrics record (finite top1, top5 and loss); anything
    else (a file from another version, a hand edit) is measured again, not trusted."""
    return isinstance(entry, dict) and set(entry) == {"top1", "top5", "loss"} and \
        all(isinstance(v, (int, float)) and math.isfinite(v) for v in entry.values())


def _data_spec(bundle: DataBundle) -> DataSpec:
    return DataSpec(tuple(bundle.input_size), tuple(bundle.mean), tuple(bundle.std))


class RecipeRunner:
    """Runs one recipe in its run directory; every phase resumes or is reused when done."""

    def __init__(self, recipe: Recipe, resume: bool = False):
        self.recipe = recipe
        self.resume = resume
        self.run_dir = recipe.run_dir
        self.bundle = build_data(recipe.data)
        self.data_spec = _data_spec(self.bundle)
        self.train_loader, self.val_loader = _loaders(recipe, self.bundle)
        self.device = resolve_device(recipe.run.device)
        self.tap = parse_feature_tap(recipe.distill.features)

    # -- teachers ---------------------------------------------------------------

    def _resolve(self, cfg, where: str, fit_head: bool) -> ResolvedModel:
        """Return the resolved model of ``cfg``; with ``fit_head`` a pretrained head of another
        class count is reset to the dataset's (the model is about to be trained)."""
        resolved = resolve_model(cfg.model, pretrained=cfg.pretrained, weights=cfg.weights,
                                 num_classes=self.bundle.num_classes, in_chans=self.bundle.input_size[0],
                                 model_args=cfg.model_args, where=where, new_keys=cfg.new_keys)
        if getattr(cfg, "classes", None) is None:  # a class map checks its own columns (make_teacher)
            fit_class_count(resolved.model, self.bundle.num_classes, where.rsplit(".", 1)[0],
                            self.recipe.data.dataset, trained_here=fit_head, weights_file=cfg.weights)
        return resolved

    def _train_alone(self, resolved: ResolvedModel, run_dir: Path, optim, schedule, seed: int, label: str,
                     identity: Dict[str, Any], resume: bool, batch_transform=None) -> TrainResult:
        """Train ``resolved.model`` with cross-entropy alone (no teachers) in ``run_dir``."""
        step = build_train_step(resolved.model, [], FeatureTap("pre_logits"), self.bundle.input_size,
                                self.recipe.distill, optim, self.recipe.run, self.device)
        scheduler = build_scheduler(step.optimizer, schedule, len(self.train_loader))
        trainer = Trainer(step, scheduler, self.train_loader, self.val_loader, self.data_spec, resolved.arch,
                          resolved.model_args, schedule, self.recipe.run, run_dir, seed,
                          {"identity": identity}, label, batch_transform=batch_transform)
        return trainer.fit(resume=resume)

    def prepare_teacher(self, index: int, cfg: TeacherConfig) -> Teacher:
        """Return teacher ``index``: loaded as is, or trained / fine-tuned first (cached)."""
        where = f"teachers[{index}]"
        name = f"{index}:{label(cfg.model, cfg.weights)}"
        seed = self.recipe.seed + 1000 * (index + 1)
        if cfg.train is not None:
            tdir = self.teacher_dir(index, cfg)
            identity = {"model": cfg.model, "pretrained": cfg.pretrained, "weights": cfg.weights,
                        "train": asdict(cfg.train), "data": asdict(self.recipe.data)}
            if not self._finished(tdir, cfg.train.epochs):
                seed_everything(seed)
                self._train_alone(self._resolve(cfg, f"{where}.model", fit_head=True), tdir,
                                  cfg.train.optim_config(), cfg.train.schedule_config(), seed,
                                  f"teacher {name}", identity, resume=True)
            self._check_identity(tdir, identity)
            resolved = load_student_checkpoint(tdir / "last.safetensors")
            resolved.source = {"spec": cfg.model, "trained_in": str(tdir.relative_to(self.run_dir)),
                               "sha256": resolved.source["sha256"]}
        else:
            seed_everything(seed)  # a randomly initialised teacher is the same in every run of the recipe
            resolved = self._resolve(cfg, f"{where}.model", fit_head=False)
        teacher = make_teacher(name, cfg, resolved, self.data_spec, self.tap, self.bundle.class_names, where=where)
        teacher.source = dict(resolved.source, name=name)
        if teacher.class_map is not None:  # provenance: the outputs the student saw were mapped
            teacher.source["classes"] = teacher.class_map
        if "sha256" not in teacher.source:  # random init: hash the weights as built
            teacher.source["sha256"] = content_hash(resolved.model)
        return teacher

    def teacher_dir(self, index: int, cfg: TeacherConfig) -> Path:
        """Return the folder where teacher ``index`` is trained (``train:``) and cached."""
        return self.run_dir / "teachers" / f"{index}-{_safe(cfg.model)}"

    def teacher_ready(self, index: int, cfg: TeacherConfig) -> bool:
        """Return True when :meth:`prepare_teacher` builds teacher ``index`` without training it."""
        return cfg.train is None or self._finished(self.teacher_dir(index, cfg), cfg.train.epochs)

    @staticmethod
    def _finished(run_dir: Path, epochs: int) -> bool:
        path = run_dir / "last.json"
        return path.is_file() and read_json(path, "checkpoint state").get("epoch", -1) + 1 >= epochs

    @staticmethod
    def _check_identity(run_dir: Path, identity: Dict[str, Any]) -> None:
        stored = read_json(run_dir / "last.json", "checkpoint state").get("identity")
        lines = "; ".join(record_differences(stored, identity, "", "cached", "in this recipe"))
        if lines:
            raise DistillError(f"{run_dir}: cached teacher was trained with different settings ({lines}); "
                               "delete that folder or choose another output_dir")

    def evaluate_teacher(self, teacher: Teacher) -> Dict[str, float]:
        """Return the teacher's test metrics through its own input adapter."""
        teacher.to(self.device)
        return evaluate(teacher.logits, self.val_loader, self.device)

    def teacher_key(self, teacher: Teacher, cfg: TeacherConfig) -> str:
        """Return the key of ``teacher``'s test metrics: a hash of its weights' provenance (SHA-256,
        class map), its recipe entry (input adapter), the data section, the test-set size and the device."""
        identity = {"source": teacher.source, "teacher": asdict(cfg), "data": asdict(self.recipe.data),
                    "test_images": len(self.bundle.val), "device": str(self.device)}
        return record_hash(identity)

    def teacher_metrics(self, teachers: Sequence[Teacher], cfgs: Sequence[TeacherConfig]) -> List[Dict[str, float]]:
        """Return each teacher's test metrics (``{'top1', 'top5', 'loss'}``), measured once per run
        directory: a resumed run reads them from ``teacher_metrics.json`` where :meth:`teacher_key`
        matches and evaluates only the teachers that changed. Every rank reads the file before any
        (collective) evaluation and rank 0 writes it after the last, so the ranks agree under DDP."""
        path = self.run_dir / TEACHER_METRICS
        stored = read_json(path, "teacher metrics") if path.is_file() else {}
        if not isinstance(stored, dict):
            raise DistillError(f"{path}: not a teacher-metrics file (a JSON object of metrics); delete it to measure again")
        keys = [self.teacher_key(t, cfg) for t, cfg in zip(teachers, cfgs)]
        metrics = [stored[k] if _metrics_entry(stored.get(k)) else self.evaluate_teacher(t)
                   for k, t in zip(keys, teachers)]
        if distributed.is_main():
            write_text(path, json.dumps(dict(zip(keys, metrics)), indent=1))
        return metrics

    # -- the run ----------------------------------------------------------------

    def run(self) -> RunReport:
        """Run every phase of the recipe and return the :class:`RunReport` (also results.json)."""
        recipe = self.recipe
        ensure_dir(self.run_dir, "run directory")
        if distributed.is_main():  # under torchrun only rank 0 writes files
            write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
        report = RunReport(recipe.data.dataset, len(self.bundle.val), class_names=list(self.bundle.class_names))

        cfgs = teacher_configs(recipe)
        teachers = [self.prepare_teacher(i, cfg) for i, cfg in enumerate(cfgs)]
        for t, metrics in zip(teachers, self.teacher_metrics(teachers, cfgs)):
            report.teachers.append({"name": t.name, **metrics, "source": t.source})

        seed_everything(recipe.seed)
        student = self._resolve(recipe.student, "student.model", fit_head=True)
        step = build_train_step(student.model, teachers, self.tap, self.bundle.input_size, recipe.distill,
                                recipe.optim, recipe.run, self.device)
        pool, cache = step.task.pool, None
        if recipe.run.teacher_cache is not None and len(pool):  # stored views replayed, teachers' outputs with them
            from .cache.recipes import training_cache
            from .cache.source import cached_train_loader

            cache = training_cache(recipe, self.bundle, pool, self.device,
                                   autocast_dtype(recipe.run.precision, self.device))
            self.train_loader = cached_train_loader(recipe, self.bundle.train, cache)
        elif recipe.run.teacher_cache is not None:  # no teachers to cache: the same stored views, drawn live
            from .cache.source import view_train_loader

            self.train_loader = view_train_loader(recipe, self.bundle.train)
        if recipe.run.pool_check != "off" and len(pool):  # cheap: top-1 on a few training batches (live or cached)
            from .pool_check import pre_training_check

            pre_training_check(pool, self.bundle.train, distributed.local_batch_size(recipe.data.batch_size),
                               self.device, autocast_dtype(recipe.run.precision, self.device),
                               recipe.run.channels_last, self.bundle.num_classes, recipe.run.pool_check, _say,
                               cache=cache)
        identity = {"student": recipe.student.model, "teachers": [t.source for t in teachers],
                    "distill": asdict(recipe.distill)}  # the loss and the policy with its arguments
        scheduler = build_scheduler(step.optimizer, recipe.schedule, len(self.train_loader))
        trainer = Trainer(step, scheduler, self.train_loader, self.val_loader, self.data_spec, student.arch,
                          student.model_args, recipe.schedule, recipe.run, self.run_dir,
                          recipe.seed, {"identity": identity}, "distill",
                          batch_transform=build_mixup(recipe.data, self.bundle.num_classes))
        result = trainer.fit(resume=self.resume)
        student_name = label(recipe.student.model, recipe.student.weights)
        name = f"{student_name} + {len(pool)} teachers ({recipe.distill.policy})" if len(pool) \
            else f"{student_name} (no teachers: cross-entropy alone)"
        report.student = {"name": name, **asdict(result)}

        if recipe.run.baseline:
            seed_everything(recipe.seed)
            alone = self._resolve(recipe.student, "student.model", fit_head=True)
            result = self._train_alone(alone, self.run_dir / "baseline", recipe.optim, recipe.schedule,
                                       recipe.seed, "baseline", {"student": recipe.student.model}, self.resume,
                                       build_mixup(recipe.data, self.bundle.num_classes))
            report.baseline = {"name": student_name, **asdict(result)}
        if distributed.is_main():
            write_text(self.run_dir / "results.json", json.dumps(asdict(report), indent=1))
        else:  # plotting and pushing are rank 0's
            return report
        if recipe.run.plot:
            from .plot import plot_run

            print(f"weights plot: {plot_run(self.run_dir)}")
        if recipe.hub.push:
            from .hub import push_run

            hub = recipe.hub
            try:
                url = push_run(self.run_dir, hub.repo_id, private=hub.private, revision=hub.revision,
                               checkpoint=hub.checkpoint)
            except DistillError as exc:
                raise DistillError(f"{exc} (training finished; retry with: distill-push {self.run_dir} "
                                   f"--repo-id {hub.repo_id})") from None
            print(f"pushed to the Hub: {url}")
        return report
