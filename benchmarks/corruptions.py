"""Teachers corrupted in a known way, for the policy-discrimination benchmark
(:mod:`benchmarks.discrimination`). A corrupted teacher wraps a frozen timm classifier; every
path to its logits and features (the forward pass, the tap's split head, ``get_classifier()``,
a head applied to another feature) carries the same corruption. Kinds, for teacher ``index``:

- ``shift``: the logits rolled by one class, so it is confidently wrong on every sample; its
  features are intact. Its logit weight must fall.
- ``noise_feature``: the feature it exposes for distillation is ``sin(1000 x)`` of its real
  feature map, its logits and pre-logit embedding intact. Its *feature* weight must fall,
  while CE-based weights cannot see the corruption. The map keeps class structure: ``sin(0) =
  0`` keeps the ReLU support of the real map (a nearest-centroid classifier on ``|sin(1000
  map)|`` gets 86% on 200 test images), so it is a degraded feature, not one without signal.
- ``blind``: the logits rolled by one class on the samples it predicts as one of its blind
  classes ``{c : c mod 4 = index mod 4}``. With four blind teachers every sample has one
  confidently wrong teacher, a different one per sample: per-sample weighting matters.
- ``dark``: dark-knowledge corruption. On the samples it predicts as a class of its half
  ``{c : c mod 2 = index mod 2}``, the non-argmax logits are permuted among themselves in
  reverse rank order (the second most likely class gets the least likely class's logit and
  so on). Its top-1 is unchanged everywhere, and so is its cross-entropy wherever it is right
  (the label's logit is the max and the log-sum-exp is permutation-invariant): the label's CE
  cannot see the corruption there. Its soft labels carry the reversed similarity structure.
- ``dark_shuffled``: the same, but the non-argmax logits are moved by a fixed random
  permutation per predicted class (:func:`dark_permutations`, seed 0) instead of by rank: a
  consistent wrong similarity structure (class k's look-alikes are always the same wrong
  classes) unrelated to the reversal that ``prior: consensus``'s temperature was checked on.
- ``noise_half``: class-conditional feature noise. On the samples it predicts as a class of
  its half, the tapped feature map is replaced by Gaussian noise with the real map's per-sample
  mean and std, drawn from a generator seeded by the sample's real map (deterministic, no
  relation to the map's support or the class); elsewhere the real map. Logits and embedding intact.

The corrupted (sample, teacher) pairs of ``dark`` and ``noise_half`` are those whose teacher
top-1 lies in its half (:func:`corrupted_pairs`). A ``specialist`` (not a corruption: a teacher
trained on its half of the classes only, by :mod:`benchmarks.discrimination`) is watched the
same way: its off pairs are the samples whose label is outside its half.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from distill.errors import DistillError
from distill.teachers import Teacher

KINDS = ("shift", "noise_feature", "blind", "dark", "noise_half", "dark_shuffled")
PAIR_KINDS = ("dark", "noise_half", "dark_shuffled")  # corrupted on some (sample, teacher) pairs: in its half
SPECIALIST = "specialist"  # trained on its half of the classes; off pairs: labels outside that half
WATCHED_KINDS = (*PAIR_KINDS, SPECIALIST)  # the kinds whose (sample, teacher) pairs are split and recorded
BLIND_PERIOD = 4
HALF_PERIOD = 2


def half_classes(num_classes: int, index: int) -> Tensor:
    """Return teacher ``index``'s half of the classes ``{c : c mod 2 = index mod 2}`` as a mask ``(C,)``."""
    return torch.arange(num_classes) % HALF_PERIOD == index % HALF_PERIOD


def reverse_dark_knowledge(logits: Tensor) -> Tensor:
    """Return ``logits (B, C)`` with the argmax kept and the other C - 1 values put back in
    reverse rank order (largest non-argmax value to the smallest one's class, ...), ``(B, C)``."""
    order = logits.argsort(dim=-1, descending=True)
    values = logits.gather(-1, order)
    values = torch.cat([values[:, :1], values[:, 1:].flip(-1)], dim=-1)
    return torch.empty_like(logits).scatter_(-1, order, values)


def per_sample_noise(real: Tensor) -> Tensor:
    """Return Gaussian noise shaped like ``real (B, ...)`` with each sample's mean and std, from
    a generator seeded by that sample's values (the same sample gives the same noise)."""
    flat = real.detach().float().flatten(1)
    seeds = (flat.double().sum(1) * 1e4).remainder(2 ** 31).long().tolist()
    noise = torch.stack([torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(s)) for s in seeds])
    noise = noise * flat.std(1, keepdim=True) + flat.mean(1, keepdim=True)
    return noise.view_as(real).to(real.dtype)


def corrupted_pairs(logits: Tensor, corruptions: Dict[int, str], target: Optional[Tensor] = None) -> Tensor:
    """Return the mask ``(M, B)`` of corrupted (teacher, sample) pairs: for a ``dark`` /
    ``noise_half`` teacher, its top-1 on sample b is in its half; for a ``specialist``, the
    label ``target[b]`` is outside its half (``target (B,)`` is then required); ``logits (M, B, C)``."""
    mask = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
    for m, kind in corruptions.items():
        half = half_classes(logits.shape[-1], m).to(logits.device)
        if kind in PAIR_KINDS:
            mask[m] = half[logits[m].argmax(-1)]
        elif kind == SPECIALIST:
            if target is None:
                raise ValueError("corrupted_pairs: a specialist's off pairs need the labels (target)")
            mask[m] = ~half[target]
    return mask


def dark_permutations(num_classes: int, seed: int = 0) -> Tensor:
    """Return ``(C, C)`` column maps: row k is a random permutation of the classes that keeps k in
    place, drawn from a generator seeded with ``seed`` (:func:`shuffle_dark_knowledge` applies it)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(num_classes):
        others = torch.tensor([c for c in range(num_classes) if c != k], dtype=torch.long)
        row = torch.arange(num_classes)
        row[others] = others[torch.randperm(num_classes - 1, generator=g)]
        rows.append(row)
    return torch.stack(rows)


def shuffle_dark_knowledge(logits: Tensor, maps: Tensor) -> Tensor:
    """Return ``logits (B, C)`` with column c of a row predicted as class k taking the value of
    column ``maps[k, c]`` (:func:`dark_permutations`): the argmax kept, the rest permuted, ``(B, C)``."""
    return logits.gather(-1, maps.to(logits.device)[logits.argmax(-1)])


class CorruptedLogits(nn.Module):
    """Logits ``(B, C)`` of a ``shift``, ``blind``, ``dark`` or ``dark_shuffled`` teacher from its
    clean logits ``(B, C)``."""

    def __init__(self, kind: str, classes: Tensor):
        super().__init__()
        self.kind = kind
        self.register_buffer("classes", classes, persistent=False)  # the blind classes / the half
        maps = dark_permutations(len(classes)) if kind == "dark_shuffled" else torch.empty(0, dtype=torch.long)
        self.register_buffer("maps", maps, persistent=False)

    def forward(self, logits: Tensor) -> Tensor:
        if self.kind == "shift":
            return logits.roll(1, dims=-1)
        hit = self.classes[logits.argmax(-1)].unsqueeze(-1)
        if self.kind == "blind":
            changed = logits.roll(1, dims=-1)
        elif self.kind == "dark":
            changed = reverse_dark_knowledge(logits)
        else:
            changed = shuffle_dark_knowledge(logits, self.maps)
        return torch.where(hit, changed, logits)


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
        self.inner, self.kind, self.index = inner, kind, index
        self.register_buffer("corruption", torch.tensor([KINDS.index(kind), index]))
        self.num_classes = inner.num_classes
        self.pretrained_cfg = getattr(inner, "pretrained_cfg", {})
        classes = torch.arange(inner.num_classes)
        if kind == "blind":
            blind = classes % BLIND_PERIOD == index % BLIND_PERIOD
            self.corrupt: Optional[CorruptedLogits] = CorruptedLogits(kind, blind)
        elif kind in ("shift", "dark", "dark_shuffled"):
            self.corrupt = CorruptedLogits(kind, half_classes(inner.num_classes, index))
        else:
            self.corrupt = None
        # noise kinds: the last noised map handed out and the real map behind it
        self._noise: Optional[Tensor] = None
        self._real: Optional[Tensor] = None

    def get_classifier(self) -> nn.Module:
        classifier = self.inner.get_classifier()
        return CorruptedClassifier(classifier, self.corrupt) if self.corrupt is not None else classifier

    def forward_features(self, x: Tensor) -> Tensor:
        real = self.inner.forward_features(x)
        if self.kind == "noise_feature":
            noise = torch.sin(1000.0 * real)
        elif self.kind == "noise_half":
            hit = half_classes(self.num_classes, self.index).to(real.device)[self.inner.forward_head(real).argmax(-1)]
            noise = real.clone()
            if hit.any():
                noise[hit] = per_sample_noise(real[hit])
        else:
            return real
        self._real, self._noise = real, noise
        return noise

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self._noise is not None and x is self._noise:
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
