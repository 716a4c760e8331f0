"""Policy-discrimination benchmark: teacher pools with a known right answer.

Each "recipe" of the study config (``benchmarks/configs/discrimination.yaml``) is a pool
built from the real pretrained CIFAR-10 ResNets, some of them corrupted in a known way by
a ``corrupt: {teacher index: kind}`` entry (stripped before the recipe is validated):

- ``shift``: the teacher's logits rolled by one class, so it is confidently wrong on every
  sample; its features are intact. Its logit weight must fall.
- ``noise_feature``: the feature the teacher exposes for distillation is noise (a
  deterministic ``sin(1000 x)`` of its real feature map, no class structure left), its
  logits and pre-logit embedding are intact. Its *feature* weight must fall, while
  CE-based weights cannot see the corruption.
- ``blind``: the teacher's logits are rolled by one class on the samples it predicts as one
  of its blind classes ``{c : c mod 4 = index}``. With four blind teachers every sample has
  one confidently wrong teacher, a different one per sample: per-sample weighting matters.

An identical pool (four copies of one teacher) is in the config too: weights must stay
uniform. Everything else is :mod:`benchmarks.accuracy` (runs, resume, results.csv,
results.md, val_top1.png); this script adds the table of the mean weight on each teacher
(last epoch, logit and feature level, mean over seeds) and the share of the corrupted
teachers relative to the uniform share ``1/M``.

    python benchmarks/discrimination.py benchmarks/configs/discrimination.yaml --set data.root=/data/cifar10 --threads 1
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import accuracy  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.plot import read_summary  # noqa: E402
from distill.teachers import Teacher  # noqa: E402

KINDS = ("shift", "noise_feature", "blind")
BLIND_PERIOD = 4


class CorruptedLogits(nn.Module):
    """Logits ``(B, C)`` of a ``shift`` or ``blind`` teacher from its clean logits ``(B, C)``."""

    def __init__(self, kind: str, blind: Tensor):
        super().__init__()
        self.kind = kind
        self.register_buffer("blind", blind, persistent=False)

    def forward(self, logits: Tensor) -> Tensor:
        if self.kind == "shift":
            return logits.roll(1, dims=-1)
        wrong = self.blind[logits.argmax(-1)]
        return torch.where(wrong.unsqueeze(-1), logits.roll(1, dims=-1), logits)


class CorruptedClassifier(nn.Module):
    """The clean classifier followed by :class:`CorruptedLogits`: what ``get_classifier()``
    returns, so that every path to the logits (the tap's split head, CA-MKD's head on a
    projected feature) sees the same corruption."""

    def __init__(self, classifier: nn.Module, corrupt: CorruptedLogits):
        super().__init__()
        self.classifier, self.corrupt = classifier, corrupt

    def forward(self, x: Tensor) -> Tensor:
        return self.corrupt(self.classifier(x))


class CorruptedModel(nn.Module):
    """A frozen timm classifier with a known corruption (see the module docstring).

    The corruption kind is a buffer, so its weights hash (the teacher-output cache key and
    the run's teacher manifest) differs from the clean model's and from other corruptions'.
    """

    def __init__(self, inner: nn.Module, kind: str, index: int):
        super().__init__()
        if kind not in KINDS:
            raise DistillError(f"corrupt: unknown kind {kind!r} (one of {', '.join(KINDS)})")
        self.inner, self.kind = inner, kind
        self.register_buffer("corruption", torch.tensor([KINDS.index(kind), index]))
        self.num_classes = inner.num_classes
        self.pretrained_cfg = getattr(inner, "pretrained_cfg", {})
        classes = torch.arange(inner.num_classes)
        blind = (classes % BLIND_PERIOD) == index % BLIND_PERIOD
        self.corrupt = CorruptedLogits(kind, blind) if kind in ("shift", "blind") else None
        # noise_feature: the last noise map handed out and the real map behind it
        self._noise: Optional[Tensor] = None
        self._real: Optional[Tensor] = None

    def get_classifier(self) -> nn.Module:
        classifier = self.inner.get_classifier()
        return CorruptedClassifier(classifier, self.corrupt) if self.corrupt is not None else classifier

    def forward_features(self, x: Tensor) -> Tensor:
        real = self.inner.forward_features(x)
        if self.kind != "noise_feature":
            return real
        self._real, self._noise = real, torch.sin(1000.0 * real)
        return self._noise

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.kind == "noise_feature" and x is self._noise:
            x = self._real  # this model's own forward: its head reads the real map behind the noise
        out = self.inner.forward_head(x, pre_logits=pre_logits)
        if pre_logits or self.corrupt is None:
            return out
        return self.corrupt(out)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def corrupt_teacher(teacher: Teacher, kind: str, index: int, input_shape: Sequence[int]) -> Teacher:
    """Return a copy of ``teacher`` whose model is wrapped in :class:`CorruptedModel`, named
    ``<name>+<kind>``; ``input_shape`` is what its model sees (after its input adapter)."""
    name = f"{teacher.name}+{kind}"
    out = Teacher(name, CorruptedModel(teacher.model, kind, index), teacher.adapter, teacher.tapped.tap, input_shape)
    out.source = dict(teacher.source, name=name, corruption=kind)
    return out


class DiscriminationStudy(accuracy.Study):
    """A study whose recipes may carry ``corrupt: {teacher index: kind}``."""

    def __init__(self, path: Path, extra: Sequence[str] = ()):
        import yaml

        raw = yaml.safe_load(path.read_text()) or {}
        self.corruptions: Dict[str, Dict[int, str]] = {}
        for i, entry in enumerate(raw.get("recipes") or []):
            if isinstance(entry, dict) and "corrupt" in entry:
                name = str(entry.get("name") or f"recipe{i}")
                spec = entry.pop("corrupt") or {}
                bad = [k for k, v in spec.items() if not isinstance(k, int) or v not in KINDS]
                if bad:
                    raise DistillError(f"{path}: recipe {name!r}: corrupt must map teacher indices to one of "
                                       f"{', '.join(KINDS)}; bad entries {bad}")
                self.corruptions[name] = dict(spec)
        super().__init__(path, extra, raw)

    def make_runner(self, name: str, recipe):
        from distill.pipeline import RecipeRunner

        corruptions = self.corruptions.get(name, {})

        class CorruptingRunner(RecipeRunner):
            def prepare_teacher(self, index, cfg):
                teacher = super().prepare_teacher(index, cfg)
                kind = corruptions.get(index)
                if not kind:
                    return teacher
                size = teacher.adapter.size
                shape = (self.data_spec.input_size[0], *size) if size else self.data_spec.input_size
                return corrupt_teacher(teacher, kind, index, shape)

            def evaluate_teacher(self, teacher):
                # the same for every policy and seed of a pool: evaluated once, kept in the study folder
                key = f"{name} {teacher.name} {teacher.source.get('sha256')} {recipe.data.val_subset}"
                if key not in memo:
                    memo[key] = super().evaluate_teacher(teacher)
                    memo_path.write_text(json.dumps(memo, indent=1))
                return memo[key]

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
                    level = "feat" if kind == "noise_feature" else "logit"
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
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(accuracy.main(study_cls=DiscriminationStudy, extra_report=weight_report,
                           description=__doc__.split("\n\n")[0]))
