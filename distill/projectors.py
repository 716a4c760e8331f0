"""Projectors r_m(.) that map the student's tapped feature into teacher m's feature space.

Sized from the shapes seen on a dummy batch, one per teacher, trained with the student:

- vectors ``(B, d_s) -> (B, d_m)``: a linear regressor (the paper's r(.)).
- maps ``(B, C_s, H_s, W_s) -> (B, C_m, H_m, W_m)``: resample the student map to the
  teacher's spatial size (adaptive average pooling when it is larger, bilinear when smaller;
  every teacher from the original student map), then 1x1 conv -> BN -> ReLU.
- tokens ``(B, N, D_s) -> (B, N, D_m)``: a linear layer on the channel dim.
- mixed kinds (a CNN teacher with a ViT student, or the reverse) and token sets of
  different lengths: :class:`GridProjector`. Tokens are laid out on their square patch
  grid ``(B, D, g, g)`` (``N = g*g``), resampled like maps, then a 1x1 conv; a map target
  gets BN -> ReLU after it (as :class:`MapProjector`), a token target is flattened back
  to ``(B, N_m, D_m)`` without a non-linearity (ViT tokens are signed).

Each kind is registered in :data:`distill.registries.PROJECTORS` and says, in its
``from_shapes(student_shape, teacher_shape, teacher)``, whether it bridges a pair of
per-sample shapes (returning the module) or not (None); :func:`build_projector` asks each.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DistillError
from .registries import PROJECTORS

Shape = Sequence[int]  # per-sample feature shape (no batch dim)


@PROJECTORS.register("vector")
class VectorProjector(nn.Linear):
    """Linear map ``(B, d_s) -> (B, d_m)``."""

    @classmethod
    def from_shapes(cls, student: Shape, teacher: Shape, name: str) -> Optional[nn.Module]:
        """Return the projector between two vectors, else None."""
        return cls(student[0], teacher[0]) if len(student) == len(teacher) == 1 else None


@PROJECTORS.register("tokens")
class TokenProjector(nn.Linear):
    """Linear map on the channel dim of tokens ``(B, N, D_s) -> (B, N, D_m)``."""

    @classmethod
    def from_shapes(cls, student: Shape, teacher: Shape, name: str) -> Optional[nn.Module]:
        """Return the projector between token sets of one length, else None."""
        if len(student) == len(teacher) == 2 and student[0] == teacher[0]:
            return cls(student[1], teacher[1])
        return None


@PROJECTORS.register("map")
class MapProjector(nn.Module):
    """Resample to ``size`` then 1x1 conv -> BN -> ReLU: ``(B, C_s, H_s, W_s) -> (B, C_m, *size)``."""

    def __init__(self, in_channels: int, out_channels: int, size: Tuple[int, int]):
        super().__init__()
        self.size = tuple(size)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    @classmethod
    def from_shapes(cls, student: Shape, teacher: Shape, name: str) -> Optional[nn.Module]:
        """Return the projector between two maps, else None."""
        return cls(student[0], teacher[0], tuple(teacher[1:])) if len(student) == len(teacher) == 3 else None

    def forward(self, x: Tensor) -> Tensor:
        """Return the projected map ``(B, C_m, H_m, W_m)``."""
        return F.relu(self.bn(self.conv(_resample(x, self.size))))


def _grid(n: int, teacher: str, who: str) -> int:
    g = int(round(n ** 0.5))
    if g * g != n:
        raise DistillError(f"teacher {teacher}: {who} has {n} tokens, not a square patch grid; "
                           "use distill.features: pre_logits")
    return g


def _resample(x: Tensor, size: Tuple[int, int]) -> Tensor:
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@PROJECTORS.register("grid")
class GridProjector(nn.Module):
    """Tokens or map -> tokens or map through the patch grid: resample, then 1x1 conv.

    ``(B, N_s, D_s)`` tokens are reshaped to ``(B, D_s, g, g)``; the map is resampled to the
    teacher's grid (adaptive average pooling when larger, bilinear when smaller); a 1x1 conv
    maps the channels; a map target then gets BN -> ReLU, a token target is flattened to
    ``(B, N_m, D_m)``.
    """

    def __init__(self, in_channels: int, out_channels: int, size: Tuple[int, int],
                 tokens_in: bool, tokens_out: bool):
        super().__init__()
        self.size = tuple(size)
        self.tokens_in, self.tokens_out = tokens_in, tokens_out
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=tokens_out)
        self.bn = None if tokens_out else nn.BatchNorm2d(out_channels)

    @classmethod
    def from_shapes(cls, student: Shape, teacher: Shape, name: str) -> Optional[nn.Module]:
        """Return the projector between a map and tokens, or token sets of other lengths, else None."""
        if not ({len(student), len(teacher)} == {2, 3} or (len(student) == len(teacher) == 2
                                                           and student[0] != teacher[0])):
            return None
        tokens_in, tokens_out = len(student) == 2, len(teacher) == 2
        s_channels = student[1] if tokens_in else student[0]
        if tokens_in:
            _grid(student[0], name, "the student's feature")
        if tokens_out:
            g = _grid(teacher[0], name, "its feature")
            size, t_channels = (g, g), teacher[1]
        else:
            size, t_channels = tuple(teacher[1:]), teacher[0]
        return cls(s_channels, t_channels, size, tokens_in, tokens_out)

    def forward(self, x: Tensor) -> Tensor:
        """Return the projection in the teacher's layout."""
        if self.tokens_in:
            b, n, d = x.shape
            g = int(round(n ** 0.5))
            x = x.transpose(1, 2).reshape(b, d, g, g)
        x = self.conv(_resample(x, self.size))
        if self.tokens_out:
            return x.flatten(2).transpose(1, 2)
        return F.relu(self.bn(x))


def build_projector(student_shape: Sequence[int], teacher_shape: Sequence[int], teacher: str) -> nn.Module:
    """Return the projector for one teacher from per-sample shapes (no batch dim): the one registered
    kind that bridges them (:data:`PROJECTORS`)."""
    for kind in PROJECTORS:
        projector = PROJECTORS[kind].from_shapes(student_shape, teacher_shape, teacher)
        if projector is not None:
            return projector
    if len(student_shape) != len(teacher_shape):
        raise DistillError(
            f"teacher {teacher}: its feature has shape {tuple(teacher_shape)} but the student's has "
            f"{tuple(student_shape)}; choose a feature tap that gives both the same kind "
            "(distill.features: pre_logits works for every pair)")
    raise DistillError(f"teacher {teacher}: unsupported feature shape {tuple(teacher_shape)}")
