"""Recipe schema: typed dataclasses, YAML loading, dotted CLI overrides, field-named errors.

A recipe binds a student, a teacher pool, data, optimisation and a weighting policy::

    recipe = load_recipe("recipes/quickstart.yaml", ["optim.lr=0.1", "schedule.epochs=3"])

Every error names the offending field (``teachers[1].train.lr``) and value; unknown
keys get close-match suggestions. ``docs/recipes.md`` documents every key.
"""

from __future__ import annotations

import dataclasses
import re
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

    dataset: str = "cifar10"  # digits | cifar10 | cifar100 | imagefolder
    root: Optional[str] = None  # default: $DISTILL_HOME/datasets/<dataset>
    download: bool = True  # torchvision download when the data is not found locally
    batch_size: int = 64  # global batch size
    eval_batch_size: Optional[int] = None  # default: 2 x batch_size
    num_workers: int = 2
    augment: Literal["auto", "none", "cifar", "timm"] = "auto"
    train_subset: Optional[int] = None  # first N training images of a fixed class-balanced shuffle
    val_subset: Optional[int] = None
    fixed_views: Optional[int] = None  # K views per training image stored in run.teacher_cache; epoch e shows view e mod K
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


@dataclass
class OptimConfig:
    """Optimiser, built by ``timm.optim.create_optimizer_v2``."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    filter_bias_and_bn: bool = False  # True: no weight decay on norm and bias parameters


@dataclass
class ScheduleConfig:
    """Epoch-based LR schedule, built by ``timm.scheduler.create_scheduler_v2``."""

    name: Literal["multistep", "cosine", "constant"] = "multistep"
    epochs: int = 240
    milestones: List[int] = field(default_factory=lambda: [150, 180, 210])
    decay_rate: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0


@dataclass
class TeacherTrainConfig:
    """Train or fine-tune a teacher on the recipe's dataset before distillation."""

    epochs: int = 10
    lr: float = 0.05
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["multistep", "cosine", "constant"] = "cosine"
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
    """A model spec (see :func:`distill.registry.resolve_model`) and how to build it."""

    model: str = ""
    pretrained: bool = False
    weights: Optional[str] = None  # local .safetensors / .pth file loaded into `model`
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra create_model kwargs


@dataclass
class TeacherConfig(ModelConfig):
    """A frozen teacher: spec, optional pre-training, optional input adaptation overrides."""

    pretrained: bool = True
    train: Optional[TeacherTrainConfig] = None
    input_size: Optional[int] = None  # resize the batch to this square size for this teacher
    mean: Optional[List[float]] = None  # override the teacher's normalisation
    std: Optional[List[float]] = None


@dataclass
class DistillConfig:
    """The loss of Equ.(2): CE + alpha * sum_m w_l KD_m + beta * sum_m w_f FEAT_m."""

    alpha: float = 1.0
    beta: float = 5.0
    temperature: float = 4.0
    logit_loss: Literal["kd", "dist"] = "kd"  # per-teacher logit term: Hinton KD or DIST (Huang et al. 2022)
    features: str = "pre_logits"  # pre_logits | last_map | <stage index>
    policy: str = "aver"
    policy_args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """Runtime settings that do not change the math."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA when supported
    deterministic: bool = False
    log_interval: int = 20  # steps between progress-bar metric reads (the only host syncs)
    baseline: bool = False  # also train the student alone on the same schedule, for comparison
    progress: bool = True
    plot: bool = False  # draw teacher weights and val top-1 per epoch to <run_dir>/weights.png at the end
    teacher_cache: Optional[str] = None  # auto | KEY: teachers' top-k outputs per stored view, built by distill-cache (distill.cache)
    teacher_top_k: Optional[int] = None  # teacher_cache: logits kept per teacher and view (default: all classes)
    sync_bn: bool = False  # under torchrun (CUDA): SyncBatchNorm in the student (default: per-rank BN statistics)


@dataclass
class HubConfig:
    """Push the distilled student to the Hugging Face Hub at the end of training (``distill-push``)."""

    push: bool = False
    repo_id: Optional[str] = None  # ORG/NAME; required when push is true
    private: bool = False  # create the repository private (an existing one keeps its visibility)
    revision: Optional[str] = None  # branch to commit to (created if missing); default main
    checkpoint: Literal["best", "last"] = "best"


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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
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


# ----------------------------------------------------------------------------- entry point


def load_recipe(path: Union[str, Path], overrides: Optional[List[str]] = None, check_data: bool = True) -> Recipe:
    """Return the validated :class:`Recipe` of a YAML file after applying ``overrides``."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError("", f"file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError("", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError("", f"{path} must hold a mapping at the top level")
    return recipe_from_dict(raw, overrides, check_data)


def recipe_from_dict(raw: Dict[str, Any], overrides: Optional[List[str]] = None,
                     check_data: bool = True) -> Recipe:
    """Return the validated :class:`Recipe` of raw data after applying ``overrides``."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for override in overrides or []:
        apply_override(raw, override)
    recipe = from_dict(Recipe, raw)
    validate(recipe, check_data=check_data)
    return recipe


def validate(recipe: Recipe, check_data: bool = True) -> None:
    """Check the values that types cannot: names, ranges, files. Raises RecipeError.

    ``check_data=False`` (dry runs) skips the checks that need the dataset on disk.
    """
    from . import data, registry  # late: these import torch / timm
    from .policies import POLICIES
    from .taps import parse_feature_tap

    if recipe.data.dataset not in data.DATASETS:
        raise RecipeError("data.dataset", f"unknown dataset {recipe.data.dataset!r}; known: "
                          f"{', '.join(sorted(data.DATASETS))}{close_matches(recipe.data.dataset, data.DATASETS)}")
    if recipe.data.dataset == "imagefolder" and not recipe.data.root:
        raise RecipeError("data.root", "an imagefolder dataset needs data.root (a folder with train/ and test/)")
    if check_data and recipe.data.root and recipe.data.dataset == "imagefolder" and not Path(recipe.data.root).is_dir():
        raise RecipeError("data.root", f"folder not found: {recipe.data.root}")
    for name in ("batch_size", "num_workers"):
        if getattr(recipe.data, name) < (1 if name == "batch_size" else 0):
            raise RecipeError(f"data.{name}", f"bad value {getattr(recipe.data, name)}")
    if (recipe.data.mean is None) != (recipe.data.std is None):
        raise RecipeError("data.mean", "give both data.mean and data.std, or neither")
    for name in ("re_prob", "mixup_prob", "mixup_switch_prob", "label_smoothing"):
        if not 0.0 <= getattr(recipe.data, name) <= 1.0:
            raise RecipeError(f"data.{name}", f"must lie in [0, 1], got {getattr(recipe.data, name)}")
    for name in ("mixup", "cutmix"):
        if getattr(recipe.data, name) < 0:
            raise RecipeError(f"data.{name}", f"must be >= 0, got {getattr(recipe.data, name)}")
    if recipe.data.fixed_views is not None and recipe.data.fixed_views < 1:
        raise RecipeError("data.fixed_views", f"must be >= 1, got {recipe.data.fixed_views}")
    cache = recipe.run.teacher_cache
    if cache is not None and cache != "auto" and not re.fullmatch(r"[0-9a-f]{32}", cache):
        raise RecipeError("run.teacher_cache", f"{cache!r} is neither auto nor a 32-hex-digit cache key")
    if cache is not None and recipe.data.fixed_views is None:
        raise RecipeError("run.teacher_cache", "caching teacher outputs needs a finite set of inputs: set "
                          "data.fixed_views (e.g. 4)")
    if cache is None and recipe.data.fixed_views is not None:
        raise RecipeError("data.fixed_views", "stored views live in the teacher cache: set run.teacher_cache=auto")
    if cache is not None and (recipe.data.mixup > 0 or recipe.data.cutmix > 0):
        raise RecipeError("run.teacher_cache", "mixup / cutmix mix the images after the teachers' outputs were "
                          "cached (partners and lambda are not stored); set data.mixup=0 and data.cutmix=0, "
                          "or run.teacher_cache=null")
    if recipe.run.teacher_top_k is not None and recipe.run.teacher_top_k < 1:
        raise RecipeError("run.teacher_top_k", f"must be >= 1, got {recipe.run.teacher_top_k}")
    if recipe.data.num_classes is not None and recipe.data.num_classes < 1:
        raise RecipeError("data.num_classes", f"must be >= 1, got {recipe.data.num_classes}")

    if not recipe.student.model:
        raise RecipeError("student.model", "a student model is required")
    registry.check_spec(recipe.student.model, "student.model", recipe.student.weights)
    if recipe.pool is not None:
        from zoo.pools import POOLS

        if recipe.pool not in POOLS:
            raise RecipeError("pool", f"unknown teacher pool {recipe.pool!r}; known: "
                              f"{', '.join(sorted(POOLS))}{close_matches(recipe.pool, POOLS)}")
    for i, teacher in enumerate(recipe.teachers):
        where = f"teachers[{i}]"
        if not teacher.model:
            raise RecipeError(f"{where}.model", "a teacher model is required")
        registry.check_spec(teacher.model, f"{where}.model", teacher.weights)
        if (teacher.mean is None) != (teacher.std is None):
            raise RecipeError(f"{where}.mean", "give both mean and std, or neither")
        if teacher.train is not None and teacher.train.epochs < 1:
            raise RecipeError(f"{where}.train.epochs", f"must be >= 1, got {teacher.train.epochs}")

    d = recipe.distill
    if d.policy not in POLICIES:
        raise RecipeError("distill.policy", f"unknown policy {d.policy!r}; known: "
                          f"{', '.join(sorted(POLICIES))}{close_matches(d.policy, POLICIES)}")
    try:
        POLICIES[d.policy].check_args(d.policy_args)
    except ValueError as exc:
        raise RecipeError("distill.policy_args", str(exc)) from None
    try:
        parse_feature_tap(d.features)
    except ValueError as exc:
        raise RecipeError("distill.features", str(exc)) from None
    if d.temperature <= 0:
        raise RecipeError("distill.temperature", f"must be > 0, got {d.temperature}")
    if d.alpha < 0 or d.beta < 0:
        raise RecipeError("distill.alpha" if d.alpha < 0 else "distill.beta", "must be >= 0")

    if recipe.optim.lr <= 0:
        raise RecipeError("optim.lr", f"must be > 0, got {recipe.optim.lr}")
    s = recipe.schedule
    if s.epochs < 1:
        raise RecipeError("schedule.epochs", f"must be >= 1, got {s.epochs}")
    if s.name == "multistep" and any(m <= 0 or m >= s.epochs for m in s.milestones):
        raise RecipeError("schedule.milestones", f"{s.milestones} must lie strictly between 0 and "
                          f"schedule.epochs={s.epochs}")
    if recipe.run.log_interval < 1:
        raise RecipeError("run.log_interval", f"must be >= 1, got {recipe.run.log_interval}")
    if recipe.run.device not in ("auto", "cpu", "cuda") and not recipe.run.device.startswith("cuda:"):
        raise RecipeError("run.device", f"{recipe.run.device!r} is not auto, cpu, cuda or cuda:N")
    if recipe.hub.push and not recipe.hub.repo_id:
        raise RecipeError("hub.repo_id", "hub.push is true: give the repository as hub.repo_id: ORG/NAME")
    if recipe.hub.repo_id is not None:
        from .hub import repo_id_problem

        problem = repo_id_problem(recipe.hub.repo_id)
        if problem:
            raise RecipeError("hub.repo_id", problem)


def teacher_configs(recipe: Recipe) -> List[TeacherConfig]:
    """Return the recipe's teachers: the explicit list followed by the named pool's members.

    A pool member that the explicit list already names (same model spec) is not added
    again: the explicit entry configures it (e.g. ``pretrained: false`` + ``train:``).
    """
    teachers = list(recipe.teachers)
    if recipe.pool is not None:
        from zoo.pools import POOLS

        named = {t.model for t in teachers}
        teachers += [TeacherConfig(model=name) for name in POOLS[recipe.pool].teachers if name not in named]
    return teachers
