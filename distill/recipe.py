"""Recipe schema: typed dataclasses, YAML loading, dotted CLI overrides, field-named errors.

A recipe binds a student, a teacher pool, data, optimisation and a weighting policy. This
module is the schema alone and imports no model code; loading and the checks that need the
datasets, registries and zoo live in :mod:`distill.recipe_load`::

    from distill.recipe_load import load_recipe
    recipe = load_recipe("recipes/quickstart.yaml", ["optim.lr=0.1", "schedule.epochs=3"])

Every error names the offending field (``teachers[1].train.lr``) and value; unknown
keys get close-match suggestions. ``docs/recipes.md`` documents every key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml

from .errors import RecipeError, close_matches

# ----------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    """Dataset, augmentation and loader settings."""

    dataset: str = "cifar10"
    root: Optional[str] = None  # default: $DISTILL_HOME/datasets/<dataset>
    download: bool = True  # torchvision download when the data is not found locally
    batch_size: int = 64  # global batch size
    eval_batch_size: Optional[int] = None  # default: 2 x batch_size
    num_workers: int = 2
    augment: str = "auto"
    train_subset: Optional[int] = None  # first N training images of a fixed class-balanced shuffle
    val_subset: Optional[int] = None
    fixed_views: Optional[int] = None  # K views per training image stored in run.teacher_cache (drawn live without teachers); epoch e shows view e mod K
    input_size: Optional[int] = None  # override of the dataset's native resolution
    mean: Optional[List[float]] = None  # override of the dataset's normalisation
    std: Optional[List[float]] = None
    num_classes: Optional[int] = None  # imagefolder: expected class count (dry runs without the data use it; default 1000)
    # timm training augmentation (augment: timm), passed to timm.data.create_transform
    auto_augment: Optional[str] = None  # e.g. rand-m9-mstd0.5-inc1 (DeiT's RandAugment)
    re_prob: float = 0.0  # random-erasing probability
    color_jitter: Optional[float] = None  # timm default 0.4 when None
    interpolation: str = "bilinear"  # bilinear | bicubic | random
    # batch-level mixing (timm.data.Mixup, applied in the training loop; targets become soft (B, C))
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    label_smoothing: float = 0.0  # applied to the (mixed) training targets
    aug_repeats: int = 0  # repeated augmentation (DeiT: 3): timm RepeatAugSampler semantics; 0: off


@dataclass
class OptimConfig:
    """Optimiser, built by ``timm.optim.create_optimizer_v2``."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    filter_bias_and_bn: bool = False  # True: no weight decay on norm and bias parameters
    accum_steps: int = 1  # gradient accumulation: each batch runs as N micro-batches, one optimiser step
    clip_grad: Optional[float] = None  # clip the trainable gradients (student + projectors); None: off
    clip_mode: Literal["norm", "value", "agc"] = "norm"  # timm dispatch_clip_grad mode (agc: head excluded)


@dataclass
class ScheduleConfig:
    """Epoch-based LR schedule, built by ``timm.scheduler.create_scheduler_v2``."""

    name: str = "multistep"
    epochs: int = 240
    milestones: Optional[List[int]] = None  # None: 5/8, 3/4 and 7/8 of epochs (150/180/210 at 240, the paper's)
    decay_rate: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0


    def decay_epochs(self) -> List[int]:
        """Return the multistep milestones: the recipe's, or by default the epochs at 5/8, 3/4 and 7/8 of
        the schedule (the paper's 150/180/210 of 240), so a default never lies past ``epochs``."""
        if self.milestones is not None:
            return list(self.milestones)
        return sorted({m for m in (round(self.epochs * f) for f in (5 / 8, 3 / 4, 7 / 8)) if 0 < m < self.epochs})


@dataclass
class TeacherTrainConfig:
    """Train or fine-tune a teacher on the recipe's dataset before distillation."""

    epochs: int = 10
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: List[int] = field(default_factory=list)
    warmup_epochs: int = 0

    def optim_config(self) -> OptimConfig:
        """Return the equivalent :class:`OptimConfig`."""
        return OptimConfig(self.optimizer, self.lr, self.momentum, self.nesterov, self.weight_decay)

    def schedule_config(self) -> ScheduleConfig:
        """Return the equivalent :class:`ScheduleConfig`."""
        return ScheduleConfig(self.schedule, self.epochs, list(self.milestones), 0.1, self.warmup_epochs)


@dataclass
class ModelConfig:
    """A model spec (see :func:`distill.resolve.resolve_model`) and how to build it."""

    model: str = ""
    pretrained: bool = False
    weights: Optional[str] = None  # local .safetensors / .pth file loaded into `model`
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra create_model kwargs
    new_keys: List[str] = field(default_factory=list)  # with weights: tensors left at init (fnmatch, e.g. fc.*)


@dataclass
class TeacherConfig(ModelConfig):
    """A frozen teacher: spec, optional pre-training, optional input adaptation overrides."""

    pretrained: bool = True
    train: Optional[TeacherTrainConfig] = None
    input_size: Optional[int] = None  # resize the batch to this square size for this teacher
    mean: Optional[List[float]] = None  # override the teacher's normalisation
    std: Optional[List[float]] = None
    classes: Any = None  # map the teacher's outputs into the data's classes: an index list (student class i reads output column classes[i]), a list of its label names in output order, names (label names from its config) or {names_file: PATH} (one label a line); see above


@dataclass
class DistillConfig:
    """The loss of Equ.(2): CE + alpha * sum_m w_l KD_m + beta * sum_m w_f FEAT_m."""

    alpha: float = 1.0
    beta: float = 5.0
    temperature: float = 4.0
    logit_loss: str = "kd"
    features: str = "pre_logits"
    policy: str = "aver"
    policy_args: Dict[str, Any] = field(default_factory=dict)


def is_device_name(name: str) -> bool:
    """Return True for a device the tools accept (``run.device``, ``--device``): auto, cpu, cuda, cuda:N."""
    return name in ("auto", "cpu", "cuda") or name.startswith("cuda:")


@dataclass
class RunConfig:
    """Runtime settings that do not change the math."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA when supported; fp16: GradScaler
    compile: bool = False  # torch.compile the trainable student and, separately, each frozen teacher
    channels_last: bool = False  # student, teachers and batches in channels-last memory format (CNNs)
    ema: bool = False  # keep an EMA of the student (timm ModelEmaV3), evaluated each epoch beside it
    ema_decay: float = 0.9998
    ema_warmup: bool = False  # timm's EMA decay warm-up (decay grows with the update count)
    log: Literal["csv", "tensorboard"] = "csv"  # summary.csv always; tensorboard: also <run_dir>/tensorboard
    deterministic: bool = False
    log_interval: int = 20  # steps between progress-bar metric reads (the only host syncs)
    baseline: bool = False  # also train the student alone on the same schedule, for comparison
    progress: bool = True
    plot: bool = False  # draw teacher weights and val top-1 per epoch to <run_dir>/weights.png at the end
    teacher_cache: Optional[str] = None  # auto | KEY: teachers' top-k outputs per stored view, built by distill-cache (distill.cache)
    teacher_top_k: Optional[int] = None  # teacher_cache: logits kept per teacher and view (default: all classes)
    teacher_cache_view_seed: Optional[int] = None  # teacher_cache: seed of the stored views (default: seed); runs differing only in seed then share one cache
    teacher_cache_sketch: Optional[int] = None  # teacher_cache with teacher_top_k < classes: rank of each teacher's logit sketch giving the dropped tail its shape (default: 32 when the tail has more than 32 classes, else 0); 0: the tail spread uniformly
    sync_bn: bool = False  # under torchrun (CUDA): SyncBatchNorm in the student (default: per-rank BN statistics)
    pool_check: Literal["off", "warn", "strict"] = "warn"  # before training: each teacher's top-1 on a few training batches; warn (strict: refuse) on a teacher below chance or with another class order


@dataclass
class HubConfig:
    """Push the distilled student to the Hugging Face Hub at the end of training (``distill-push``)."""

    push: bool = False
    repo_id: Optional[str] = None  # ORG/NAME; required when push is true
    private: bool = False  # create the repository private (an existing one keeps its visibility)
    revision: Optional[str] = None  # branch to commit to (created if missing); default main
    checkpoint: Literal["best", "last", "ema"] = "best"  # ema: the last checkpoint's EMA student (run.ema)


@dataclass
class Recipe:
    """A whole training job."""

    name: str = "run"
    seed: int = 0
    output_dir: Optional[str] = None  # default: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teachers: List[TeacherConfig] = field(default_factory=list)
    pool: Optional[str] = None  # a named zoo pool, appended to `teachers`
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    @property
    def run_dir(self) -> Path:
        """Return the output directory of this run."""
        return Path(self.output_dir or f"runs/{self.name}")


# ----------------------------------------------------------------------------- typed loading


def type_name(tp: Any) -> str:
    """Return a field type as the docs and errors write it (``'a' | 'b'``, ``list of int``, ...)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, List):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked and converted to type ``tp``; raise RecipeError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = close_matches(str(value), [str(c) for c in choices])
            raise RecipeError(where, f"{value!r} is not one of {', '.join(map(str, choices))}{hint}")
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(where, f"expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise RecipeError(where, f"expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if tp in (ModelConfig, TeacherConfig) and isinstance(value, str):
            value = {"model": value}  # a bare model spec
        if not isinstance(value, dict):
            raise RecipeError(where, f"expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(where, f"expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(where, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(where, f"expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(where, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {where}")  # a bug in the schema


def from_dict(cls: type, raw: Dict[str, Any], where: str = "") -> Any:
    """Return an instance of dataclass ``cls`` built from ``raw``, type-checking every field."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise RecipeError(path, f"unknown key{close_matches(str(key), names)}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def to_dict(recipe: Recipe) -> Dict[str, Any]:
    """Return the recipe as plain YAML-serialisable data (the resolved recipe)."""
    return dataclasses.asdict(recipe)


# ----------------------------------------------------------------------------- overrides


def apply_override(raw: Dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override to raw recipe data in place.

    The value is parsed as YAML (``0.1``, ``true``, ``[1, 2]``); list items are
    addressed by index (``teachers.0.model=resnet20``).
    """
    if "=" not in override:
        raise RecipeError(override, "an override must look like dotted.key=value")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(dotted, f"cannot parse value {text!r}: {exc}") from None
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        node = _child(node, key, ".".join(keys[: i + 1]), create=True)
    last = keys[-1]
    if isinstance(node, list):
        node[_index(node, last, dotted)] = value
    else:
        node[last] = value


def _index(node: list, key: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise RecipeError(where, f"no list item {key!r} (the list has {len(node)} items)")
    return int(key)


def _child(node: Any, key: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        child = node[_index(node, key, where)]
        if isinstance(child, str):  # a bare model spec grows into a mapping
            child = node[int(key)] = {"model": child}
        return child
    if not isinstance(node, dict):
        raise RecipeError(where, f"cannot set a key inside {node!r}")
    if key not in node or node[key] is None:
        node[key] = {}
    elif isinstance(node[key], str):  # a bare model spec grows into a mapping
        node[key] = {"model": node[key]}
    return node[key]
