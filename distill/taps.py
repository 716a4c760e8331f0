"""Feature taps: run a timm classifier once and return its logits, the feature used for
feature distillation, and its pooled pre-logit embedding.

Tap kinds (recipe key ``distill.features``), registered in :data:`distill.registries.TAPS`:

- ``pre_logits``: the pooled pre-logit vector ``(B, d)`` (default; cheap).
- ``last_map``: the last-stage map from ``forward_features`` — ``(B, C, H, W)`` for CNNs,
  patch tokens ``(B, N, D)`` (prefix tokens removed) for ViTs.
- ``<int>`` (kind ``stage``): an intermediate stage by index, through timm's
  ``forward_intermediates``.

A tap kind is a class with two static methods: ``features(model, x, index) -> (final map,
tapped feature or None for the embedding)`` and ``head(model, feature, index) -> logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .registries import TAPS


@dataclass(frozen=True)
class FeatureTap:
    """Which feature a model exposes for distillation: ``kind`` and, for stages, ``index``."""

    kind: str  # "pre_logits" | "last_map" | "stage"
    index: Optional[int] = None


def parse_feature_tap(spec: Union[str, int]) -> FeatureTap:
    """Return the :class:`FeatureTap` for a recipe value; raise ValueError (the registry's message) if malformed."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.lstrip("-").isdigit()):
        return FeatureTap("stage", int(spec))
    if spec not in TAPS:
        raise ValueError(TAPS.unknown(spec))
    if TAPS[spec].takes_index:
        raise ValueError(f"{spec!r} taps a stage by index: write the stage number (e.g. 2)")
    return FeatureTap(spec)


@TAPS.register("pre_logits", help="the pooled pre-logit vector (B, d) (default; cheap)")
class PreLogitsTap:
    """The embedding the classifier reads."""

    takes_index = False

    @staticmethod
    def features(model: nn.Module, x: Tensor, index: Optional[int]) -> Tuple[Tensor, Optional[Tensor]]:
        """Return ``(final map, None)``: the feature is the embedding."""
        return model.forward_features(x), None

    @staticmethod
    def head(model: nn.Module, feature: Tensor, index: Optional[int]) -> Tensor:
        """Return the classifier's logits ``(B, C)`` on a ``(B, d)`` vector."""
        classifier = model.get_classifier()
        if not isinstance(classifier, nn.Module):
            raise ValueError(f"{type(model).__name__}.get_classifier() is not one module")
        return classifier(feature)


@TAPS.register("last_map", help="the last-stage map (B, C, H, W), or ViT patch tokens (B, N, D)")
class LastMapTap:
    """The map ``forward_features`` ends with (ViT prefix tokens removed)."""

    takes_index = False

    @staticmethod
    def features(model: nn.Module, x: Tensor, index: Optional[int]) -> Tuple[Tensor, Optional[Tensor]]:
        """Return ``(final map, final map without prefix tokens)``."""
        final = model.forward_features(x)
        return final, _strip_prefix_tokens(model, final)

    @staticmethod
    def head(model: nn.Module, feature: Tensor, index: Optional[int]) -> Tensor:
        """Return ``forward_head`` on the map, or on patch tokens with the prefix tokens put back as zeros."""
        prefix = getattr(model, "num_prefix_tokens", 0) if feature.ndim == 3 else 0
        if prefix:
            feature = torch.cat([feature.new_zeros(feature.shape[0], prefix, feature.shape[2]), feature], 1)
        return model.forward_head(feature)


@TAPS.register("stage", help="<int>: an intermediate stage by index (timm forward_intermediates)")
class StageTap:
    """Stage ``index`` of ``forward_intermediates``."""

    takes_index = True

    @staticmethod
    def features(model: nn.Module, x: Tensor, index: Optional[int]) -> Tuple[Tensor, Optional[Tensor]]:
        """Return ``(final map, stage index's output)``."""
        final, (feature,) = model.forward_intermediates(x, indices=[index])
        return final, feature

    @staticmethod
    def head(model: nn.Module, feature: Tensor, index: Optional[int]) -> Tensor:
        """Raise ValueError: no classifier follows an intermediate stage."""
        raise ValueError(f"stage {index} of {type(model).__name__} is not followed by its classifier")


@dataclass
class TapOutput:
    """One model's outputs for one batch."""

    logits: Tensor  # (B, C)
    feature: Tensor  # the tapped feature: (B, d), (B, C, H, W) or (B, N, D)
    embedding: Tensor  # pooled pre-logits (B, d)


class TappedModel(nn.Module):
    """Wrap a timm classifier so one forward pass yields logits, tapped feature and embedding.

    The head is split as ``logits = classifier(pre_logits)`` when that split reproduces
    ``forward_head`` exactly (checked once on a dummy batch, and only for models without
    head dropout); otherwise ``forward_head`` is called for logits and pre-logits alike.
    """

    def __init__(self, model: nn.Module, tap: FeatureTap, input_shape: Tuple[int, int, int]):
        super().__init__()
        self.model = model
        self.tap = tap
        self.kind = TAPS[tap.kind]
        for name in ("forward_features", "forward_head"):
            if not hasattr(model, name):
                raise TypeError(f"{type(model).__name__} has no {name}(); distillation needs timm's classifier API")
        self.split_head = self._head_split_is_exact(input_shape)

    @torch.no_grad()
    def _head_split_is_exact(self, input_shape: Tuple[int, int, int]) -> bool:
        model = self.model
        if getattr(model, "drop_rate", 0.0) or not isinstance(model.get_classifier(), nn.Linear):
            return False
        was_training = model.training
        model.eval()
        try:
            param = next(model.parameters())
            x = torch.randn(2, *input_shape, device=param.device, dtype=param.dtype)
            fmap = model.forward_features(x)
            reference = model.forward_head(fmap)
            split = model.get_classifier()(model.forward_head(fmap, pre_logits=True))
            return bool(torch.allclose(reference, split, rtol=1e-4, atol=1e-5))
        finally:
            model.train(was_training)

    def forward(self, x: Tensor) -> TapOutput:
        """Return logits ``(B, C)``, tapped feature and embedding ``(B, d)`` for ``x``."""
        model = self.model
        final, feature = self.kind.features(model, x, self.tap.index)
        embedding = model.forward_head(final, pre_logits=True)
        logits = model.get_classifier()(embedding) if self.split_head else model.forward_head(final)
        return TapOutput(logits, embedding if feature is None else feature, embedding)

    def head(self, feature: Tensor) -> Tensor:
        """Return the logits ``(B, C)`` this model's own head gives for ``feature``, without grad.

        ``feature`` is shaped like this tap's feature (a student's feature projected into this
        model's space): ``pre_logits``: the classifier on the ``(B, d)`` vector; ``last_map``:
        ``forward_head`` on the map, or on patch tokens ``(B, N, D)`` with the model's prefix
        tokens put back as zeros (right for a head that pools the patch tokens alone, timm's
        ``global_pool`` ``'avg'``; a class-token head would read the zeros). Raises ValueError
        for an intermediate stage (no head follows it) or a model whose classifier is not one
        module. Whether the head reproduces the model's logits is the caller's check.
        """
        with torch.no_grad():
            return self.kind.head(self.model, feature, self.tap.index)


def _strip_prefix_tokens(model: nn.Module, features: Tensor) -> Tensor:
    """Return ViT patch tokens without class / distillation / register tokens; maps unchanged."""
    if features.ndim == 3:
        return features[:, getattr(model, "num_prefix_tokens", 0):]
    return features


def pool_feature(feature: Tensor) -> Tensor:
    """Return a tapped feature pooled to ``(B, d)``: mean over space (maps) or tokens."""
    if feature.ndim == 4:
        return feature.mean((2, 3))
    if feature.ndim == 3:
        return feature.mean(1)
    return feature
