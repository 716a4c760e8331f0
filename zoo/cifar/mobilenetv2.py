"""MobileNetV2 for CIFAR (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

Adapted to 32x32 inputs: the stem conv and the first strided block group (24 channels) use stride 1, so the
remaining three stride-2 groups give a 4x4 final map. Blocks are grouped into four stages by resolution
(32x32: 16/24 ch, 16x16: 32 ch, 8x8: 64/96 ch, 4x4: 160/320 ch); a 1x1 conv to 1280 channels follows.

Parameter count at 100 classes, width_mult 1.0: 2.35M (the KD literature's "MobileNetV2, 2.4M").
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import make_divisible
from timm.models import build_model_with_cfg

from ._common import CifarNet, cifar_cfg, generate_zoo_cfgs, init_weights, register_zoo_model

__all__ = ['CifarMobileNetV2', 'InvertedResidual']

# (expansion t, output channels c, repeats n, stride s) of each block group; ImageNet strides 2 -> 1 for the
# 24-channel group (and the stem)
_BLOCK_ARGS: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Inverted residual: 1x1 expand -> 3x3 depthwise -> linear 1x1; (B, in_chs, H, W) -> (B, out_chs, H/s, W/s).

    The residual is added when stride is 1 and the channel count is kept.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        mid = int(round(in_chs * expand_ratio))
        self.has_skip = stride == 1 and in_chs == out_chs
        if expand_ratio != 1:
            self.conv_pw: nn.Module = nn.Conv2d(in_chs, mid, 1, bias=False)
            self.bn1: nn.Module = nn.BatchNorm2d(mid)
            self.act1: nn.Module = nn.ReLU6(inplace=True)
        else:
            self.conv_pw = self.bn1 = self.act1 = nn.Identity()
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.ReLU6(inplace=True)
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.act2(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.has_skip else out


class CifarMobileNetV2(CifarNet):
    """MobileNetV2 for 32x32 inputs; ``forward_features`` returns (B, 1280 * max(1, width_mult), H/8, W/8).

    Args:
        width_mult: Channel multiplier (channels rounded to multiples of 8; the 1280 head only grows).
        block_args: (t, c, n, s) per block group; a group with stride > 1 starts a new stage.
        num_classes, in_chans, drop_rate, global_pool: As for every zoo model.
    """

    stem_names = ('conv1', 'bn1', 'act1')
    post_names = ('conv_head', 'bn2', 'act2')

    def __init__(
            self,
            width_mult: float = 1.0,
            block_args: Sequence[Tuple[int, int, int, int]] = _BLOCK_ARGS,
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.,
            global_pool: str = 'avg',
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        stem_chs = make_divisible(32 * width_mult, 8)
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU6(inplace=True)

        stages: List[List[nn.Module]] = []
        in_chs = stem_chs
        reduction = 1
        for t, c, n, s in block_args:
            out_chs = make_divisible(c * width_mult, 8)
            if s > 1 or not stages:
                stages.append([])
                reduction *= s
            for i in range(n):
                stages[-1].append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, t))
                in_chs = out_chs
            # a stage is described by its last block group (later groups of the same stage overwrite this)
            info = dict(num_chs=out_chs, reduction=reduction, module=f'stages.{len(stages) - 1}')
            if len(self.feature_info) < len(stages):
                self.feature_info.append(info)
            else:
                self.feature_info[-1] = info
        self.stages = nn.Sequential(*[nn.Sequential(*blocks) for blocks in stages])
        self.stage_names = tuple(f'stages.{i}' for i in range(len(stages)))

        head_chs = make_divisible(1280 * max(1.0, width_mult), 8)
        self.conv_head = nn.Conv2d(in_chs, head_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head_chs)
        self.act2 = nn.ReLU6(inplace=True)

        self._init_head(head_chs, num_classes, drop_rate, global_pool)
        init_weights(self)


default_cfgs = generate_zoo_cfgs({'cifar_mobilenetv2': cifar_cfg(pool_size=(4, 4))})


@register_zoo_model
def cifar_mobilenetv2(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    """MobileNetV2 (width_mult 1.0 unless given) for CIFAR, final map 4x4; 2.35M params at 100 classes."""
    return build_model_with_cfg(
        CifarMobileNetV2,
        'cifar_mobilenetv2',
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )
