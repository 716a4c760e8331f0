"""ShuffleNetV2 for CIFAR (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018), adapted to 32x32 inputs.

Changes from the ImageNet network: the 3x3 stem conv has stride 1 and there is no max pool, so the three stages
(4/8/4 units, each starting with a stride-2 unit) give 16x16, 8x8 and 4x4 maps; conv5 (1x1, 1024 channels)
follows as on ImageNet. ``width`` selects the channel multiplier (0.5, 1.0, 1.5 or 2.0).

Parameter count at 100 classes, width 1.0: 1.36M (the KD literature's "ShuffleNetV2, 1.4M").
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg

from ._common import CifarNet, cifar_cfg, generate_zoo_cfgs, init_weights, register_zoo_model

__all__ = ['CifarShuffleNetV2', 'ShuffleUnit', 'channel_shuffle']

# stage output channels (stage2, stage3, stage4, conv5) per width multiplier, as in the paper's Table 5
_WIDTHS: Dict[float, Tuple[int, int, int, int]] = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: (B, C, H, W) -> (B, C, H, W)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _conv_bn(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list:
    layers = [
        nn.Conv2d(in_chs, out_chs, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_chs),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return layers


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: (B, in_chs, H, W) -> (B, out_chs, H/stride, W/stride).

    Stride 1: half the channels pass through, the other half goes through 1x1 -> 3x3 depthwise -> 1x1.
    Stride 2: both halves of the output come from the full input (a depthwise-separable branch and the
    1x1 -> depthwise -> 1x1 branch). The halves are concatenated and shuffled.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError('stride must be 1 or 2')
        if stride == 1 and in_chs != out_chs:
            raise ValueError('a stride-1 unit keeps the channel count')
        self.stride = stride
        mid = out_chs // 2
        if stride == 2:
            self.branch1: nn.Module = nn.Sequential(
                *_conv_bn(in_chs, in_chs, 3, stride=2, groups=in_chs, act=False),
                *_conv_bn(in_chs, mid, 1),
            )
            branch_in = in_chs
        else:
            self.branch1 = nn.Identity()
            branch_in = mid
        self.branch2 = nn.Sequential(
            *_conv_bn(branch_in, mid, 1),
            *_conv_bn(mid, mid, 3, stride=stride, groups=mid, act=False),
            *_conv_bn(mid, mid, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class CifarShuffleNetV2(CifarNet):
    """ShuffleNetV2 for 32x32 inputs; ``forward_features`` returns (B, 1024, H/8, W/8) (width <= 1.5).

    Args:
        width: Channel multiplier, one of 0.5, 1.0, 1.5, 2.0.
        repeats: Units per stage (the first of each has stride 2).
        stem_chs: Stem conv channels.
        num_classes, in_chans, drop_rate, global_pool: As for every zoo model.
    """

    stem_names = ('conv1', 'bn1', 'act1')
    stage_names = ('stage2', 'stage3', 'stage4')
    post_names = ('conv5', 'bn5', 'act5')

    def __init__(
            self,
            width: float = 1.0,
            repeats: Tuple[int, int, int] = (4, 8, 4),
            stem_chs: int = 24,
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.,
            global_pool: str = 'avg',
    ) -> None:
        super().__init__()
        if float(width) not in _WIDTHS:
            raise ValueError(f'width must be one of {sorted(_WIDTHS)}, got {width}')
        *stage_chs, last_chs = _WIDTHS[float(width)]
        self.in_chans = in_chans

        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU(inplace=True)

        in_chs = stem_chs
        reduction = 1
        for name, out_chs, n in zip(self.stage_names, stage_chs, repeats):
            units = [ShuffleUnit(in_chs, out_chs, stride=2)]
            units += [ShuffleUnit(out_chs, out_chs, stride=1) for _ in range(n - 1)]
            setattr(self, name, nn.Sequential(*units))
            in_chs = out_chs
            reduction *= 2
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=name))

        self.conv5 = nn.Conv2d(in_chs, last_chs, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(last_chs)
        self.act5 = nn.ReLU(inplace=True)

        self._init_head(last_chs, num_classes, drop_rate, global_pool)
        init_weights(self)


default_cfgs = generate_zoo_cfgs({'cifar_shufflenetv2': cifar_cfg(pool_size=(4, 4))})


@register_zoo_model
def cifar_shufflenetv2(pretrained: bool = False, **kwargs: Any) -> CifarShuffleNetV2:
    """ShuffleNetV2 (1x unless ``width`` is given) for CIFAR; 1.36M params at 100 classes."""
    return build_model_with_cfg(
        CifarShuffleNetV2,
        'cifar_shufflenetv2',
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2)),
        **kwargs,
    )
