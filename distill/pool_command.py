"""``distill-pool check``'s runner: builds a recipe's teachers as ``distill-train`` does (through the
pipeline, which sits below it) and summarises them on its data (:mod:`distill.pool_check`)."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from .pool_check import pool_batches, summarise
from .teachers import TeacherPool


def check_pool(recipe: Any, split: str = "val", limit: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    """Return ``distill-pool check``'s report of a recipe's teachers on its ``split`` (``val``: the test
    images; ``train``: the training images as training loads them, augmented) or a class-balanced
    ``limit`` of it. Teachers are built as ``distill-train`` builds them; one trained here
    (``train:``) whose training has not finished is listed under ``skipped``."""
    from .data import LabeledSubset, balanced_subset, build_loader, dataset_targets
    from .runtime import autocast_dtype, seed_everything
    from .errors import DistillError
    from .pipeline import RecipeRunner
    from .recipe_load import teacher_configs

    runner = RecipeRunner(recipe)
    configs = teacher_configs(recipe)
    if not configs:
        raise DistillError(f"{recipe.name}: the recipe has no teachers to check")
    teachers, skipped = [], []
    for i, cfg in enumerate(configs):
        if runner.teacher_ready(i, cfg):
            teachers.append(runner.prepare_teacher(i, cfg))
        else:
            skipped.append({"index": i, "model": cfg.model,
                            "reason": f"trained here (train:) and not trained yet in {runner.teacher_dir(i, cfg)}"})
    if not teachers:
        raise DistillError(f"{recipe.name}: every teacher is trained here and none is trained yet; run distill-train "
                           "first (the check reads the trained teachers from the run directory)")
    dataset = runner.bundle.val if split == "val" else runner.bundle.train
    if limit is not None and limit < len(dataset):
        dataset = LabeledSubset(dataset, balanced_subset(dataset_targets(dataset), limit))
    batch = recipe.data.eval_batch_size or 2 * recipe.data.batch_size
    loader = build_loader(dataset, batch, False, recipe.data.num_workers, recipe.seed)
    seed_everything(recipe.seed)  # the training split's augmentation draws from it
    dtype = autocast_dtype(recipe.run.precision, runner.device)
    started = time.perf_counter()
    pool = TeacherPool(teachers)
    batches = pool_batches(pool, loader, runner.device, dtype, recipe.run.channels_last, progress, f"pool check ({split})")
    report = summarise(batches, pool, runner.bundle.num_classes, runner.device)
    precision = "fp32" if dtype is None else str(dtype).replace("torch.", "")
    return {"recipe": recipe.name, "dataset": recipe.data.dataset, "split": split, "device": str(runner.device),
            "precision": precision, "seconds": time.perf_counter() - started, **report,
            "class_names": list(runner.bundle.class_names), "skipped": skipped,
            "sources": [t.source for t in teachers]}
