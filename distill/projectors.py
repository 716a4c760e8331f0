"""Projectors r_m(.) that map the student's tapped feature into teacher m's feature space.

Sized from the shapes seen on a dummy batch, one per teacher, trained with the student:

- vectors ``(B, d_s) -> (B, d_m)``: a linear regressor (the paper's r(.)).
- maps ``(B, C_s, H_s, W_s) -> (B, C_m, H_m, W_m)``: resample the student map to the
  teacher's spatial size (adaptive average pooling when it is larger, bilinear when smaller;
  every teacher from the original student map), then 1x1 conv -> BN -> ReLU.
- tokens ``(B, N, D_s) -> (B, N, D_m)``: a linear layer on the channel dim.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DistillError


class VectorProjector(nn.Linear):
    """Linear map ``(B, d_s) -> (B, d_m)``."""


class TokenProjector(nn.Linear):
    """Linear map on the channel dim of tokens ``(B, N, D_s) -> (B, N, D_m)``."""


class MapProjector(nn.Module):
    """Resample to ``size`` then 1x1 conv -> BN -> ReLU: ``(B, C_s, H_s, W_s) -> (B, C_m, *size)``."""

    def __init__(self, in_channels: int, out_channels: int, size: Tuple[int, int]):
        super().__init__()
        self.size = tuple(size)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Return the projected map ``(B, C_m, H_m, W_m)``."""
        h, w = x.shape[-2:]
        if (h, w) != self.size:
            if h >= self.size[0] and w >= self.size[1]:
                x = F.adaptive_avg_pool2d(x, self.size)
            else:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return F.relu(self.bn(self.conv(x)))


def build_projector(student_shape: Sequence[int], teacher_shape: Sequence[int], teacher: str) -> nn.Module:
    """Return the projector for one teacher from per-sample shapes (no batch dim)."""
    if len(student_shape) != len(teacher_shape):
        raise DistillError(
            f"teacher {teacher}: its feature has shape {tuple(teacher_shape)} but the student's has "
            f"{tuple(student_shape)}; choose a feature tap that gives both the same kind "
            "(distill.features: pre_logits works for every pair)")
    if len(student_shape) == 1:
        return VectorProjector(student_shape[0], teacher_shape[0])
    if len(student_shape) == 3:
        return MapProjector(student_shape[0], teacher_shape[0], tuple(teacher_shape[1:]))
    if len(student_shape) == 2:
        if student_shape[0] != teacher_shape[0]:
            raise DistillError(
                f"teacher {teacher}: {teacher_shape[0]} tokens against the student's {student_shape[0]}; "
                "token features need the same patch grid (or use distill.features: pre_logits)")
        return TokenProjector(student_shape[1], teacher_shape[1])
    raise DistillError(f"teacher {teacher}: unsupported feature shape {tuple(teacher_shape)}")
