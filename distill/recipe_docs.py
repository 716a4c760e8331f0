"""Generate ``docs/recipes.md`` from the recipe dataclasses of :mod:`distill.recipe`.

Every field of every section is listed with its type, default and meaning; the meaning
is the field's trailing ``# comment`` in ``distill/recipe.py`` (the schema is the single
source of truth). Regenerate after changing the schema::

    python -m distill.recipe_docs > docs/recipes.md
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any, Dict, List, Tuple

from . import recipe as R

INTRO = """# Recipe keys

A recipe is a YAML file (see `recipes/`) whose keys are the fields below; every key has a
default, so a recipe only names what it changes. Any key can be overridden on the command
line as `dotted.key=value` (`optim.lr=0.1`, `teachers.0.train.epochs=3`,
`data.root=/data/imagenet`); values are parsed as YAML. Unknown keys and bad values are
errors that name the field.

`data.batch_size` (and `data.eval_batch_size`) and `optim.lr` are **global**: with N
processes (`torchrun`, `torch.distributed` initialised) each process loads
`batch_size / N` images per step, and the LR is the one for the global batch.

Check a recipe without its data: `distill-train RECIPE --dry-run [--offline]` builds every
model (with `--offline`, weights missing from the local cache become random init with the
pretrained config kept), runs one step on a synthetic batch and prints teachers, student,
projectors, policy, optimiser, schedule, steps and the measured memory per step.

Teachers in one pool may differ from the data and from each other in resolution and
normalisation (a 384-px teacher beside 224-px ones, a CNN teacher for a ViT student). Each
teacher sees the batch re-normalised from the data's mean/std to its own (`teachers[i].mean`
/ `std`, else its weights' data config, else the data's) and resized to its own size
(`teachers[i].input_size`, else its weights' data config when that differs from the data's
size; teachers trained here or built at random see the data's size). With
`distill.features: last_map`, CNN maps `(B, C, H, W)` and ViT tokens `(B, N, D)` are
bridged by grid projectors: tokens laid out on their square patch grid, resampled to the
target's grid, 1x1 conv (then BN + ReLU for a map target; none for a token target).

With `data.mixup` / `data.cutmix` / `data.label_smoothing` the training targets are soft
`(B, C)` (timm `Mixup`, applied per batch in the training loop; teachers see the mixed
images); the student CE, the teachers' CE (a policy signal) and the policies use them.

This file is generated from `distill/recipe.py` by `python -m distill.recipe_docs`
(`tests/test_recipes.py` checks that every field is documented here).
"""

SECTIONS: List[Tuple[str, type]] = [
    ("(top level)", R.Recipe),
    ("data", R.DataConfig),
    ("student", R.ModelConfig),
    ("teachers[i]", R.TeacherConfig),
    ("teachers[i].train", R.TeacherTrainConfig),
    ("distill", R.DistillConfig),
    ("optim", R.OptimConfig),
    ("schedule", R.ScheduleConfig),
    ("run", R.RunConfig),
    ("hub", R.HubConfig),
]


# meanings of fields that carry no trailing comment in distill/recipe.py
MEANINGS: Dict[str, str] = {
    "Recipe.name": "run name; the run directory is runs/<name> unless output_dir is set",
    "Recipe.seed": "seed of everything (each epoch is re-seeded from (seed, epoch) for exact resume)",
    "Recipe.data": "dataset, augmentation, mixing and loaders: the `data` section",
    "Recipe.student": "the student model: the `student` section",
    "Recipe.teachers": "explicit teachers, each a model spec string or a `teachers[i]` mapping",
    "Recipe.distill": "the loss and the weighting policy: the `distill` section",
    "Recipe.optim": "the optimiser: the `optim` section",
    "Recipe.schedule": "the LR schedule: the `schedule` section",
    "Recipe.run": "runtime settings: the `run` section",
    "Recipe.hub": "push to the Hugging Face Hub at the end: the `hub` section",
    "DataConfig.num_workers": "DataLoader worker processes per process",
    "DataConfig.augment": ("training augmentation: auto (the dataset's default: cifar for CIFAR, timm for "
                           "imagefolder, none for digits), none, cifar (crop with padding size/8 + flip), timm "
                           "(timm create_transform: random-resized crop, flip, colour jitter, plus auto_augment "
                           "/ re_prob)"),
    "DataConfig.val_subset": "first N test images of a fixed class-balanced shuffle",
    "DataConfig.std": "override of the dataset's normalisation (with mean)",
    "ModelConfig.model": "model spec: timm name[.tag], zoo name, hf-hub:ORG/NAME[@rev], local-dir:PATH, run dir or checkpoint",
    "ModelConfig.pretrained": "load the spec's pretrained weights (student default false)",
    "TeacherConfig.model": "model spec of the teacher (as for the student)",
    "TeacherConfig.pretrained": "load pretrained weights (default true; false: random init, then `train:`)",
    "TeacherConfig.train": "train / fine-tune the teacher on the recipe's data first (cached in <run>/teachers/)",
    "TeacherConfig.std": "override the teacher's normalisation (with mean)",
    "TeacherTrainConfig.epochs": "teacher training epochs",
    "TeacherTrainConfig.lr": "teacher learning rate",
    "TeacherTrainConfig.optimizer": "teacher optimiser",
    "TeacherTrainConfig.momentum": "SGD momentum",
    "TeacherTrainConfig.nesterov": "SGD Nesterov momentum",
    "TeacherTrainConfig.weight_decay": "teacher weight decay",
    "TeacherTrainConfig.schedule": "teacher LR schedule",
    "TeacherTrainConfig.milestones": "epochs of the x0.1 steps (multistep)",
    "TeacherTrainConfig.warmup_epochs": "linear warm-up epochs",
    "DistillConfig.alpha": "weight of the logit-level term (paper: 1)",
    "DistillConfig.beta": "weight of the feature-level term (paper: 5)",
    "DistillConfig.temperature": "KD temperature T (paper: 4); KD is scaled by T^2",
    "DistillConfig.policy": "weighting policy: aver, ebkd, camkd, mtkd_rl, mixture",
    "DistillConfig.policy_args": "the policy's own settings (e.g. mtkd_rl: variant align / paper / official, gammas, divergence, agent lr, tau, kl_limit; camkd: variant published / shared; see distill/policies)",
    "OptimConfig.name": "optimiser (timm create_optimizer_v2)",
    "OptimConfig.lr": "learning rate for the global batch size",
    "OptimConfig.momentum": "SGD momentum",
    "OptimConfig.nesterov": "SGD Nesterov momentum",
    "OptimConfig.weight_decay": "weight decay",
    "ScheduleConfig.name": "multistep (x decay_rate at milestones), cosine, constant (timm create_scheduler_v2, per epoch)",
    "ScheduleConfig.epochs": "training epochs",
    "ScheduleConfig.milestones": "epochs where a multistep schedule multiplies the LR by decay_rate; null: 5/8, 3/4, 7/8 of epochs (150/180/210 at 240)",
    "ScheduleConfig.decay_rate": "multistep factor",
    "ScheduleConfig.warmup_epochs": "linear warm-up epochs from warmup_lr",
    "ScheduleConfig.warmup_lr": "LR at the start of the warm-up",
    "ScheduleConfig.min_lr": "cosine: final LR",
    "RunConfig.deterministic": "deterministic kernels (slower on GPU)",
    "RunConfig.progress": "progress bars on a terminal",
    "HubConfig.push": "push the student at the end of training",
    "HubConfig.checkpoint": "which weights to push",
}


def dataclasses_in_schema() -> List[type]:
    """Return every dataclass reachable from :class:`Recipe` (the test's checklist)."""
    seen: List[type] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            for arg in [tp, *typing.get_args(tp), *(a for t in typing.get_args(tp) for a in typing.get_args(t))]:
                if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                    walk(arg)

    walk(R.Recipe)
    return seen


def field_comments(cls: type) -> Dict[str, str]:
    """Return ``{field: trailing comment}`` from the source of ``cls`` and its bases."""
    comments: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        current = None
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and current is None:
                current = tok.string
            elif tok.type == tokenize.COMMENT and current is not None:
                comments[current] = tok.string.lstrip("# ").strip()
            elif tok.type == tokenize.NEWLINE:
                current = None
            elif tok.type == tokenize.NL and current is not None:
                pass
    return comments


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value!r}`" if not isinstance(value, str) else (f"`{value}`" if value else '`""`')


def render() -> str:
    """Return the whole of docs/recipes.md."""
    out = [INTRO]
    documented = set()
    sections = list(SECTIONS) + [(c.__name__, c) for c in dataclasses_in_schema() if c not in dict(SECTIONS).values()]
    for title, cls in sections:
        documented.add(cls)
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        doc = (inspect.getdoc(cls) or "").splitlines()[0] if inspect.getdoc(cls) else ""
        out.append(f"\n## `{title}` ({cls.__name__})\n\n{doc}\n")
        out.append("| key | type | default | meaning |\n| --- | --- | --- | --- |")
        for f in dataclasses.fields(cls):
            meaning = comments.get(f.name) or next(
                (MEANINGS[f"{k.__name__}.{f.name}"] for k in cls.__mro__ if f"{k.__name__}.{f.name}" in MEANINGS), "")
            type_name = R._type_name(hints[f.name]).replace("|", "\\|")
            out.append(f"| `{f.name}` | {type_name} | {_default(f)} | {meaning.replace('|', '/')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
