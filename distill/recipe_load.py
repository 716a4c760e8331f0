"""Loading and validating recipes: YAML + dotted overrides -> a checked :class:`~distill.recipe.Recipe`.

The checks here need model code (datasets, the model registry, policies, feature taps, the
zoo's pools), which :mod:`distill.recipe` (the schema) does not import.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from .errors import RecipeError, close_matches
from .recipe import ModelConfig, Recipe, TeacherConfig, apply_override, from_dict, is_device_name


# ----------------------------------------------------------------------------- entry point


def load_recipe(path: Union[str, Path], overrides: Optional[List[str]] = None, check_data: bool = True) -> Recipe:
    """Return the validated :class:`Recipe` of a YAML file after applying ``overrides``."""
    from .errors import DistillError
    from .fileio import read_text

    path = Path(path)
    try:
        text = read_text(path, "recipe file")
    except DistillError as exc:
        raise RecipeError("", str(exc)) from None
    try:
        raw = yaml.safe_load(text) or {}
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
    from . import data, registry  # late: these import torch / timm (a bad YAML fails fast)
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
    if cache is not None and recipe.data.aug_repeats > 1:
        raise RecipeError("data.aug_repeats", "repeated augmentation draws fresh views of each image, but with "
                          "run.teacher_cache every epoch replays its stored view; set data.aug_repeats=0, or "
                          "run.teacher_cache=null")
    if recipe.run.teacher_top_k is not None and recipe.run.teacher_top_k < 1:
        raise RecipeError("run.teacher_top_k", f"must be >= 1, got {recipe.run.teacher_top_k}")
    if recipe.data.num_classes is not None and recipe.data.num_classes < 1:
        raise RecipeError("data.num_classes", f"must be >= 1, got {recipe.data.num_classes}")

    if not recipe.student.model:
        raise RecipeError("student.model", "a student model is required")
    registry.check_spec(recipe.student.model, "student.model", recipe.student.weights)
    _check_new_keys(recipe.student, "student")
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
        _check_new_keys(teacher, where)
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
    o = recipe.optim
    if o.accum_steps < 1:
        raise RecipeError("optim.accum_steps", f"must be >= 1, got {o.accum_steps}")
    if o.accum_steps > recipe.data.batch_size:
        raise RecipeError("optim.accum_steps", f"{o.accum_steps} micro-batches do not fit in data.batch_size="
                          f"{recipe.data.batch_size}")
    if o.clip_grad is not None and o.clip_grad <= 0:
        raise RecipeError("optim.clip_grad", f"must be > 0 (or null: off), got {o.clip_grad}")
    if recipe.data.aug_repeats < 0:
        raise RecipeError("data.aug_repeats", f"must be >= 0, got {recipe.data.aug_repeats}")
    if not 0.0 < recipe.run.ema_decay < 1.0:
        raise RecipeError("run.ema_decay", f"must lie in (0, 1), got {recipe.run.ema_decay}")
    if recipe.hub.checkpoint == "ema" and not recipe.run.ema:
        raise RecipeError("hub.checkpoint", "ema: the run keeps no EMA of the student; set run.ema=true")
    s = recipe.schedule
    if s.epochs < 1:
        raise RecipeError("schedule.epochs", f"must be >= 1, got {s.epochs}")
    if s.name == "multistep" and any(m <= 0 or m >= s.epochs for m in s.decay_epochs()):
        raise RecipeError("schedule.milestones", f"{s.milestones} must lie strictly between 0 and "
                          f"schedule.epochs={s.epochs}")
    if recipe.run.log_interval < 1:
        raise RecipeError("run.log_interval", f"must be >= 1, got {recipe.run.log_interval}")
    if not is_device_name(recipe.run.device):
        raise RecipeError("run.device", f"{recipe.run.device!r} is not auto, cpu, cuda or cuda:N")
    if recipe.hub.push and not recipe.hub.repo_id:
        raise RecipeError("hub.repo_id", "hub.push is true: give the repository as hub.repo_id: ORG/NAME")
    if recipe.hub.repo_id is not None:
        from .hub import repo_id_problem

        problem = repo_id_problem(recipe.hub.repo_id)
        if problem:
            raise RecipeError("hub.repo_id", problem)


def _check_new_keys(cfg: ModelConfig, where: str) -> None:
    """Raise RecipeError if ``new_keys`` is given without a weights file (it would do nothing)."""
    if cfg.new_keys and not cfg.weights:
        raise RecipeError(f"{where}.new_keys", "only applies to a model loaded from weights: FILE")
    for i, pattern in enumerate(cfg.new_keys):
        if not pattern:
            raise RecipeError(f"{where}.new_keys[{i}]", "an empty pattern")


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
