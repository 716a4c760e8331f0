"""Accuracy study: recipes x weighting policies x seeds, with a table of mean ± std per policy.

A study config (``benchmarks/configs/*.yaml``) names a base recipe (a mapping, or a recipe
file path), the policies to compare (each a set of recipe overrides) and the seeds::

    name: cifar10_cpu
    seeds: [0, 1, 2]
    recipes: [{...a distill recipe...}]      # or paths to recipe files
    policies:
      none: {teachers: [], pool: null}     # the student alone, same schedule
      aver: {distill.policy: aver}
      mtkd_rl: {distill.policy: mtkd_rl}

Every (recipe, policy, seed) is an ordinary :class:`distill.pipeline.RecipeRunner` run in
``<out>/<recipe>/<policy>/seed<seed>``. A run with ``results.json`` is done and skipped; an
interrupted one resumes from its last checkpoint, so rerunning the same command continues
an interrupted sweep where it stopped. After each run, and at the end, the script rewrites
in ``<out>``:

- ``results.csv``: recipe, policy, seed, best_top1, best_epoch, final_top1, epochs, wall_time_s
  (seconds this command spent on the run; ``resumed`` marks runs finished after a restart);
- ``results.md``: per recipe, the teachers' own test top-1 and, per policy, final and best
  top-1 as mean ± sample std over seeds, the per-seed finals, and the paired difference to
  the reference policy (same seed, so the same data order and student initialisation);
- ``val_top1.png``: val top-1 per epoch, mean over seeds per policy (band: min..max).

    python benchmarks/accuracy.py benchmarks/configs/cifar10_cpu.yaml --set data.root=/data/cifar10
    python benchmarks/accuracy.py CONFIG --policies aver mtkd_rl --seeds 0   # a slice of the sweep (also --recipes)
    python benchmarks/accuracy.py CONFIG --report                            # tables and plot only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from distill.errors import DistillError, RecipeError  # noqa: E402
from distill.plot import read_summary  # noqa: E402
from distill.recipe import Recipe  # noqa: E402
from distill.recipe_load import recipe_from_dict  # noqa: E402

FIELDS = ["recipe", "policy", "seed", "best_top1", "best_epoch", "final_top1", "epochs", "wall_time_s", "resumed"]


# ----------------------------------------------------------------------------- the study


def overrides(mapping: Dict[str, Any]) -> List[str]:
    """Return ``{dotted.key: value}`` as ``dotted.key=<JSON>`` recipe overrides (JSON is YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in mapping.items()]


class Study:
    """A parsed study config: base recipes (raw mappings), policies (overrides) and seeds."""

    def __init__(self, path: Path, extra: Sequence[str] = (), raw: Optional[Dict[str, Any]] = None):
        """Parse the config at ``path`` (or ``raw``, its already-loaded mapping) with recipe overrides ``extra``."""
        raw = (yaml.safe_load(path.read_text()) or {}) if raw is None else raw
        unknown = set(raw) - {"name", "description", "seeds", "recipes", "policies", "reference", "output_dir"}
        if unknown:
            raise DistillError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
        self.name = str(raw.get("name") or path.stem)
        self.seeds = [int(s) for s in raw.get("seeds", [0, 1, 2])]
        self.policies: Dict[str, List[str]] = {str(k): overrides(v or {}) for k, v in (raw.get("policies") or {}).items()}
        if not self.policies:
            raise DistillError(f"{path}: 'policies' must map at least one label to recipe overrides")
        self.reference = str(raw.get("reference", "aver" if "aver" in self.policies else next(iter(self.policies))))
        if self.reference not in self.policies:
            raise DistillError(f"{path}: reference {self.reference!r} is not one of the policies "
                               f"({', '.join(self.policies)})")
        self.output_dir = Path(raw.get("output_dir") or f"runs/accuracy/{self.name}")
        self.extra = list(extra)
        self.recipes: Dict[str, Dict[str, Any]] = {}
        for i, entry in enumerate(raw.get("recipes") or []):
            if isinstance(entry, str):
                recipe_path = (path.parent / entry) if not Path(entry).is_absolute() else Path(entry)
                if not recipe_path.is_file():
                    recipe_path = REPO / entry
                entry = yaml.safe_load(recipe_path.read_text())
            if not isinstance(entry, dict):
                raise DistillError(f"{path}: recipes[{i}] must be a recipe mapping or a recipe file path")
            name = str(entry.get("name") or f"recipe{i}")
            self.recipes[name] = entry
        if not self.recipes:
            raise DistillError(f"{path}: 'recipes' must list at least one recipe")
        for name in self.recipes:  # fail on a typo before the first hour of training
            for policy in self.policies:
                self.recipe(name, policy, self.seeds[0], check_data=False)

    def run_dir(self, recipe: str, policy: str, seed: int) -> Path:
        """Return the run directory of one (recipe, policy, seed)."""
        return self.output_dir / recipe / policy / f"seed{seed}"

    def recipe(self, name: str, policy: str, seed: int, check_data: bool = True) -> Recipe:
        """Return the validated recipe of one run (base + policy overrides + --set + seed + dir)."""
        settings = self.policy_overrides(name, policy) + self.extra + [
            f"seed={seed}", f"name={name}-{policy}-seed{seed}",
            f"output_dir={json.dumps(str(self.run_dir(name, policy, seed)))}", "run.progress=false"]
        try:
            return recipe_from_dict(self.recipes[name], settings, check_data=check_data)
        except RecipeError as exc:
            raise DistillError(f"study recipe {name!r}, policy {policy!r}: {exc}") from None

    def policy_overrides(self, name: str, policy: str) -> List[str]:
        """Return the recipe overrides of ``policy`` in recipe ``name`` (a study with per-recipe
        policy settings, such as benchmarks/discrimination.py's loss scales, overrides this)."""
        return self.policies[policy]

    def make_runner(self, name: str, recipe: Recipe):
        """Return the runner of one run of recipe ``name`` (a resuming RecipeRunner; a study
        with modified teachers, such as benchmarks/discrimination.py, overrides this)."""
        from distill.pipeline import RecipeRunner

        return RecipeRunner(recipe, resume=True)

    def runs(self, policies: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
             recipes: Optional[Sequence[str]] = None):
        """Yield (recipe, policy, seed) in sweep order: seed-major, so a partial sweep covers every policy."""
        for seed in seeds if seeds is not None else self.seeds:
            for name in recipes if recipes is not None else self.recipes:
                for policy in policies if policies is not None else self.policies:
                    yield name, policy, seed


def run_one(study: Study, name: str, policy: str, seed: int) -> Dict[str, Any]:
    """Run (or resume) one recipe; return its results.csv row."""
    recipe = study.recipe(name, policy, seed)
    run_dir = recipe.run_dir
    resumed = (run_dir / "last.json").is_file() or (run_dir / "teachers").is_dir()
    started = time.perf_counter()
    study.make_runner(name, recipe).run()
    wall = time.perf_counter() - started
    (run_dir / "sweep.json").write_text(json.dumps({"wall_time_s": wall, "resumed": resumed}))
    return row_of(study, name, policy, seed)


def row_of(study: Study, name: str, policy: str, seed: int) -> Optional[Dict[str, Any]]:
    """Return the results.csv row of a finished run, or None when it has not finished."""
    run_dir = study.run_dir(name, policy, seed)
    if not (run_dir / "results.json").is_file():
        return None
    student = json.loads((run_dir / "results.json").read_text())["student"]
    sweep = json.loads((run_dir / "sweep.json").read_text()) if (run_dir / "sweep.json").is_file() else {}
    return {"recipe": name, "policy": policy, "seed": seed, "best_top1": student["best_top1"],
            "best_epoch": student["best_epoch"] + 1, "final_top1": student["final_top1"],
            "epochs": student["epochs"], "wall_time_s": round(sweep.get("wall_time_s", math.nan), 1),
            "resumed": bool(sweep.get("resumed", False))}


# ----------------------------------------------------------------------------- reports


def mean_std(values: Sequence[float], signed: bool = False) -> str:
    """Return ``mean ± sample std`` of the finite ``values`` (just the value for one, ``–`` for
    none); ``signed`` writes the mean with its sign, for differences."""
    values = [v for v in values if v == v]
    if not values:
        return "–"
    mean = f"{statistics.mean(values):{'+' if signed else ''}.2f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.2f}"


def teacher_rows(study: Study, name: str) -> List[Dict[str, Any]]:
    """Return the teachers' test metrics of recipe ``name`` from its first finished run with teachers."""
    for policy in study.policies:
        for seed in study.seeds:
            path = study.run_dir(name, policy, seed) / "results.json"
            if path.is_file():
                teachers = json.loads(path.read_text())["teachers"]
                if teachers:
                    return teachers
    return []


def markdown(study: Study, rows: List[Dict[str, Any]]) -> str:
    """Return the study's Markdown tables (one per recipe)."""
    out = []
    for name in study.recipes:
        mine = [r for r in rows if r["recipe"] == name]
        if not mine:
            continue
        base = study.recipe(name, study.reference, study.seeds[0], check_data=False)
        out.append(f"### {name}: {base.student.model} on {base.data.dataset}, {base.schedule.epochs} epochs\n")
        out.append(f"| model | seeds | final top-1 | best top-1 | final − {study.reference} (paired) | per-seed final |")
        out.append("|---|---:|---:|---:|---:|---|")
        for t in teacher_rows(study, name):
            out.append(f"| teacher {t['name'].split(':', 1)[-1]} | – | {t['top1']:.2f} | – | – | – |")
        ref = {r["seed"]: r["final_top1"] for r in mine if r["policy"] == study.reference}
        for policy in study.policies:
            runs = sorted((r for r in mine if r["policy"] == policy), key=lambda r: r["seed"])
            if not runs:
                continue
            finals = [r["final_top1"] for r in runs]
            paired = [r["final_top1"] - ref[r["seed"]] for r in runs if r["seed"] in ref]
            delta = "–" if policy == study.reference or not paired else mean_std(paired, signed=True)
            seeds = ", ".join(f"{r['final_top1']:.2f}" for r in runs)
            out.append(f"| student, {policy} | {len(runs)} | {mean_std(finals)} | "
                       f"{mean_std([r['best_top1'] for r in runs])} | {delta} | {seeds} |")
        out.append("")
    return "\n".join(out)


def plot(study: Study, path: Path) -> Optional[Path]:
    """Draw val top-1 per epoch (mean over seeds, band min..max) per policy; return the PNG path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(study.recipes)
    fig = Figure(figsize=(6.4, 3.6 * len(names)), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    drawn = False
    for ax, name in zip(axes, names):
        for policy in study.policies:
            curves = [read_summary(d) for d in (study.run_dir(name, policy, s) for s in study.seeds)
                      if (d / "results.json").is_file()]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            epochs = list(range(1, length + 1))
            per_epoch = [[c[e]["val_top1"] for c in curves] for e in range(length)]
            (line,) = ax.plot(epochs, [statistics.mean(v) for v in per_epoch], label=f"{policy} ({len(curves)})")
            ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                            color=line.get_color(), alpha=0.15, linewidth=0)
            drawn = True
        ax.set_title(f"{name}: val top-1 (mean over seeds, band: min..max)", fontsize="medium")
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if not drawn:
        return None
    fig.savefig(path, dpi=120)
    return path


def write_reports(study: Study, extra_report: Optional[Callable[[Study], str]] = None) -> List[Dict[str, Any]]:
    """Rewrite results.csv, results.md (plus ``extra_report(study)``) and val_top1.png from
    every finished run; return the rows."""
    rows = [r for r in (row_of(study, *key) for key in study.runs()) if r is not None]
    study.output_dir.mkdir(parents=True, exist_ok=True)
    with open(study.output_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(study, rows)
    if extra_report is not None:
        text += "\n" + extra_report(study)
    (study.output_dir / "results.md").write_text(text)
    plot(study, study.output_dir / "val_top1.png")
    return rows


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None, study_cls: type = Study,
         extra_report: Optional[Callable[[Study], str]] = None, description: str = "") -> int:
    """Run the sweep of a study config (``study_cls`` parses it); print and write the reports.
    ``extra_report(study)`` returns more Markdown, appended to results.md."""
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="study config (benchmarks/configs/*.yaml)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="recipe overrides applied to every run (e.g. data.root=/data/cifar10)")
    parser.add_argument("--policies", nargs="+", help="run only these policy labels")
    parser.add_argument("--seeds", nargs="+", type=int, help="run only these seeds")
    parser.add_argument("--recipes", nargs="+", help="run only these recipe names")
    parser.add_argument("--out", type=Path, help="output folder (default: the config's output_dir)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--report", action="store_true", help="only rewrite the tables and plot")
    args = parser.parse_args(argv)
    try:
        study = study_cls(args.config, args.set)
        if args.out is not None:
            study.output_dir = args.out
        for label in args.policies or []:
            if label not in study.policies:
                raise DistillError(f"--policies: {label!r} is not in {args.config} ({', '.join(study.policies)})")
        for label in args.recipes or []:
            if label not in study.recipes:
                raise DistillError(f"--recipes: {label!r} is not in {args.config} ({', '.join(study.recipes)})")
        if not args.report:
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            todo = list(study.runs(args.policies, args.seeds, args.recipes))
            for i, (name, policy, seed) in enumerate(todo):
                if row_of(study, name, policy, seed) is not None:
                    print(f"[{i + 1}/{len(todo)}] {name} {policy} seed {seed}: done, skipped", flush=True)
                    continue
                print(f"[{i + 1}/{len(todo)}] {name} {policy} seed {seed}", flush=True)
                row = run_one(study, name, policy, seed)
                print(f"[{i + 1}/{len(todo)}] {name} {policy} seed {seed}: final {row['final_top1']:.2f}, "
                      f"best {row['best_top1']:.2f}, {row['wall_time_s']:.0f} s", flush=True)
                write_reports(study, extra_report)
        write_reports(study, extra_report)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((study.output_dir / "results.md").read_text())
    print(f"wrote {study.output_dir}/results.csv, results.md, val_top1.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
