"""Plots of a run directory: teacher weights and validation accuracy per epoch.

``plot_run(run_dir)`` reads ``run_dir/summary.csv`` (written by the engine) and draws
``run_dir/weights.png``: the mean logit-level and feature-level weight of every teacher per
epoch (``w_logit_mean/<teacher>``, ``w_feat_mean/<teacher>``, shaded +- the per-sample std),
and validation top-1. Uses matplotlib's Agg canvas directly (no global backend switch, no
display needed). Also ``distill-plot RUN_DIR``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Union

from .errors import DistillError

LEVELS = (("logit", "logit-level teacher weight w_l"), ("feat", "feature-level teacher weight w_f"))


def read_summary(run_dir: Union[str, Path]) -> List[Dict[str, float]]:
    """Return the rows of ``run_dir/summary.csv`` as floats (blank cells are NaN)."""
    path = Path(run_dir) / "summary.csv"
    if not path.is_file():
        raise DistillError(f"{path}: not found (is {run_dir} a run directory with at least one finished epoch?)")
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value) if value not in (None, "") else math.nan
                except ValueError:
                    parsed[key] = math.nan
            rows.append(parsed)
    if not rows:
        raise DistillError(f"{path}: has no epochs yet")
    return rows


def plot_run(run_dir: Union[str, Path]) -> Path:
    """Draw teacher weights (logit and feature level) and val top-1 per epoch; return the PNG path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    rows = read_summary(run_dir)
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
    columns = list(rows[0].keys())
    for r in rows[1:]:
        columns += [k for k in r if k not in columns]
    teachers = [c.split("/", 1)[1] for c in columns if c.startswith("w_logit_mean/")]

    fig = Figure(figsize=(6.4, 9.0 if teachers else 3.4), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3 if teachers else 1, 1, sharex=True, squeeze=False)[:, 0]
    if teachers:
        for ax, (level, title) in zip(axes[:2], LEVELS):
            for name in teachers:
                mean = [r.get(f"w_{level}_mean/{name}", math.nan) for r in rows]
                std = [r.get(f"w_{level}_std/{name}", math.nan) for r in rows]
                (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=name)
                if not any(math.isnan(s) for s in std):
                    ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                    color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_ylabel("weight (mean ± std)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    ax = axes[-1]
    ax.plot(epochs, [r.get("val_top1", math.nan) for r in rows], marker="o", markersize=3, color="black",
            label="val top-1")
    if "train_top1" in columns:
        ax.plot(epochs, [r.get("train_top1", math.nan) for r in rows], linestyle="--", color="gray",
                label="train top-1")
    ax.set_ylabel("top-1 (%)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("student accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    out = run_dir / "weights.png"
    fig.savefig(out, dpi=110)
    return out
