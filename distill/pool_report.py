"""``distill-pool check``'s outputs: the terminal table, ``pool_report.json`` and ``pool_report.png``
(pairwise top-1 agreement heatmap beside per-teacher top-1 / ECE bars)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Dict, Tuple

from .fileio import ensure_dir, write_text

REPORT_FILE = "pool_report.json"
FIGURE_FILE = "pool_report.png"


def format_table(report: Dict[str, Any]) -> str:
    """Return the report as aligned text: per-teacher metrics, agreement and KL matrices, ensembles, verdicts."""
    teachers = report["teachers"]
    width = max(len(t["name"]) for t in teachers) + 2
    lines = [f"pool check of {report['recipe']} on {report['dataset']} {report['split']} ({report['images']} images, "
             f"{report['num_classes']} classes, chance {report['chance']:.1f}%; {report['device']}, "
             f"{report['precision']}, {report['seconds']:.1f} s)", ""]
    head = f"{'teacher':<{width}}{'top1':>7}{'top5':>7}{'NLL':>7}{'ECE':>7}{'conf':>7}  {'class top1 min/med/max':<23}" \
           f"{'nonfin':>7}  verdict"
    lines.append(head)
    for t in teachers:
        c = t["class_top1"]
        per_class = f"{c['min']:.1f}/{c['median']:.1f}/{c['max']:.1f}"
        lines.append(f"{t['name']:<{width}}{t['top1']:>7.2f}{t['top5']:>7.2f}{t['nll']:>7.3f}{t['ece']:>7.3f}"
                     f"{t['mean_confidence']:>7.3f}  {per_class:<23}{t['non_finite']:>7}  {t['verdict']}")
    lines += ["", f"equal-weight ensemble top-1 (mean of probabilities): {report['ensemble_top1']:.2f}",
              f"log-space mixture top-1 (mean of log-probabilities):  {report['mixture_top1']:.2f}"]
    if len(teachers) > 1:
        for title, key, fmt in (("pairwise top-1 agreement (%)", "agreement", "{:>7.1f}"),
                                ("mean KL(row || column) (nats)", "mean_kl", "{:>7.3f}")):
            lines += ["", title, " " * width + "".join(f"{'#' + str(j):>7}" for j in range(len(teachers)))]
            for i, row in enumerate(report[key]):
                lines.append(f"{'#' + str(i) + ' ' + teachers[i]['name'][:width - 4]:<{width}}"
                             + "".join(fmt.format(v) for v in row))
    lines += ["", "verdicts"]
    for t in teachers:
        lines.append(f"  {t['name']}: {t['verdict']}: {t['reason']}")
        perm = t["permutation"]
        if perm["found"]:
            lines.append(f"    class order: {perm['moved']} of {report['num_classes']} classes move; top-1 after it "
                         f"{perm['top1_after']:.2f}%; fix: {perm['line']}")
        elif not perm["assessed"]:
            lines.append(f"    class order not assessed: {perm['why']}")
    for s in report.get("skipped", []):
        lines.append(f"  teachers[{s['index']}] {s['model']}: skipped: {s['reason']}")
    return "\n".join(lines)


def write_figure(report: Dict[str, Any], path: Path) -> Path:
    """Draw the agreement heatmap and the per-teacher bars to ``path`` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = report["teachers"]
    m = len(teachers)
    labels = [f"#{i}" for i in range(m)]
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(5 + 1.2 * m, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    image = ax_a.imshow(report["agreement"], vmin=0, vmax=100, cmap="viridis")
    for i in range(m):
        for j in range(m):
            value = report["agreement"][i][j]
            ax_a.text(j, i, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black")
    ax_a.set_xticks(range(m), labels)
    ax_a.set_yticks(range(m), labels)
    ax_a.set_title("top-1 agreement (%)")
    fig.colorbar(image, ax=ax_a, fraction=0.046)
    top1 = [t["top1"] for t in teachers]
    colours = {"keep": "tab:green", "check": "tab:orange", "drop": "tab:red"}
    bars = ax_b.bar(labels, top1, color=[colours[t["verdict"]] for t in teachers])
    for bar, t in zip(bars, teachers):
        ax_b.text(bar.get_x() + bar.get_width() / 2, max(bar.get_height() / 2, 3), f"{t['top1']:.1f}\nECE {t['ece']:.2f}",
                  ha="center", va="center", fontsize=8)
        if t["permutation"]["found"]:
            ax_b.bar(bar.get_x() + bar.get_width() / 2, t["permutation"]["top1_after"], width=bar.get_width(),
                     fill=False, hatch="//", edgecolor="tab:orange", label="after the class map")
    ax_b.axhline(report["chance"], color="grey", ls=":", label=f"chance {report['chance']:.1f}%")
    ax_b.axhline(report["ensemble_top1"], color="tab:blue", ls="--", label=f"ensemble {report['ensemble_top1']:.1f}%")
    ax_b.axhline(report["mixture_top1"], color="tab:purple", ls="-.", label=f"mixture {report['mixture_top1']:.1f}%")
    ax_b.set_ylim(0, 115)
    ax_b.set_ylabel(f"top-1 (%) on {report['images']} {report['split']} images")
    ax_b.set_title("teachers (green keep, orange check, red drop)", fontsize=9)
    handles, names = ax_b.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax_b.legend(unique.values(), unique.keys(), fontsize=7, loc="upper right")
    legend = textwrap.wrap("   ".join(f"#{i} {t['name']}" for i, t in enumerate(teachers)), 170)
    fig.text(0.01, 0.01, "\n".join(legend), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.035 * (len(legend) + 0.5), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: Dict[str, Any], out_dir: Path) -> Tuple[Path, Path]:
    """Write ``pool_report.json`` and ``pool_report.png`` to ``out_dir``; return their paths."""
    out_dir = ensure_dir(out_dir, "pool check output directory")
    json_path = out_dir / REPORT_FILE
    write_text(json_path, json.dumps(report, indent=1))
    return json_path, write_figure(report, out_dir / FIGURE_FILE)

