"""From a recipe to its teacher cache: the spec and key, ``run.teacher_cache``.

The views are drawn with ``run.teacher_cache_view_seed`` (default: the training ``seed``), so
the runs of a study that differ only in ``seed`` share one cache when they set it (their
data order, student initialisation and everything else still follow ``seed``; with the
default, epoch ``e < K`` shows exactly what a live run of that seed shows).

With ``run.teacher_top_k`` below the number of classes, ``run.teacher_cache_sketch`` is the
rank of the sketch of each teacher's logits that gives the dropped tail its shape
(:mod:`distill.cache.sketch`; default 32 where the tail has more than 32 classes, else 0, and
0 keeps the uniform fill).

``run.teacher_cache: auto`` uses the cache whose key the recipe's spec gives, building it
first when it does not exist; ``run.teacher_cache: KEY`` uses that cache and refuses it
(naming what differs) when it was built for other data, views, teachers, tap, top-k or
precision. Either way a missing or corrupt shard is refused; ``distill-cache build``
rebuilds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .. import distributed
from ..data import DataBundle
from ..teachers import TeacherPool
from ..errors import RecipeError
from .build import build_shards
from .sketch import default_rank
from .store import TeacherCache, cache_key, cache_root, cache_spec, open_cache

DEFAULT_SHARD_IMAGES = 1024


def augment_spec(recipe: Any, bundle: DataBundle) -> Dict[str, Any]:
    """Return the data settings the views depend on (resolved size and normalisation included)."""
    d = recipe.data
    return {"dataset": d.dataset, "augment": d.augment, "input_size": list(bundle.input_size),
            "mean": [round(float(v), 7) for v in bundle.mean], "std": [round(float(v), 7) for v in bundle.std],
            "auto_augment": d.auto_augment, "re_prob": d.re_prob, "color_jitter": d.color_jitter,
            "interpolation": d.interpolation}


def view_seed(recipe: Any) -> int:
    """Return the seed of the recipe's stored views: ``run.teacher_cache_view_seed``, else the training seed."""
    seed = recipe.run.teacher_cache_view_seed
    return int(recipe.seed if seed is None else seed)


def sketch_rank(recipe: Any, top_k: int, num_classes: int) -> int:
    """Return the rank of the recipe's tail sketch: ``run.teacher_cache_sketch``, else its default (0: none)."""
    rank = recipe.run.teacher_cache_sketch
    if rank is None:
        return default_rank(top_k, num_classes)
    if rank > 0 and top_k >= num_classes:
        raise RecipeError("run.teacher_cache_sketch", f"sketches the logits beyond run.teacher_top_k, but all "
                          f"{num_classes} classes are kept: set run.teacher_top_k below {num_classes}, or leave it unset")
    if rank >= num_classes:
        raise RecipeError("run.teacher_cache_sketch", f"rank {rank} must be below the {num_classes} classes")
    return int(rank)


def recipe_cache_spec(recipe: Any, bundle: DataBundle, pool: TeacherPool,
                      dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """Return the cache spec of a recipe (``data.fixed_views`` views, ``run.teacher_top_k``, the tails'
    sketch rank), with its ``key``."""
    top_k = min(recipe.run.teacher_top_k or bundle.num_classes, bundle.num_classes)
    spec = cache_spec(bundle.train, augment_spec(recipe, bundle), view_seed(recipe), recipe.data.fixed_views or 1,
                      top_k, bundle.num_classes, pool, dtype, recipe.distill.temperature,
                      sketch_rank(recipe, top_k, bundle.num_classes))
    return {"key": cache_key(spec), **spec}


def rebuild_hint(recipe_path: Optional[str] = None) -> str:
    """Return the end of a refusal message: how to (re)build the cache."""
    return f"; rebuild it with: distill-cache build {recipe_path or 'RECIPE'}"


def build_recipe_cache(recipe: Any, bundle: DataBundle, pool: TeacherPool, device: torch.device,
                       dtype: Optional[torch.dtype], shard_images: int = DEFAULT_SHARD_IMAGES,
                       progress: bool = True) -> Path:
    """Build (or finish, or repair) the recipe's cache and return its folder."""
    spec = recipe_cache_spec(recipe, bundle, pool, dtype)
    folder = cache_root() / spec["key"]
    batch = distributed.local_batch_size(recipe.data.eval_batch_size or 2 * recipe.data.batch_size)
    build_shards(folder, spec, bundle.train, pool, device, dtype, batch, recipe.data.num_workers, shard_images,
                 progress)
    return folder


def training_cache(recipe: Any, bundle: DataBundle, pool: TeacherPool, device: torch.device,
                   dtype: Optional[torch.dtype]) -> TeacherCache:
    """Return the cache ``run.teacher_cache`` names for this recipe (``auto``: built when absent)."""
    spec = recipe_cache_spec(recipe, bundle, pool, dtype)
    setting = recipe.run.teacher_cache
    key = spec["key"] if setting == "auto" else setting
    folder = cache_root() / key
    if setting == "auto" and not (folder / "index.json").is_file():
        build_recipe_cache(recipe, bundle, pool, device, dtype, progress=recipe.run.progress)
    cache = open_cache(folder, {k: v for k, v in spec.items() if k != "key"}, rebuild_hint())
    if distributed.is_main():
        print(f"teacher cache: {folder} ({len(cache)} image views, top-{spec['top_k']}, "
              f"{cache.nbytes / 2**20:.0f} MiB)", flush=True)
    return cache
