"""The tail sketch on real logits: four CIFAR-10 ResNets on real CIFAR-10 JPEGs (C = 10).

Small but real (``cache_tails.py`` has C = 1000, synthetic): the akamaster ResNet-20/32/44/56
(``../shared/data/weights``) run on the JPEG CIFAR-10 tarball (``../shared/data``). Each
teacher's sketch basis is fitted, as a cache build fits it, on its logits of the first 200
training images of each class (2,000 rows); the table compares cached vs full logits on the
10,000 test images, for top-``k`` = 2, 3 at T = 1, 2, 4: ``uniform`` (the tail's mass at T
exact, spread evenly) and ``sketch r`` for r = 2, 3, 4. Students as in ``cache_tails.py``
(``random``, ``near``). Each cell is the mean over the four teachers, and the worst one
(largest |KD rel. error|, smallest gradient cosine).

Run: ``python benchmarks/cache_tails_cifar10.py [--work /tmp/cache_tails_cifar10]`` (about
5 minutes on one core: the teachers run on 12,000 images; their logits are kept in
``--work`` and reused by a second run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cache_tails import cached_logits, compare, explained, student_logits  # noqa: E402

from distill.cache.sketch import fit_sketch  # noqa: E402

DEPTHS = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th",
          56: "resnet56-4bfd9763.th"}


def teacher_logits(work: Path) -> Dict[str, Tensor]:
    """Return ``{"fit": (2000, 4, 10), "test": (10000, 4, 10), "labels": (10000,)}`` logits of the four teachers."""
    saved = work / "logits.pt"
    if saved.is_file():
        return torch.load(saved)
    os.environ["DISTILL_HOME"] = str(work / "home")
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import extract_cifar10_jpg

    from distill.data import build_data, build_loader
    from distill.paths import weights_dir
    from distill.recipe import DataConfig
    from distill.resolve import resolve_model

    root = work / "cifar10"
    if not (root / "test").is_dir():
        extract_cifar10_jpg(SHARED / "cifar10-jpg.tar.gz", root)
    weights_dir().mkdir(parents=True, exist_ok=True)
    out: Dict[str, List[Tensor]] = {"fit": [], "test": []}
    labels = None
    for depth, file in DEPTHS.items():
        shutil.copy(SHARED / "weights" / "akamaster_resnet_cifar10" / file, weights_dir())
        resolved = resolve_model(f"cifar_resnet{depth}.akamaster_cifar10", pretrained=True, num_classes=10)
        cfg = DataConfig(dataset="cifar10", root=str(root), download=False, augment="none", num_workers=0)
        cfg.mean, cfg.std = list(resolved.data.mean), list(resolved.data.std)
        bundle = build_data(cfg)
        model = resolved.model.eval()
        for name, dataset in (("fit", bundle.train), ("test", bundle.val)):
            rows, ys = [], []
            with torch.inference_mode():
                for x, y in build_loader(dataset, 250, False, 0, 0):
                    rows.append(model(x).float())
                    ys.append(y)
            out[name].append(torch.cat(rows))
            if name == "test":
                labels = torch.cat(ys)
        print(f"resnet{depth}: test top-1 {(out['test'][-1].argmax(-1) == labels).float().mean():.4f}", flush=True)
    result = {"fit": torch.stack(out["fit"], 1), "test": torch.stack(out["test"], 1), "labels": labels}
    torch.save(result, saved)
    return result


def table(logits: Dict[str, Tensor]) -> str:
    """Return the markdown table of the module docstring."""
    test, fit, labels = logits["test"], logits["fit"], logits["labels"]
    teachers = test.shape[1]
    lines = ["variance of each teacher's test logits in its sketch's subspace (fitted on 2,000 training images): "
             + "; ".join(f"r = {r}: " + ", ".join(f"{explained(test[:, m], fit_sketch(fit[:, m], r)):.2f}"
                                                  for m in range(teachers)) for r in (2, 3, 4)), "",
             "| student | T | k | reconstruction | KD rel. error, mean (worst) | grad cos, mean (worst) "
             "| teacher CE error mean (nats) |", "|---|---|---|---|---|---|---|"]
    for kind in ("random", "near"):
        for temperature in (1.0, 2.0, 4.0):
            for k in (2, 3):
                for r in (0, 2, 3, 4):
                    runs = []
                    for m in range(teachers):
                        z = test[:, m]
                        sketch = fit_sketch(fit[:, m], r) if r else None
                        approx = cached_logits(z, labels, k, temperature, sketch)
                        runs.append(compare(student_logits(z, kind), z, approx, labels, temperature, k))
                    kd = [run["kd_rel"] for run in runs]
                    cos = [run["cos"] for run in runs]
                    ce = sum(run["ce_mean"] for run in runs) / teachers
                    lines.append(f"| {kind} | {temperature:g} | {k} | {f'sketch {r}' if r else 'uniform'} "
                                 f"| {sum(kd) / teachers:+.3f} ({max(kd, key=abs):+.3f}) "
                                 f"| {sum(cos) / teachers:.3f} ({min(cos):.3f}) | {ce:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cache_tails_cifar10"),
                        help="folder for the extracted images and the teachers' logits")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    print(table(teacher_logits(args.work)))


if __name__ == "__main__":
    main()
