"""One rule for class counts, used by ``distill-train`` (student, teachers), its dry run and ``distill-eval``.

A model built without weights gets the dataset's class count. A model with weights keeps
the count of its weights; when that differs from the dataset's:

- a model trained here (the student, a teacher with ``train:``) from a pretrained *tag*
  gets a fresh head for the dataset (the usual fine-tuning);
- a model loaded from a weights *file* must list its head in ``new_keys`` (then it is built
  for the dataset), since every tensor of a file-loaded model comes from the file;
- anything else (a frozen teacher, an evaluated model) is an error naming both counts.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .errors import DistillError


def fit_class_count(model: nn.Module, num_classes: int, who: str, dataset: str, *, trained_here: bool,
                    weights_file: Optional[str] = None) -> None:
    """Make ``model`` predict ``num_classes`` classes as the rule above says, or raise DistillError naming ``who``."""
    have = getattr(model, "num_classes", None)
    if have is None or have == num_classes:
        return
    what = f"{who} ({weights_file})" if weights_file is not None else who
    if weights_file is not None and trained_here:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        head = cfg.get("classifier") or "fc"
        raise DistillError(f"{what}: predicts {have} classes but dataset {dataset} has {num_classes}; to train a "
                           f"new head list it as intentionally new: new_keys: [{head}.*]")
    if trained_here and weights_file is None:
        model.reset_classifier(num_classes)
        return
    hint = ("; add train: {epochs: N} to fine-tune it on this dataset, or map its outputs to the data's classes "
            "with classes: (names or an index list)") if who.startswith("teachers") else ""
    raise DistillError(f"{what}: predicts {have} classes but dataset {dataset} has {num_classes}{hint}")
