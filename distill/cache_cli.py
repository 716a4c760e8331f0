"""``distill-cache build RECIPE [--views K] [--top-k k] [--sketch R] [overrides]``,
``distill-cache info KEY|RECIPE`` and ``distill-cache verify KEY|RECIPE``.

``info RECIPE`` prints the projected size of the recipe's cache (:mod:`distill.cache.projection`)
before anything is built, then the cache itself when it exists. ``verify`` re-hashes every
file of a finished cache (opening one re-hashes only the files changed since their last
check, :mod:`distill.cache.verify`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .cli_parser import CommandParser, run_subcommand
from .errors import DistillError
from .fileio import read_json
from .cache.store import KEY_LENGTH, cache_root, read_index
from .cache.verify import bad_files, checked_records


def _recipe_parts(recipe_path: str, overrides: List[str]) -> Tuple[Any, Any, Any, Any, Any]:
    """Return ``(recipe, bundle, pool, device, dtype)`` of a recipe file, teachers prepared."""
    from .runtime import autocast_dtype
    from .pipeline import RecipeRunner
    from .recipe_load import load_recipe, teacher_configs
    from .teachers import TeacherPool

    recipe = load_recipe(recipe_path, ["run.teacher_cache=auto", *overrides])
    runner = RecipeRunner(recipe)
    teachers = [runner.prepare_teacher(i, cfg) for i, cfg in enumerate(teacher_configs(recipe))]
    if not teachers:
        raise DistillError(f"{recipe_path}: the recipe has no teachers to cache")
    pool = TeacherPool(teachers).to(runner.device)
    return recipe, runner.bundle, pool, runner.device, autocast_dtype(recipe.run.precision, runner.device)


def _build(args: argparse.Namespace) -> int:
    from . import distributed
    from .cache.recipes import build_recipe_cache

    overrides = list(args.overrides)
    overrides += [f"data.fixed_views={args.views}"] if args.views is not None else []
    overrides += [f"run.teacher_top_k={args.top_k}"] if args.top_k is not None else []
    overrides += [f"run.teacher_cache_sketch={args.sketch}"] if args.sketch is not None else []
    distributed.init_from_env("auto")
    try:
        recipe, bundle, pool, device, dtype = _recipe_parts(args.recipe, overrides)
        folder = build_recipe_cache(recipe, bundle, pool, device, dtype, args.shard_images,
                                    progress=recipe.run.progress)
        main = distributed.is_main()
    finally:
        distributed.shutdown()
    if not main:
        return 0
    print(f"teacher cache: {folder}")
    print(f"train from it with: run.teacher_cache={folder.name} (or auto) data.fixed_views="
          f"{recipe.data.fixed_views}" + (f" run.teacher_top_k={recipe.run.teacher_top_k}"
                                          if recipe.run.teacher_top_k else "")
          + (f" run.teacher_cache_sketch={recipe.run.teacher_cache_sketch}"
             if recipe.run.teacher_cache_sketch is not None else ""))
    return 0


def describe(folder: Path) -> List[str]:
    """Return the lines ``distill-cache info`` prints for a cache folder (finished or partly built)."""
    index = read_index(folder)
    started = folder / "spec.json"
    if index is None and not started.is_file():
        raise DistillError(f"no teacher cache in {folder}")
    head = index if index is not None else read_json(started, "teacher-cache build spec")
    spec = head["spec"]
    records = sorted(folder.glob("shard-*.json"))
    shard_images = int(head["shard_images"])
    items = int(spec["dataset"]["items"])
    built = sum(read_json(r, "teacher-cache shard record")["count"] for r in records)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    per_row = size / max(built * spec["views"] * len(spec["teachers"]), 1)
    return [f"key        {head['key']}",
            f"folder     {folder}",
            f"size       {size / 2**20:.1f} MiB ({per_row:.0f} bytes per image, view and teacher)",
            f"images     {items}",
            f"views      {spec['views']} per image",
            f"teachers   {', '.join(t['name'] for t in spec['teachers'])}",
            f"tap        {spec['teachers'][0]['tap'][0]}",
            f"top-k      {spec['top_k']} of {spec['num_classes']} classes"
            + (f", tails at T = {spec['tail_temperature']:g}" if spec.get("tail_temperature") else "")
            + (f", shaped by a rank-{spec['sketch']} sketch" if spec.get("sketch") else ""),
            f"view seed  {spec['view_seed']}",
            f"autocast   {spec['autocast']}",
            f"coverage   {built}/{items} images ({len(records)} of {-(-items // shard_images)} shards)"
            + ("" if index is not None else ", build unfinished")]


def _info(args: argparse.Namespace) -> int:
    if not Path(args.target).is_file():
        print("\n".join(describe(_cache_folder(args.target, list(args.overrides)))))
        return 0
    from .cache.projection import describe_projection, feature_shapes, project

    recipe, bundle, pool, device, spec = _recipe_spec(args.target, list(args.overrides))
    size = project(len(bundle.train), spec["views"], spec["top_k"], spec["num_classes"],
                   [t["name"] for t in spec["teachers"]], feature_shapes(pool, bundle.input_size, device),
                   spec.get("sketch", 0))
    print("\n".join(describe_projection(size, recipe.distill.features)))
    folder = cache_root() / spec["key"]
    if not (folder / "index.json").is_file() and not (folder / "spec.json").is_file():
        print(f"key        {spec['key']} (not built yet: distill-cache build {args.target})")
        return 0
    print("\n".join(describe(folder)))
    return 0


def _recipe_spec(recipe_path: str, overrides: List[str]) -> Tuple[Any, Any, Any, Any, Dict[str, Any]]:
    """Return ``(recipe, bundle, pool, device, spec)``: a recipe file's parts and its cache's spec with ``key``."""
    from .cache.recipes import recipe_cache_spec

    recipe, bundle, pool, device, dtype = _recipe_parts(recipe_path, overrides)
    return recipe, bundle, pool, device, recipe_cache_spec(recipe, bundle, pool, dtype)


def _cache_folder(target: str, overrides: List[str]) -> Path:
    """Return the cache folder ``target`` names: a cache key, or a recipe file (its cache's key)."""
    if Path(target).is_file():
        return cache_root() / _recipe_spec(target, overrides)[4]["key"]
    if len(target) != KEY_LENGTH:
        raise DistillError(f"{target}: neither a recipe file nor a {KEY_LENGTH}-digit cache key")
    if overrides:
        raise DistillError(f"{target}: overrides ({' '.join(overrides)}) apply to a recipe file, not to a cache key")
    return cache_root() / target


def _verify(args: argparse.Namespace) -> int:
    folder = _cache_folder(args.target, list(args.overrides))
    index = read_index(folder)
    if index is None:
        raise DistillError(f"{folder}: no finished teacher cache there (distill-cache info names what is built)")
    records = checked_records(index)
    bad = bad_files(folder, index, full=True)
    if bad:
        print(f"{folder}: {len(bad)} of {len(records)} files missing or failing their SHA-256: {', '.join(bad)} "
              "(distill-cache build RECIPE rebuilds them)", file=sys.stderr)
        return 1
    size = sum(int(r.get("bytes", 0)) for r in records)
    print(f"{folder}: all {len(records)} files match their SHA-256 ({size / 2**20:.1f} MiB hashed)")
    return 0


def _build_main(argv: List[str]) -> int:
    parser = CommandParser(prog="distill-cache build", description=BUILD_HELP)
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. data.train_subset=4000")
    parser.add_argument("--views", type=int, help="views per image (data.fixed_views; default the recipe's, else 1)")
    parser.add_argument("--top-k", type=int, help="logits kept per teacher and view (run.teacher_top_k; default all)")
    parser.add_argument("--sketch", type=int, help="rank of each teacher's logit sketch shaping the tail beyond "
                        "top-k (run.teacher_cache_sketch; default 32 when more than 32 classes are dropped, 0: none)")
    parser.add_argument("--shard-images", type=int, default=1024, help="images per shard (default 1024)")
    args = parser.parse_intermixed_args(argv)
    if args.shard_images < 1:
        parser.error("--shard-images must be >= 1")
    return _build(args)


def _info_main(argv: List[str]) -> int:
    parser = CommandParser(prog="distill-cache info", description=INFO_HELP)
    parser.add_argument("target", help="a cache key, or a recipe YAML file (its cache)")
    parser.add_argument("overrides", nargs="*", default=[], help="with a recipe: dotted overrides")
    return _info(parser.parse_intermixed_args(argv))


def _verify_main(argv: List[str]) -> int:
    parser = CommandParser(prog="distill-cache verify", description=VERIFY_HELP)
    parser.add_argument("target", help="a cache key, or a recipe YAML file (its cache)")
    parser.add_argument("overrides", nargs="*", default=[], help="with a recipe: dotted overrides")
    return _verify(parser.parse_intermixed_args(argv))


BUILD_HELP = "run the recipe's teachers once per stored view and save their outputs"
VERIFY_HELP = ("re-hash every file of a finished cache against its index (exit 1 naming the files that fail); "
               "opening a cache re-hashes only the files changed since their last check")
INFO_HELP = ("print a cache's size, views, teachers, top-k and coverage; for a recipe, first the projected "
             "size of its cache (built or not)")


def main(argv: List[str]) -> int:
    """Run ``distill-cache``; returns the exit code (user errors raise DistillError)."""
    return run_subcommand("distill-cache", "The teacher-output cache: stored views and the pool's outputs for them.",
                          {"build": (BUILD_HELP, _build_main), "info": (INFO_HELP, _info_main),
                           "verify": (VERIFY_HELP, _verify_main)}, argv)
