"""Policy-discrimination benchmark: teacher pools with a known right answer.

Each "recipe" of the study config (``benchmarks/configs/discrimination.yaml``) is a pool
built from the real pretrained CIFAR-10 ResNets, some of them corrupted in a known way by
a ``corrupt: {teacher index: kind}`` entry (stripped before the recipe is validated). The
kinds (``shift``, ``noise_feature``, ``blind``, ``dark``, ``dark_shuffled``, ``noise_half``) are defined and
documented in :mod:`benchmarks.corruptions`; one more, ``specialist``, is not a corruption:
the teacher (which must have ``train: {epochs, lr}``) is trained here on the training
samples of its half of the classes ``{c : c mod 2 = index mod 2}`` only, with a head over
all classes, once per (pool, seed) in ``<out>/_teachers/`` and shared by every policy.

An identical pool (four copies of one teacher) is in the config too: weights must stay
uniform. Everything else is :mod:`benchmarks.accuracy` (runs, resume, results.csv,
results.md, val_top1.png); this script adds the table of the mean weight on each teacher
(last epoch, logit and feature level, mean over seeds), the share of the corrupted
teachers relative to the uniform share ``1/M`` and, for ``dark`` / ``dark_shuffled`` / ``noise_half`` teachers,
the weight on their corrupted (sample, teacher) pairs (their top-1 in their half) and on
their clean ones, relative to ``1/M``, recorded during training in ``pair_weights.json``.

Loss scale. ``scales: {label: {alpha: a, beta: b}}`` runs every policy at each effective
scale: ``a`` times the sum of its logit weights and ``b`` times the sum of its feature
weights per sample (``over_m: true``: ``a / M`` and ``b / M``, M the pool's teachers). A
policy whose weights rows sum to 1 runs with ``distill.alpha = a, beta = b``; CA-MKD as
published divides its weighted sums by M (its weights sum to 1/M), so it runs with ``alpha =
a M, beta = b M``. The sum is measured on the policy itself (:func:`term_scale`). Policy
labels become ``<policy>@<scale>``.

    python benchmarks/discrimination.py benchmarks/configs/discrimination.yaml --set data.root=/data/cifar10 --threads 1
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import accuracy  # noqa: E402
from corruptions import KINDS, SPECIALIST, WATCHED_KINDS, corrupt_teacher, corrupted_pairs, half_classes  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.plot import read_summary  # noqa: E402


def term_scale(policy: str, args: Dict[str, Any], num_teachers: int) -> Tuple[float, float]:
    """Return what policy ``policy`` multiplies alpha and beta by when its weights rows sum to 1:
    its logit and feature terms for equal weights ``1/M`` and per-teacher losses of 1 (1.0 for
    a plain weighted sum, ``1/M`` for CA-MKD as published)."""
    from distill.policies import build_policy
    from distill.policies.base import Weights
    from distill.signals import Signals

    built = build_policy(policy, num_teachers, dict(args))
    ones = torch.ones(num_teachers, 1)
    uniform = torch.full((1, num_teachers), 1.0 / num_teachers)
    signals = Signals(torch.ones(1), ones, ones, ones, ones, ones)
    try:
        logit = built.logit_term(Weights(uniform, uniform), signals, None, None, 4.0)
    except (AttributeError, TypeError):
        raise DistillError(f"scales: the logit term of policy {policy!r} is not a weighted sum of per-teacher "
                           "losses; run it without scales") from None
    return float(logit), float(built.feature_term(Weights(uniform, uniform), signals))


class PairWeights:
    """Records, per epoch, the mean weight a policy gives to the corrupted (sample, teacher)
    pairs of ``dark`` / ``noise_half`` teachers (a ``specialist``'s: the samples outside its
    half) and to their clean pairs, logit and feature level, relative to the uniform share
    (``M * w``), in ``path`` (JSON, rewritten each epoch)."""

    def __init__(self, path: Path, corruptions: Dict[int, str]):
        self.path = path
        self.corruptions = {m: k for m, k in corruptions.items() if k in WATCHED_KINDS}
        self.epochs: Dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.sums: Optional[Tensor] = None  # (2 corrupted / clean, 2 levels, M) weight sums
        self.counts: Optional[Tensor] = None  # (2, M) pair counts

    def attach(self, policy) -> None:
        """Wrap ``policy.weights`` and ``policy.end_epoch`` of this run's policy (weights unchanged)."""
        weights, end_epoch = policy.weights, policy.end_epoch

        def recorded_weights(signals, teachers, student, target):
            out = weights(signals, teachers, student, target)
            self.add(out, teachers.logits, target)
            return out

        def recorded_end_epoch(epoch: int) -> Dict[str, float]:
            metrics = end_epoch(epoch)
            self.write(epoch)
            return metrics

        policy.weights, policy.end_epoch = recorded_weights, recorded_end_epoch

    @torch.no_grad()
    def add(self, weights, logits: Tensor, target: Tensor) -> None:
        """Add one step's weights ``(B, M)`` per level; ``logits (M, B, C)`` and labels ``target
        (B,)`` locate the pairs."""
        corrupted = corrupted_pairs(logits, self.corruptions, target).double()  # (M, B)
        watched = torch.zeros_like(corrupted)
        watched[list(self.corruptions)] = 1.0
        masks = torch.stack([corrupted, watched - corrupted])  # (2, M, B)
        w = torch.stack([weights.logit, weights.feat]).double().transpose(1, 2)  # (2 levels, M, B)
        sums = torch.einsum("kmb,lmb->klm", masks, w)
        counts = masks.sum(2)
        self.sums = sums if self.sums is None else self.sums + sums
        self.counts = counts if self.counts is None else self.counts + counts

    def write(self, epoch: int) -> None:
        """Store the epoch's means (``M * w``) per watched teacher and start the next epoch."""
        if self.sums is not None and self.corruptions:
            m_total = self.sums.shape[-1]
            out = {}
            levels = ("logit", "feat")
            for m in self.corruptions:
                out[str(m)] = {part: {"pairs": int(self.counts[k, m]),
                                      **{lv: float(self.sums[k, j, m] / self.counts[k, m] * m_total)
                                         if self.counts[k, m] else float("nan") for j, lv in enumerate(levels)}}
                               for k, part in enumerate(("corrupted", "clean"))}
            self.epochs[str(epoch)] = out
            self.path.write_text(json.dumps(self.epochs, indent=1))
        self.sums = self.counts = None


@contextlib.contextmanager
def recording_pairs(run_dir: Path, corruptions: Dict[int, str]) -> Iterator[None]:
    """Within the block, the distillation run's policy records :class:`PairWeights` into
    ``run_dir/pair_weights.json`` (the task of the TrainStep the pipeline builds gets it attached)."""
    import distill.pipeline as pipeline

    if not any(k in WATCHED_KINDS for k in corruptions.values()):
        yield
        return
    original = pipeline.build_train_step
    recorder = PairWeights(run_dir / "pair_weights.json", corruptions)

    def build(*args, **kwargs):
        step = original(*args, **kwargs)
        if step.task.policy is not None:  # the distillation run (a teacher's own training has none)
            recorder.attach(step.task.policy)
        return step

    pipeline.build_train_step = build
    try:
        yield
    finally:
        pipeline.build_train_step = original


class DiscriminationStudy(accuracy.Study):
    """A study whose recipes may carry ``corrupt: {teacher index: kind}`` and whose config may
    carry ``scales`` (see the module docstring)."""

    def __init__(self, path: Path, extra: Sequence[str] = ()):
        import yaml

        raw = yaml.safe_load(path.read_text()) or {}
        self.corruptions: Dict[str, Dict[int, str]] = {}
        for i, entry in enumerate(raw.get("recipes") or []):
            if isinstance(entry, dict) and "corrupt" in entry:
                name = str(entry.get("name") or f"recipe{i}")
                spec = entry.pop("corrupt") or {}
                bad = [k for k, v in spec.items() if not isinstance(k, int) or v not in KINDS + (SPECIALIST,)]
                if bad:
                    raise DistillError(f"{path}: recipe {name!r}: corrupt must map teacher indices to one of "
                                       f"{', '.join(KINDS + (SPECIALIST,))}; bad entries {bad}")
                self.corruptions[name] = dict(spec)
        self.scales: Dict[str, Dict[str, Any]] = {}
        for label, scale in (raw.pop("scales", None) or {}).items():
            if (not isinstance(scale, dict) or not {"alpha", "beta"} <= set(scale) <= {"alpha", "beta", "over_m"}
                    or not isinstance(scale.get("over_m", False), bool)):
                raise DistillError(f"{path}: scales.{label} must be {{alpha: a, beta: b}} (optionally over_m: "
                                   f"true), got {scale!r}")
            self.scales[str(label)] = {"alpha": float(scale["alpha"]), "beta": float(scale["beta"]),
                                       "over_m": scale.get("over_m", False)}
        self.base_policies: Dict[str, Dict[str, Any]] = {str(k): dict(v or {}) for k, v in
                                                         (raw.get("policies") or {}).items()}
        if self.scales:
            raw["policies"] = {f"{p}@{s}": v for p, v in self.base_policies.items() for s in self.scales}
        super().__init__(path, extra, raw)

    def policy_overrides(self, name: str, policy: str) -> List[str]:
        """Return the policy's recipe overrides; at a scale, with alpha / beta set so that the
        effective scale is the scale's (:func:`term_scale`)."""
        if not self.scales:
            return super().policy_overrides(name, policy)
        base, scale = policy.rsplit("@", 1)
        mapping = dict(self.base_policies[base])
        recipe = self.recipes[name]
        teachers = recipe.get("teachers")
        if not isinstance(teachers, list):
            raise DistillError(f"scales: recipe {name!r} must list its teachers (their count sets CA-MKD's 1/M)")
        distill = recipe.get("distill") or {}
        logit, feat = term_scale(mapping.get("distill.policy", distill.get("policy", "aver")),
                                 mapping.get("distill.policy_args", distill.get("policy_args") or {}), len(teachers))
        chosen = self.scales[scale]
        per = len(teachers) if chosen["over_m"] else 1
        mapping["distill.alpha"] = chosen["alpha"] / per / logit
        mapping["distill.beta"] = chosen["beta"] / per / feat
        return accuracy.overrides(mapping)

    def make_runner(self, name: str, recipe):
        from distill.data import LabeledSubset, build_loader, dataset_targets
        from distill.pipeline import RecipeRunner

        corruptions = self.corruptions.get(name, {})
        shared = self.output_dir / "_teachers" / name / f"seed{recipe.seed}"

        class CorruptingRunner(RecipeRunner):
            def prepare_teacher(self, index, cfg):
                kind = corruptions.get(index)
                if kind == SPECIALIST:
                    return self.prepare_specialist(index, cfg)
                teacher = super().prepare_teacher(index, cfg)
                if not kind:
                    return teacher
                size = teacher.adapter.size
                shape = (self.data_spec.input_size[0], *size) if size else self.data_spec.input_size
                return corrupt_teacher(teacher, kind, index, shape)

            def prepare_specialist(self, index, cfg):
                """Train teacher ``index`` on its half of the classes (once per pool and seed)."""
                if cfg.train is None:
                    raise DistillError(f"recipe {name!r}: teacher {index} is a specialist: give it train: "
                                       "{epochs: N, lr: x} (it is trained here on its half of the classes)")
                half = half_classes(self.bundle.num_classes, index)
                keep = [i for i, t in enumerate(dataset_targets(self.bundle.train)) if half[t]]
                data = recipe.data
                loader = build_loader(LabeledSubset(self.bundle.train, keep), data.batch_size, True,
                                      data.num_workers, recipe.seed)
                saved = self.train_loader, self.run_dir
                self.train_loader, self.run_dir = loader, shared
                try:
                    teacher = super().prepare_teacher(index, cfg)
                finally:
                    self.train_loader, self.run_dir = saved
                teacher.name = f"{teacher.name}+{SPECIALIST}{index % 2}"
                teacher.source = dict(teacher.source, name=teacher.name,
                                      specialist_classes=half.nonzero().flatten().tolist())
                return teacher

            def evaluate_teacher(self, teacher):
                # the same for every policy and seed of a pool: evaluated once, kept in the study folder
                key = f"{name} {teacher.name} {teacher.source.get('sha256')} {recipe.data.val_subset}"
                if key not in memo:
                    memo[key] = super().evaluate_teacher(teacher)
                    memo_path.write_text(json.dumps(memo, indent=1))
                return memo[key]

            def run(self):
                with recording_pairs(self.run_dir, corruptions):
                    return super().run()

        memo_path = self.output_dir / "teacher_metrics.json"
        memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return CorruptingRunner(recipe, resume=True)


def weight_report(study: accuracy.Study) -> str:
    """Return Markdown tables of the last epoch's mean weight on each teacher, mean over seeds;
    the share of the corrupted teachers relative to uniform (``M × w``); and the logit weight on
    (sample, teacher) pairs whose teacher's top-1 is wrong, relative to uniform
    (``w_logit_wrong`` of ``summary.csv``: the per-sample measure, the one that means anything
    on the blind pool)."""
    out = ["## Mean teacher weight in the last epoch (logit / feature level), mean over seeds\n"]
    corruptions = getattr(study, "corruptions", {})
    for name in study.recipes:
        bad = corruptions.get(name, {})
        rows: List[str] = []
        names: List[str] = []
        for policy in study.policies:
            per_seed: List[Dict[str, Any]] = []
            for seed in study.seeds:
                run_dir = study.run_dir(name, policy, seed)
                if (run_dir / "results.json").is_file():
                    per_seed.append(read_summary(run_dir)[-1])
            if not per_seed or not any(k.startswith("w_logit_mean/") for k in per_seed[0]):
                continue
            names = [k.split("/", 1)[1] for k in per_seed[0] if k.startswith("w_logit_mean/")]
            cells = []
            for t in names:
                logit = statistics.mean(r[f"w_logit_mean/{t}"] for r in per_seed)
                feat = statistics.mean(r[f"w_feat_mean/{t}"] for r in per_seed)
                cells.append(f"{logit:.3f} / {feat:.3f}")
            share = ""
            if bad:
                m = len(names)
                worst = []
                for i, kind in bad.items():
                    if kind == SPECIALIST:
                        continue
                    level = "feat" if kind in ("noise_feature", "noise_half") else "logit"
                    w = statistics.mean(r[f"w_{level}_mean/{names[i]}"] for r in per_seed)
                    worst.append(f"{w * m:.2f}×")
                share = ", ".join(worst)
            wrong = [r["w_logit_wrong"] for r in per_seed if r.get("w_logit_wrong") not in (None, "")]
            wrong = [w for w in wrong if w == w]  # NaN: no teacher missed a sample
            on_wrong = f"{statistics.mean(wrong):.2f}×" if wrong else "–"
            rows.append(f"| {policy} | {len(per_seed)} | " + " | ".join(cells) + f" | {share or '–'} | {on_wrong} |")
        if not rows:
            continue
        out.append(f"### {name}\n")
        out.append("| policy | seeds | " + " | ".join(f"`{t}`" for t in names)
                   + " | corrupted / uniform | on wrong / uniform |")
        out.append("|---|---:|" + "---:|" * len(names) + "---:|---:|")
        out += rows
        out.append("")
    return "\n".join(out) + "\n" + pair_report(study)


def pair_report(study: accuracy.Study) -> str:
    """Return a Markdown table per pool with ``dark`` / ``noise_half`` / ``specialist`` teachers:
    per policy, the last epoch's weight on the corrupted and on the clean pairs of each such
    teacher (a specialist's: the samples off and on its half; × the uniform share 1/M; logit /
    feature level), and the final top-1, mean ± std over seeds."""
    out = ["## Weight on corrupted (sample, teacher) pairs, last epoch, × uniform share (mean ± std over seeds)\n"]
    for name in study.recipes:
        watched = {m: k for m, k in getattr(study, "corruptions", {}).get(name, {}).items() if k in WATCHED_KINDS}
        if not watched:
            continue
        rows = []
        for policy in study.policies:
            runs = [study.run_dir(name, policy, s) for s in study.seeds]
            runs = [d for d in runs if (d / "results.json").is_file() and (d / "pair_weights.json").is_file()]
            if not runs:
                continue
            cells = []
            for m in watched:
                for part in ("corrupted", "clean"):
                    for level in ("logit", "feat"):
                        values = []
                        for d in runs:
                            epochs = json.loads((d / "pair_weights.json").read_text())
                            values.append(epochs[max(epochs, key=int)][str(m)][part][level])
                        cells.append(accuracy.mean_std(values))
            top1 = [json.loads((d / "results.json").read_text())["student"]["final_top1"] for d in runs]
            rows.append(f"| {policy} | {len(runs)} | " + " | ".join(cells) + f" | {accuracy.mean_std(top1)} |")
        if not rows:
            continue
        out.append(f"### {name}\n")
        parts = {SPECIALIST: ("off-half", "own-half")}
        heads = [f"{m} {k} {part} {level}" for m, k in watched.items()
                 for part in parts.get(k, ("corrupted", "clean")) for level in ("logit", "feat")]
        out.append("| policy | seeds | " + " | ".join(heads) + " | final top-1 |")
        out.append("|---|---:|" + "---:|" * len(heads) + "---:|")
        out += rows
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(accuracy.main(study_cls=DiscriminationStudy, extra_report=weight_report,
                           description=__doc__.split("\n\n")[0]))
