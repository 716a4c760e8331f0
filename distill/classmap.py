"""Teacher class maps: a teacher's outputs taken into the student's label space (``teachers[i].classes``).

A map is an index list ``index`` of length C (the data's class count): student class ``i``
reads the teacher's output column ``index[i]``. It covers permutations (another class
order), subsets and supersets (a 1000-class teacher on a 100-class subset: C of its columns
are kept). The recipe gives it as

- ``classes: [3, 4, 5, ...]``: the index list itself;
- ``classes: [airplane, automobile, ...]``: the teacher's label names, in its output order;
- ``classes: names``: the teacher's label names from its own config (timm pretrained config
  or Hub ``config.json`` ``label_names``; timm's ImageNet label sets otherwise);
- ``classes: {names_file: PATH}``: its label names from a text file, one per line, line k
  naming output column k.

Names are matched to the data's class names (ImageFolder folder names, the dataset's class
names) ignoring case, and ``_`` / ``-`` / spaces; a class of the data that no label matches
(or that two labels match) is one RecipeError naming them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .errors import RecipeError, close_matches

if TYPE_CHECKING:
    from torch import nn

NAMES_FROM_CONFIG = "names"


def check_classes_value(value: Any, where: str) -> None:
    """Raise RecipeError naming ``where`` unless ``value`` is a valid ``classes:`` value (see module doc)."""
    if value is None or value == NAMES_FROM_CONFIG:
        return
    if isinstance(value, dict):
        if set(value) != {"names_file"} or not isinstance(value["names_file"], str):
            raise RecipeError(where, f"a mapping must be {{names_file: PATH}}, got {value!r}")
        from .errors import DistillError
        from .fileio import check_readable

        try:
            check_readable(value["names_file"], "class names file")
        except DistillError as exc:
            raise RecipeError(f"{where}.names_file", str(exc)) from None
        return
    if not isinstance(value, list) or not value:
        raise RecipeError(where, f"expected an index list, a list of label names, {NAMES_FROM_CONFIG!r} or "
                                 f"{{names_file: PATH}}, got {value!r}")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        negative = [v for v in value if v < 0]
        if negative:
            raise RecipeError(where, f"output columns must be >= 0, got {negative[0]}")
        _refuse_repeats([str(v) for v in value], where, "output column")
        return
    if all(isinstance(v, str) and v.strip() for v in value):
        _refuse_repeats([normalise(v) for v in value], where, "label name")
        return
    raise RecipeError(where, "a list must hold output column indices only, or label names only")


def _refuse_repeats(items: Sequence[str], where: str, what: str) -> None:
    seen, repeated = set(), []
    for item in items:
        if item in seen and item not in repeated:
            repeated.append(item)
        seen.add(item)
    if repeated:
        raise RecipeError(where, f"{what}(s) given more than once: {', '.join(repeated[:5])}")


def normalise(name: str) -> str:
    """Return a label name as compared: lower case, ``_`` / ``-`` / runs of spaces as one space."""
    return re.sub(r"[\s_-]+", " ", str(name)).strip().lower()


def config_label_names(model: nn.Module) -> Optional[List[str]]:
    """Return the label names of ``model``'s output columns from its config (None: it carries none).

    ``pretrained_cfg['label_names']`` (timm tags and Hub ``config.json``; a list, or a mapping
    from column to name), with ``label_offset`` leading columns (e.g. a background class)
    named ``<offset k>``; else timm's ImageNet label set that matches the class count.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names: Any = cfg.get("label_names")
    offset = int(cfg.get("label_offset") or 0)
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    if not names:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset is None:
            return None
        names = ImageNetInfo(subset).label_names()
    return [f"<offset {k}>" for k in range(offset)] + [str(n) for n in names]


def read_names_file(path: str) -> List[str]:
    """Return the label names of a names file: one per non-empty line, line k naming column k."""
    from .fileio import read_text

    return [line.strip() for line in read_text(path, "class names file").splitlines() if line.strip()]


def teacher_label_names(value: Any, model: nn.Module, where: str) -> List[str]:
    """Return the teacher's label names that a names-valued ``classes:`` refers to."""
    if isinstance(value, dict):
        return read_names_file(value["names_file"])
    if isinstance(value, list):
        return [str(v) for v in value]
    names = config_label_names(model)
    if names is None:
        raise RecipeError(where, "classes: names, but the teacher's config carries no label names; give them "
                                 "inline (classes: [name, ...]) or as classes: {names_file: PATH}")
    return names


def match_names(teacher_names: Sequence[str], data_names: Sequence[str], where: str) -> List[int]:
    """Return the index list (length ``len(data_names)``) taking each data class to the teacher column
    whose label matches its name; raise RecipeError naming every class that matches none or several."""
    columns: Dict[str, List[int]] = {}
    for k, name in enumerate(teacher_names):
        columns.setdefault(normalise(name), []).append(k)
    missing = [n for n in data_names if normalise(n) not in columns]
    if missing:
        hint = close_matches(missing[0], teacher_names)
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise RecipeError(where, f"{len(missing)} of the data's {len(data_names)} classes match no label of the "
                                 f"teacher ({len(teacher_names)} labels): {shown}{hint}")
    ambiguous = [n for n in data_names if len(columns[normalise(n)]) > 1]
    if ambiguous:
        raise RecipeError(where, f"classes named by several teacher labels: {', '.join(ambiguous[:8])}")
    return [columns[normalise(n)][0] for n in data_names]


def resolve_class_map(value: Any, model: nn.Module, data_names: Optional[Sequence[str]], num_classes: int,
                      where: str) -> Optional[List[int]]:
    """Return the index list (length ``num_classes``) of a teacher's ``classes:`` value, or None without one.

    ``model`` is the teacher (its class count bounds the columns; its config may name its
    labels); ``data_names`` the data's class names (None where no data is read, e.g. the dry
    run: a names-valued map then cannot be resolved and raises RecipeError).
    """
    if value is None:
        return None
    outputs = int(getattr(model, "num_classes", 0) or 0)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        index = list(value)
        if len(index) != num_classes:
            raise RecipeError(where, f"{len(index)} output columns given but the data has {num_classes} classes "
                                     "(student class i reads teacher column classes[i])")
    else:
        if data_names is None:
            raise RecipeError(where, "label names are matched to the data's class names, which this command "
                                     "does not read")
        names = teacher_label_names(value, model, where)
        if outputs and len(names) != outputs:
            raise RecipeError(where, f"{len(names)} label names for a teacher with {outputs} outputs")
        index = match_names(names, data_names, where)
    too_big = [v for v in index if outputs and v >= outputs]
    if too_big:
        raise RecipeError(where, f"output column {too_big[0]} does not exist (the teacher has {outputs} outputs)")
    return index


def classes_line(index: Sequence[int]) -> str:
    """Return the recipe line that sets a teacher's index list: ``classes: [3, 4, ...]``."""
    return f"classes: [{', '.join(str(int(i)) for i in index)}]"
