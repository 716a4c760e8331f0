"""Loading and validating recipes: YAML + dotted overrides -> a checked :class:`~distill.recipe.Recipe`.

The checks here need model code (datasets, the model registry, policies, feature taps, the
zoo's pools), which :mod:`distill.recipe` (the schema) does not import.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from .classmap import check_classes_value
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


def registry_fields() -> Dict[str, Any]:
    """Return ``{recipe field: the registry its value names}`` (docs and validation read the choices
    there), with every registering module imported. ``data.dataset`` also takes ``hfds/NAME[:config]``
    and ``distill.features`` a stage index."""
    from . import data, losses, optim, policies, taps  # noqa: F401  (register datasets, augment kinds, losses, ...)
    from .registries import AUGMENTS, DATASETS, LOSSES, OPTIMIZERS, POLICIES, SCHEDULES, TAPS

    return {"data.dataset": DATASETS, "data.augment": AUGMENTS, "distill.logit_loss": LOSSES,
            "distill.features": TAPS, "distill.policy": POLICIES, "optim.name": OPTIMIZERS,
            "schedule.name": SCHEDULES, "teachers[i].train.optimizer": OPTIMIZERS,
            "teachers[i].train.schedule": SCHEDULES}


def _check_cache_count(field: str, value: Optional[int], cache: Optional[str], purpose: str) -> None:
    """Refuse ``field`` (a count >= 0 that only the teacher cache uses) when set without a cache or below 0."""
    if value is not None and cache is None:
        raise RecipeError(field, f"{purpose}, or leave it unset")
    if value is not None and value < 0:
        raise RecipeError(field, f"must be >= 0, got {value}")


def validate(recipe: Recipe, check_data: bool = True) -> None:
    """Check the values that types cannot: names, ranges, files. Raises RecipeError.

    ``check_data=False`` (dry runs) skips the checks that need the dataset on disk.
    """
    from . import data, resolve  # late: these import torch / timm (a bad YAML fails fast)
    from .registries import AUGMENTS, LOSSES, OPTIMIZERS, POLICIES, SCHEDULES
    from .taps import parse_feature_tap

    registry_fields()  # every registering module imported
    data.dataset_info(recipe.data.dataset).check(recipe.data, check_data)
    AUGMENTS.get(recipe.data.augment, "data.augment")
    OPTIMIZERS.get(recipe.optim.name, "optim.name")
    SCHEDULES.get(recipe.schedule.name, "schedule.name")
    for i, teacher in enumerate(recipe.teachers or []):
        train = getattr(teacher, "train", None)
        if train is not None:
            OPTIMIZERS.get(train.optimizer, f"teachers[{i}].train.optimizer")
            SCHEDULES.get(train.schedule, f"teachers[{i}].train.schedule")
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
    _check_cache_count("run.teacher_cache_view_seed", recipe.run.teacher_cache_view_seed, cache,
                       "seeds the views stored in the teacher cache: set run.teacher_cache=auto")
    if recipe.run.teacher_top_k is not None and recipe.run.teacher_top_k < 1:
        raise RecipeError("run.teacher_top_k", f"must be >= 1, got {recipe.run.teacher_top_k}")
    _check_cache_count("run.teacher_cache_sketch", recipe.run.teacher_cache_sketch, cache,
                       "sketches the tails stored in the teacher cache: set run.teacher_cache=auto and "
                       "run.teacher_top_k")
    if recipe.data.num_classes is not None and recipe.data.num_classes < 1:
        raise RecipeError("data.num_classes", f"must be >= 1, got {recipe.data.num_classes}")

    if not recipe.student.model:
        raise RecipeError("student.model", "a student model is required")
    resolve.check_spec(recipe.student.model, "student.model", recipe.student.weights)
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
        resolve.check_spec(teacher.model, f"{where}.model", teacher.weights)
        _check_new_keys(teacher, where)
        if (teacher.mean is None) != (teacher.std is None):
            raise RecipeError(f"{where}.mean", "give both mean and std, or neither")
        if teacher.train is not None and teacher.train.epochs < 1:
            raise RecipeError(f"{where}.train.epochs", f"must be >= 1, got {teacher.train.epochs}")
        check_classes_value(teacher.classes, f"{where}.classes")
        if teacher.classes is not None and teacher.train is not None:
            raise RecipeError(f"{where}.classes", "a teacher trained here gets a head for the data's classes; "
                                                  "drop classes: or train:")

    d = recipe.distill
    LOSSES.get(d.logit_loss, "distill.logit_loss")
    try:
        POLICIES.get(d.policy, "distill.policy").check_args(d.policy_args)
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
