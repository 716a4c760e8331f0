"""Know the pool before training: every teacher run as training runs it, measured on the recipe's data.

:class:`PoolStats` accumulates, batch by batch on the device, what ``distill-pool check``
reports (:func:`distill.pool_command.check_pool`) and what the pre-training check reads
(:func:`pre_training_check`):

- per teacher: top-1 / top-5, NLL, expected calibration error (:data:`ECE_BINS` equal-width
  confidence bins), mean confidence, per-class top-1 (min / median / max), the images whose
  outputs hold a non-finite value (counted wrong, left out of NLL / ECE / KL), and the
  confusion counts (true class x predicted class);
- across teachers: pairwise top-1 agreement, mean KL(row teacher || column teacher), the
  top-1 of the equal-weight ensemble (mean of probabilities) and of the log-space mixture
  (mean of log-probabilities, renormalised).

A class-order mismatch shows as a confusion matrix close to a permutation: the assignment
that maximises the matched counts (``scipy.optimize.linear_sum_assignment``) is not the
identity and raises top-1 by at least :data:`PERMUTATION_GAIN` points to at least
:data:`PERMUTED_MIN_TOP1` percent (assessed only with at least :data:`MIN_IMAGES_PER_CLASS`
images per class on average: fewer let the assignment match noise). Verdicts
(:func:`verdict`): ``drop`` (non-finite outputs; top-1 no better than chance: within
:data:`CHANCE_SE` standard errors of a chance-level predictor, or below), ``check``
(another class order; top-1 :data:`BEHIND_POOL` points or more below the other teachers'
median), else ``keep``.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .classmap import classes_line
from .teachers import TeacherPool

ECE_BINS = 15
PERMUTATION_GAIN = 10.0  # top-1 points the assignment must add
PERMUTED_MIN_TOP1 = 50.0  # top-1 (percent) the teacher must reach once permuted
MIN_IMAGES_PER_CLASS = 5  # images per class (on average) below which no permutation is assessed
CHANCE_SE = 3.0  # standard errors of a chance-level predictor's top-1: below chance - margin is "below chance"
BEHIND_POOL = 15.0  # top-1 points below the other teachers' median that earn a `check`
PRECHECK_BATCHES = 4  # the pre-training check reads max(4 batches, 5 images per class) training images


class PoolStats:
    """Sums over the batches seen, on the device, for ``M`` teachers and ``C`` classes."""

    def __init__(self, num_teachers: int, num_classes: int, device: torch.device):
        m, c = num_teachers, num_classes
        z = lambda *shape: torch.zeros(shape, device=device, dtype=torch.float64)  # noqa: E731
        self.m, self.c = m, c
        self.count = 0
        self.top1, self.top5, self.nll, self.conf, self.finite = z(m), z(m), z(m), z(m), z(m)
        self.nonfinite = z(m)
        self.bin_count, self.bin_conf, self.bin_hit = z(m, ECE_BINS), z(m, ECE_BINS), z(m, ECE_BINS)
        self.class_hit, self.class_count = z(m, c), z(c)
        self.confusion = z(m, c * c)
        self.agree, self.kl, self.pair_finite = z(m, m), z(m, m), z(m, m)
        self.ensemble, self.mixture = z(), z()

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add one batch: teachers' logits ``(M, B, C)`` and int labels ``(B,)``."""
        logits = logits.float()
        finite = torch.isfinite(logits).all(-1)  # (M, B)
        logp = torch.log_softmax(torch.where(finite.unsqueeze(-1), logits, torch.zeros_like(logits)), -1)
        p = logp.exp()
        y = target.to(logits.device).long()
        ff = finite.double()
        pred = logp.argmax(-1)  # (M, B)
        hit = (pred == y) & finite
        k = min(5, self.c)
        hit5 = (logp.topk(k, -1).indices == y[None, :, None]).any(-1) & finite
        conf = p.max(-1).values
        self.count += y.shape[0]
        self.top1 += hit.sum(1)
        self.top5 += hit5.sum(1)
        self.finite += ff.sum(1)
        self.nonfinite += (~finite).sum(1)
        self.nll += (-logp.gather(-1, y.expand(self.m, -1).unsqueeze(-1)).squeeze(-1) * ff).sum(1)
        self.conf += (conf * ff).sum(1)
        bins = (conf * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1  # (M, B): bin of (k/15, (k+1)/15]
        self.bin_count.scatter_add_(1, bins, ff)
        self.bin_conf.scatter_add_(1, bins, conf.double() * ff)
        self.bin_hit.scatter_add_(1, bins, hit.double())
        self.class_hit.scatter_add_(1, y.expand(self.m, -1), hit.double())
        self.class_count.scatter_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.confusion.scatter_add_(1, y * self.c + pred, ff)
        self.agree += (pred[:, None] == pred[None]).double().sum(-1)
        both = ff[:, None] * ff[None]  # (M, M, B)
        own = (p * logp).sum(-1)  # (M, B): sum_c p_m log p_m
        cross = torch.einsum("mbc,nbc->mnb", p, logp)  # sum_c p_m log p_n
        self.kl += ((own[:, None] - cross) * both).sum(-1)
        self.pair_finite += both.sum(-1)
        self.ensemble += (p.mean(0).argmax(-1) == y).sum()
        self.mixture += (torch.log_softmax(logp.mean(0), -1).argmax(-1) == y).sum()

    def summary(self, names: Sequence[str], class_maps: Sequence[Optional[List[int]]]) -> Dict[str, Any]:
        """Return the JSON-able report (percentages, nats) of the batches seen (one host sync)."""
        n = max(self.count, 1)
        pct = lambda t: (100.0 * t / n).tolist()  # noqa: E731
        per_finite = lambda t: (t / self.finite.clamp(min=1)).tolist()  # noqa: E731
        ece = ((self.bin_conf - self.bin_hit).abs().sum(1) / self.finite.clamp(min=1)).tolist()
        seen = self.class_count > 0
        class_top1 = (100.0 * self.class_hit[:, seen] / self.class_count[seen]).cpu().numpy()
        confusion = self.confusion.view(self.m, self.c, self.c).cpu().numpy()
        top1 = pct(self.top1)
        teachers = []
        for i, name in enumerate(names):
            per_class = class_top1[i] if class_top1.size else np.zeros(1)
            teachers.append({
                "name": name, "top1": top1[i], "top5": pct(self.top5)[i], "nll": per_finite(self.nll)[i],
                "ece": ece[i], "mean_confidence": per_finite(self.conf)[i],
                "class_top1": {"min": float(per_class.min()), "median": float(np.median(per_class)),
                               "max": float(per_class.max())},
                "non_finite": int(self.nonfinite[i].item()),
                "permutation": find_permutation(confusion[i], self.count, class_maps[i]),
            })
        return {"images": self.count, "num_classes": self.c, "chance": 100.0 / self.c, "teachers": teachers,
                "agreement": (100.0 * self.agree / n).tolist(),
                "mean_kl": (self.kl / self.pair_finite.clamp(min=1)).clamp(min=0).tolist(),  # >= 0 but for rounding
                "ensemble_top1": 100.0 * self.ensemble.item() / n, "mixture_top1": 100.0 * self.mixture.item() / n}


def find_permutation(confusion: np.ndarray, images: int, class_map: Optional[List[int]] = None) -> Dict[str, Any]:
    """Return the class-order finding of one teacher from its confusion counts ``(C, C)`` (true x predicted).

    ``found``: the assignment is not the identity and fits the criteria of the module doc;
    ``classes``: the index list into the model's own outputs that applies it (composed with the
    teacher's ``class_map``), ``line`` its recipe line, ``top1_after`` the top-1 once applied.
    """
    from scipy.optimize import linear_sum_assignment

    c = confusion.shape[0]
    if images < MIN_IMAGES_PER_CLASS * c:
        return {"assessed": False, "found": False,
                "why": f"{images} images for {c} classes (needs {MIN_IMAGES_PER_CLASS} per class)"}
    rows, cols = linear_sum_assignment(confusion, maximize=True)  # rows: 0..C-1 (true class), cols: column
    top1 = 100.0 * np.trace(confusion) / images
    after = 100.0 * confusion[rows, cols].sum() / images
    moved = int((cols != rows).sum())
    found = moved > 0 and after - top1 >= PERMUTATION_GAIN and after >= PERMUTED_MIN_TOP1
    base = class_map if class_map is not None else list(range(c))
    index = [int(base[j]) for j in cols]
    out: Dict[str, Any] = {"assessed": True, "found": bool(found), "top1_after": float(after), "moved": moved}
    if found:
        out.update(classes=index, line=classes_line(index))
    return out


def chance_margin(chance: float, images: int) -> float:
    """Return :data:`CHANCE_SE` standard errors (top-1 points) of a chance-level predictor's top-1 on ``images``."""
    p = chance / 100.0
    return CHANCE_SE * 100.0 * math.sqrt(p * (1.0 - p) / max(images, 1))


def below_chance(top1: float, chance: float, images: int) -> bool:
    """Return True when ``top1`` lies below chance by more than :func:`chance_margin` (systematically wrong)."""
    return top1 < chance - chance_margin(chance, images)


def verdict(teacher: Dict[str, Any], chance: float, images: int, others_top1: Sequence[float]) -> Dict[str, str]:
    """Return ``{'verdict': keep | check | drop, 'reason': ...}`` for one teacher's report (module doc)."""
    top1, perm = teacher["top1"], teacher["permutation"]
    if teacher["non_finite"]:
        return {"verdict": "drop", "reason": f"non-finite outputs on {teacher['non_finite']} images"}
    if perm["found"]:
        return {"verdict": "check", "reason": f"another class order: top-1 {top1:.1f}% -> {perm['top1_after']:.1f}% "
                                              f"with {perm['line']}"}
    if top1 <= chance + chance_margin(chance, images):
        how = "below" if below_chance(top1, chance, images) else "no better than"
        return {"verdict": "drop", "reason": f"top-1 {top1:.1f}% {how} chance ({chance:.1f}%)"}
    if others_top1 and top1 <= statistics.median(others_top1) - BEHIND_POOL:
        return {"verdict": "check", "reason": f"top-1 {top1:.1f}% far below the other teachers' median "
                                              f"({statistics.median(others_top1):.1f}%)"}
    return {"verdict": "keep", "reason": f"top-1 {top1:.1f}%, ECE {teacher['ece']:.3f}"}


def add_verdicts(report: Dict[str, Any]) -> Dict[str, Any]:
    """Set each teacher's ``verdict`` and ``reason`` in ``report`` (in place) and return it."""
    top1 = [t["top1"] for t in report["teachers"]]
    for i, t in enumerate(report["teachers"]):
        t.update(verdict(t, report["chance"], report["images"], top1[:i] + top1[i + 1:]))
    return report


def pool_batches(pool: TeacherPool, loader, device: torch.device, dtype: Optional[torch.dtype],
                 channels_last: bool = False, progress: bool = False,
                 desc: str = "pool check") -> Iterator[Tuple[Tensor, Tensor]]:
    """Yield ``(logits (M, B, C), labels (B,))`` of ``pool`` on ``loader``'s ``(x, y)`` batches, the pool run as
    the training step runs it: on ``device``, under autocast ``dtype``, channels-last when asked."""
    from .runtime import autocast

    pool.to(device)
    if channels_last:
        pool.to(memory_format=torch.channels_last)
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress, file=sys.stderr):
        x = x.to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = pool(x).logits
        yield logits, y  # outside autocast: the statistics are computed in float32


def cached_batches(cache: Any, indices: Sequence[int], targets: Sequence[int], batch_size: int,
                   device: torch.device) -> Iterator[Tuple[Tensor, Tensor]]:
    """Yield ``(logits (M, B, C), labels (B,))`` of training items ``indices`` (view 0) from a teacher cache:
    the outputs training reads (:meth:`distill.cache.store.TeacherCache.lookup`, key ``i * K + v``)."""
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start:start + batch_size])
        keys = torch.tensor(chunk, dtype=torch.long, device=device) * cache.num_views
        yield cache.lookup(keys).logits, torch.tensor([targets[i] for i in chunk])


@torch.no_grad()
def summarise(batches: Iterable[Tuple[Tensor, Tensor]], pool: TeacherPool, num_classes: int,
              device: torch.device) -> Dict[str, Any]:
    """Return the report (with verdicts) of the ``(logits (M, B, C), labels (B,))`` batches of ``pool``."""
    stats = PoolStats(len(pool), num_classes, device)
    for logits, y in batches:
        stats.update(logits, y)
    if not stats.count:
        from .errors import DistillError

        raise DistillError("pool check: the data holds no images")
    return add_verdicts(stats.summary(pool.names, [t.class_map for t in pool.teachers]))


def pre_training_check(pool: TeacherPool, train_set, batch_size: int, device: torch.device,
                       dtype: Optional[torch.dtype], channels_last: bool, num_classes: int, mode: str,
                       say: Callable[[str], None], cache: Any = None) -> Optional[Dict[str, Any]]:
    """Run the cheap check before training (``run.pool_check``) and return its report (None when ``mode``
    is off or the pool is empty): the teachers on a class-balanced slice of the training data
    (max(:data:`PRECHECK_BATCHES` batches, 5 images per class)), run live as training runs them or,
    with a teacher ``cache``, read from it as training reads them. Warns through ``say`` about a
    teacher significantly below chance (:func:`below_chance`) or with another class order;
    ``strict`` raises DistillError instead. The global RNGs are left as they were."""
    from .data import LabeledSubset, balanced_subset, build_loader, dataset_targets
    from .errors import DistillError

    if mode == "off" or not len(pool):
        return None
    started = time.perf_counter()
    n = min(len(train_set), max(PRECHECK_BATCHES * batch_size, MIN_IMAGES_PER_CLASS * num_classes))
    targets = dataset_targets(train_set)
    indices = balanced_subset(targets, n)
    if cache is not None:
        report = summarise(cached_batches(cache, indices, targets, batch_size, device), pool, num_classes, device)
    else:
        loader = build_loader(LabeledSubset(train_set, indices), batch_size, False, 0, 0)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            report = summarise(pool_batches(pool, loader, device, dtype, channels_last), pool, num_classes, device)
        random.setstate(py_state)
    report["seconds"] = time.perf_counter() - started
    problems = [f"teacher {t['name']}: {t['reason']}" for t in report["teachers"]
                if t["permutation"]["found"] or below_chance(t["top1"], report["chance"], report["images"])]
    where = f"on {report['images']} training images{' (teacher cache)' if cache is not None else ''}; " \
            "see distill-pool check RECIPE"
    if problems and mode == "strict":
        raise DistillError(f"run.pool_check=strict: {'; '.join(problems)} ({where})")
    for line in problems:
        say(f"pool check: {line} ({where})")
    return report
