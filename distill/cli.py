"""Command line: ``distill-train``, ``distill-eval``, ``distill-zoo``, ``distill-plot``,
``distill-push``, ``distill-cache``, ``distill-pool`` (also ``python -m distill.cli {train,eval,...,pool} ...``).

User errors (bad recipe, unknown model, missing data, corrupt file) print one line
``error: ...`` and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional

from .cli_parser import CommandParser, run_subcommand


def _one_line(message: str) -> str:
    """Return a DistillError message on one line (one re-raised from a DataLoader worker keeps only its own)."""
    if "Original Traceback" in message:  # DataLoader worker: the last line is 'module.Type: message'
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        message = last.split(": ", 1)[1] if "Error: " in last else last
    return " ".join(message.split("\n"))


def _guarded(main: Callable[[List[str]], int]) -> Callable[[Optional[List[str]]], int]:
    def run(argv: Optional[List[str]] = None) -> int:
        from .errors import DistillError

        try:
            return main(sys.argv[1:] if argv is None else argv)
        except DistillError as exc:
            print(f"error: {_one_line(str(exc))}", file=sys.stderr)
            return exc.exit_code

    def entry(argv: Optional[List[str]] = None) -> int:
        code = run(argv)
        if argv is None:
            sys.exit(code)
        return code

    return entry


def _add_offline(parser: argparse.ArgumentParser, extra: str = "") -> None:
    """Add ``--offline`` / ``--no-download`` (one flag, two names): no network for weights, the Hub and data."""
    parser.add_argument("--offline", "--no-download", dest="offline", action="store_true",
                        help="no network: weights, Hub models and datasets from local files and caches only" + extra)


def _train(argv: List[str]) -> int:
    parser = CommandParser(
        prog="distill-train", description="Distil a student from a pool of teachers as a recipe says.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="dotted overrides, e.g. optim.lr=0.1 schedule.epochs=10")
    parser.add_argument("--resume", action="store_true", help="continue every phase from its last checkpoint")
    parser.add_argument("--output-dir", help="run directory (default: the recipe's output_dir or runs/<name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build every model and run one step on a synthetic batch; no data needed, nothing written")
    _add_offline(parser, "; with --dry-run unreachable weights become random init")
    args = parser.parse_intermixed_args(argv)

    import contextlib

    from .fetch import offline
    from .recipe_load import load_recipe
    from .runlock import run_lock

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    if args.dry_run:
        from .dryrun import dry_run

        print(dry_run(load_recipe(args.recipe, overrides, check_data=False), offline=args.offline).table())
        return 0
    recipe = load_recipe(args.recipe, overrides + (["data.download=false"] if args.offline else []))
    from . import distributed
    from .pipeline import RecipeRunner

    distributed.init_from_env(recipe.run.device)  # under torchrun: DDP (gloo on CPU, nccl on CUDA)
    main = distributed.is_main()
    try:  # one run per directory (rank 0 holds the lock for all ranks)
        with run_lock(recipe.run_dir) if main else contextlib.nullcontext(), offline(args.offline):
            report = RecipeRunner(recipe, resume=args.resume).run()
    finally:
        distributed.shutdown()
    if main:
        print(report.table())
        print(f"run directory: {recipe.run_dir}")
    return 0


def parse_eval_args(argv: List[str]) -> argparse.Namespace:
    """Return ``distill-eval``'s checked arguments; a bad one is a DistillError naming it."""
    parser = CommandParser(
        prog="distill-eval", description="Evaluate a run, checkpoint or any resolvable model on a test split.")
    parser.add_argument("spec", help="run directory, checkpoint .safetensors, timm / zoo name, hf-hub:..., local-dir:...")
    parser.add_argument("--dataset", required=True, help="digits | cifar10 | cifar100 | imagefolder")
    parser.add_argument("--data-dir", help="dataset folder (default: $DISTILL_HOME/datasets/<dataset>)")
    parser.add_argument("--weights", help="local weights file for the architecture SPEC")
    parser.add_argument("--no-pretrained", action="store_true", help="random init (timm names are pretrained by default)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--subset", type=int, help="evaluate on N class-balanced images")
    parser.add_argument("--device", default="auto")
    _add_offline(parser)
    args = parser.parse_args(argv)

    from .data import DATASETS, dataset_key
    from .errors import DistillError, close_matches
    from .recipe import is_device_name

    if dataset_key(args.dataset) not in DATASETS:
        raise DistillError(f"--dataset: unknown dataset {args.dataset!r}{close_matches(args.dataset, DATASETS)}")
    for name in ("batch_size", "num_workers", "subset"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_workers" else 1):
            raise DistillError(f"--{name.replace('_', '-')}: must be >= {0 if name == 'num_workers' else 1}, "
                               f"got {value}")
    if not is_device_name(args.device):
        raise DistillError(f"--device: {args.device!r} is not auto, cpu, cuda or cuda:N")
    if args.weights is not None and args.no_pretrained:
        raise DistillError("--no-pretrained: contradicts --weights (a weights file is loaded, not random init)")
    return args


def _eval(argv: List[str]) -> int:
    args = parse_eval_args(argv)

    import torch

    from .classes import fit_class_count
    from .data import build_data, build_loader, dataset_info
    from .engine import evaluate
    from .fetch import offline
    from .recipe import DataConfig
    from .resolve import resolve_model
    from .runtime import resolve_device

    info = dataset_info(args.dataset, "--dataset")
    with offline(args.offline):
        resolved = resolve_model(args.spec, pretrained=not args.no_pretrained and args.weights is None,
                                 weights=args.weights, num_classes=info.num_classes,
                                 in_chans=info.channels, where="spec")
        cfg = DataConfig(dataset=args.dataset, root=args.data_dir, download=not args.offline, augment="none",
                         num_workers=args.num_workers, val_subset=args.subset)
        if resolved.data is not None:
            cfg.mean, cfg.std = list(resolved.data.mean), list(resolved.data.std)
            if not info.fixed_size:  # image files of any size: evaluated at the model's resolution
                cfg.input_size = resolved.data.input_size[-1]
        bundle = build_data(cfg)
    model = resolved.model
    fit_class_count(model, bundle.num_classes, args.spec, args.dataset, trained_here=False, weights_file=args.weights)
    device = resolve_device(args.device)
    model.to(device).eval()
    loader = build_loader(bundle.val, args.batch_size, False, args.num_workers, 0)
    with torch.inference_mode():
        metrics = evaluate(model, loader, device, progress=sys.stderr.isatty())
    print(f"{args.spec} on {args.dataset} ({len(bundle.val)} images)")
    print(f"top1={metrics['top1']:.2f} top5={metrics['top5']:.2f}")
    return 0


def _zoo(argv: List[str]) -> int:
    parser = CommandParser(prog="distill-zoo", description="List the zoo's models and teacher pools.")
    parser.add_argument("what", nargs="?", choices=("models", "pools", "all"), default="all",
                        help="what to list (default all)")
    args = parser.parse_args(argv)

    import timm

    import zoo

    if args.what in ("models", "all"):
        print("zoo models (timm names; pretrained tags after the dot):")
        for name in zoo.list_models():
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(name + ".*") if "." in t]
            tags = [t for t in tags if t]
            print(f"  {name:<24} {', '.join(tags)}")
    if args.what in ("pools", "all"):
        print("teacher pools:")
        for name in zoo.list_pools():
            pool = zoo.get_pool(name)
            print(f"  {name:<16} [{pool.dataset}] {', '.join(pool.teachers)}")
            print(f"  {'':<16} {pool.description}")
    return 0


def _plot(argv: List[str]) -> int:
    parser = CommandParser(
        prog="distill-plot", description="Draw a run's teacher weights and val top-1 per epoch to RUN_DIR/weights.png.")
    parser.add_argument("run_dir", help="a run directory holding summary.csv")
    args = parser.parse_args(argv)

    from .plot import plot_run

    print(plot_run(args.run_dir))
    return 0


def parse_push_args(argv: List[str]) -> argparse.Namespace:
    """Return ``distill-push``'s checked arguments; a bad one is a DistillError naming it."""
    parser = CommandParser(
        prog="distill-push",
        description="Share a run's distilled student on the Hugging Face Hub in timm's layout (config.json, "
                    "model.safetensors, README.md model card, weights.png if drawn). The token comes from the "
                    "environment (HF_TOKEN) or `hf auth login`.")
    parser.add_argument("run_dir", help="a finished run directory")
    parser.add_argument("--repo-id", help="ORG/NAME of the Hub model repository (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--checkpoint", choices=("best", "last", "ema"), default="best",
                        help="which weights (default best; ema: the last checkpoint's EMA student, run.ema)")
    parser.add_argument("--local-dir", help="write the files to this folder instead of uploading")
    args = parser.parse_args(argv)

    from .errors import DistillError
    from .hub import check_repo_id

    if args.repo_id is not None:
        check_repo_id(args.repo_id)
    if args.local_dir is None and args.repo_id is None:
        raise DistillError("--repo-id: give --repo-id ORG/NAME to upload, or --local-dir DIR to only write the files")
    if args.revision is not None and not args.revision.strip():
        raise DistillError("--revision: an empty branch name")
    return args


def _push(argv: List[str]) -> int:
    args = parse_push_args(argv)

    from .hub import export_run, push_run

    if args.local_dir is not None:
        files = export_run(args.run_dir, args.local_dir, args.checkpoint, args.repo_id)
        print(f"wrote {', '.join(p.name for p in files)} to {args.local_dir}")
        return 0
    url = push_run(args.run_dir, args.repo_id, private=args.private, revision=args.revision,
                   checkpoint=args.checkpoint)
    print(f"pushed the {args.checkpoint} student of {args.run_dir} to {args.repo_id}: {url}")
    return 0


POOL_CHECK_HELP = "run every teacher as training runs it on the recipe's data and report on the pool"


def _pool(argv: List[str]) -> int:
    return run_subcommand("distill-pool", "Know a recipe's teacher pool before training.",
                          {"check": (POOL_CHECK_HELP, _pool_check)}, argv)


def _pool_check(argv: List[str]) -> int:
    check = CommandParser(
        prog="distill-pool check",
        description="Run every teacher as training runs it (input adaptation, resolution, normalisation, "
                    "precision) on the recipe's data; print per-teacher accuracy, calibration, class-order "
                    "findings and verdicts, the pool's agreement and ensembles; write pool_report.json and "
                    "pool_report.png.")
    check.add_argument("recipe", help="recipe YAML file")
    check.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. data.root=/data/cifar10")
    check.add_argument("--split", choices=("train", "val"), default="val",
                       help="val: the test images (default); train: the training images as training loads them")
    check.add_argument("--limit", type=int, help="check a class-balanced subset of N images")
    check.add_argument("--output-dir", help="where to write the report (default: <run dir>/pool_check)")
    _add_offline(check)
    args = check.parse_intermixed_args(argv)

    from pathlib import Path

    from .errors import DistillError
    from .fetch import offline
    from .pool_command import check_pool
    from .pool_report import format_table, write_report
    from .recipe_load import load_recipe

    if args.limit is not None and args.limit < 1:
        raise DistillError(f"--limit: must be >= 1, got {args.limit}")
    recipe = load_recipe(args.recipe, list(args.overrides) + (["data.download=false"] if args.offline else []))
    with offline(args.offline):
        report = check_pool(recipe, args.split, args.limit, progress=recipe.run.progress and sys.stderr.isatty())
    out_dir = Path(args.output_dir) if args.output_dir else recipe.run_dir / "pool_check"
    json_path, figure = write_report(report, out_dir)
    print(format_table(report))
    print(f"report: {json_path}\nfigure: {figure}")
    return 0


def _cache(argv: List[str]) -> int:
    from .cache_cli import main as cache_cli

    return cache_cli(argv)


train_main = _guarded(_train)
eval_main = _guarded(_eval)
zoo_main = _guarded(_zoo)
plot_main = _guarded(_plot)
push_main = _guarded(_push)
cache_main = _guarded(_cache)
pool_main = _guarded(_pool)

_COMMANDS = {
    "train": ("distil a student from a pool of teachers as a recipe says (distill-train)", train_main),
    "eval": ("evaluate a model, checkpoint or run on a dataset's test split (distill-eval)", eval_main),
    "zoo": ("list the zoo's models and teacher pools (distill-zoo)", zoo_main),
    "plot": ("draw a run's teacher weights and val top-1 per epoch (distill-plot)", plot_main),
    "push": ("share a run's distilled student on the Hugging Face Hub (distill-push)", push_main),
    "cache": ("build or describe a teacher-output cache (distill-cache)", cache_main),
    "pool": ("check a recipe's teacher pool on its data before training (distill-pool)", pool_main),
}


def _module_main(argv: List[str]) -> int:
    return run_subcommand("python -m distill.cli", "distill's commands in one entry point.", _COMMANDS, argv)


main = _guarded(_module_main)
main.__doc__ = """``python -m distill.cli {train,eval,zoo,plot,push,cache,pool} ...``; returns the exit code."""


if __name__ == "__main__":
    sys.exit(main())
