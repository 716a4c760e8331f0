"""Frozen teachers: per-teacher input adaptation, one pass per batch under inference_mode."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DistillError
from .registry import DataSpec
from .signals import TeacherOutputs
from .taps import FeatureTap, TappedModel


class InputAdapter(nn.Module):
    """Map a batch normalised for the data (``source``) to what a model expects (``target``).

    ``x -> x * std_s / std_t + (mean_s - mean_t) / std_t`` per channel (one fused affine),
    then an optional bilinear resize to ``size x size``. Identity steps are skipped.
    """

    def __init__(self, source: DataSpec, target_mean: Sequence[float], target_std: Sequence[float],
                 size: Optional[int] = None):
        super().__init__()
        mean_s, std_s = torch.tensor(source.mean), torch.tensor(source.std)
        mean_t, std_t = torch.tensor(target_mean, dtype=torch.float32), torch.tensor(target_std, dtype=torch.float32)
        if mean_t.numel() != mean_s.numel():
            raise ValueError(f"normalisation has {mean_t.numel()} channels, the data has {mean_s.numel()}")
        self.register_buffer("scale", (std_s / std_t).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_s - mean_t) / std_t).view(1, -1, 1, 1), persistent=False)
        self.renormalise = not (torch.allclose(mean_s, mean_t) and torch.allclose(std_s, std_t))
        self.size = None if size is None or size == source.input_size[-1] else (size, size)

    def forward(self, x: Tensor) -> Tensor:
        """Return the adapted batch ``(B, C, H', W')``."""
        if self.renormalise:
            x = torch.addcmul(self.shift, x, self.scale)
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return x


class Teacher(nn.Module):
    """One frozen teacher: input adapter + tapped model, always in eval mode."""

    def __init__(self, name: str, model: nn.Module, adapter: InputAdapter, tap: FeatureTap,
                 input_shape: Sequence[int]):
        super().__init__()
        self.name = name
        self.adapter = adapter
        model.requires_grad_(False)
        self.tapped = TappedModel(model.eval(), tap, tuple(input_shape))

    @property
    def model(self) -> nn.Module:
        """Return the wrapped timm model."""
        return self.tapped.model

    def train(self, mode: bool = True) -> "Teacher":
        """Teachers stay in eval mode whatever the caller asks."""
        return super().train(False)


class TeacherPool(nn.Module):
    """M frozen teachers run once per batch under ``torch.inference_mode()``."""

    def __init__(self, teachers: List[Teacher]):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)

    def __len__(self) -> int:
        return len(self.teachers)

    @property
    def names(self) -> List[str]:
        """Return the teachers' names in pool order."""
        return [t.name for t in self.teachers]

    def heads(self) -> List[Callable[[Tensor], Tensor]]:
        """Return each teacher's ``head(feature) -> logits (B, C)`` (:meth:`TappedModel.head`,
        no grad), in pool order; they read the teacher models, so they hold with a teacher cache."""
        return [t.tapped.head for t in self.teachers]

    def train(self, mode: bool = True) -> "TeacherPool":
        """The pool stays in eval mode whatever the caller asks."""
        return super().train(False)

    def require_finite(self, outputs: TeacherOutputs) -> None:
        """Refuse ``outputs`` (this pool's, for one batch) where a teacher's logits or feature hold NaN or
        infinity: a DistillError naming the first such teacher (one host sync: call it at set-up only)."""
        for m, name in enumerate(self.names):
            for what, tensor in (("logits", outputs.logits[m]), ("feature", outputs.features[m])):
                if not bool(torch.isfinite(tensor).all()):
                    raise DistillError(f"teacher {m} ({name}): its {what} are not finite (NaN or infinity) on "
                                       "the first batch; check its weights and precision (run.precision)")

    def forward(self, x: Tensor) -> TeacherOutputs:
        """Return every teacher's logits ``(M, B, C)``, features and embeddings for batch ``x``.

        The outputs are copied out of inference mode once (stacking the logits is that copy)
        so the student's loss may save them for its backward pass.
        """
        with torch.inference_mode():
            outs = [t.tapped(t.adapter(x)) for t in self.teachers]
        logits = torch.stack([o.logits for o in outs])
        features, embeddings = [], []
        for o in outs:
            feature = o.feature.clone()
            features.append(feature)
            embeddings.append(feature if o.embedding is o.feature else o.embedding)
        return TeacherOutputs(logits, features, embeddings)
