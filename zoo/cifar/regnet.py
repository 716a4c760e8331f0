"""RegNetX / RegNetY for CIFAR (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020).

Stage depths, widths and group widths are those of the paper's (pycls) 200MF / 400MF models; the blocks are
pycls's X block (1x1 -> grouped 3x3 -> 1x1, bottleneck ratio 1, projection shortcut where the shape changes),
Y adding squeeze-excitation (ratio 0.25 of the block's input width) after the grouped conv. Adapted to 32x32:
the 3x3 stem (32 channels) has stride 1 and the first stage too, so the stages run at 32/16/8/4 pixels.

Parameter counts at 100 classes (measured): regnetx_200mf 2.35M, regnetx_400mf 4.81M, regnety_400mf 3.95M.
At 1000 classes they equal timm's ImageNet regnetx_002 / regnety_004 exactly, and regnetx_400mf has 1,088 fewer
than regnetx_004 (its stride-1 first block keeps 32 channels and so needs no projection shortcut).
The MTKD-RL paper's Table 1 lists 2.4M / 4.8M / 5.8M; the first two match, while the genuine RegNetY-400MF
(4.3M on ImageNet with its 1000-way classifier) cannot have 5.8M parameters at 100 classes, so that entry
is not matched (the architecture is kept faithful to the RegNet paper rather than inflated to fit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
from timm.layers import SEModule
from timm.models import build_model_with_cfg

from ._common import CifarNet, cifar_cfg, generate_zoo_cfgs, init_weights, register_zoo_model

__all__ = ['CifarRegNet', 'RegNetBlock', 'RegNetCfg']


@dataclass(frozen=True)
class RegNetCfg:
    """Architecture of a RegNet: per-stage depths and widths, group width, SE ratio (0: X, > 0: Y)."""
    depths: Tuple[int, ...]
    widths: Tuple[int, ...]
    group_width: int
    se_ratio: float = 0.
    stem_width: int = 32
    strides: Tuple[int, ...] = (1, 2, 2, 2)


MODEL_CFGS: Dict[str, RegNetCfg] = {
    'regnetx_200mf': RegNetCfg(depths=(1, 1, 4, 7), widths=(24, 56, 152, 368), group_width=8),
    'regnetx_400mf': RegNetCfg(depths=(1, 2, 7, 12), widths=(32, 64, 160, 384), group_width=16),
    'regnety_400mf': RegNetCfg(depths=(1, 3, 6, 6), widths=(48, 104, 208, 440), group_width=8, se_ratio=0.25),
}


class RegNetBlock(nn.Module):
    """RegNet X/Y block: (B, in_chs, H, W) -> (B, out_chs, H/stride, W/stride)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, group_width: int, se_ratio: float = 0.) -> None:
        super().__init__()
        mid = out_chs  # bottleneck ratio 1
        if mid % group_width != 0:
            raise ValueError(f'width {mid} is not a multiple of the group width {group_width}')
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid // group_width, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.ReLU(inplace=True)
        self.se = SEModule(mid, rd_channels=int(round(in_chs * se_ratio))) if se_ratio > 0 else nn.Identity()
        self.conv3 = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        if stride != 1 or in_chs != out_chs:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        else:
            self.shortcut = nn.Identity()
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.se(out)))
        return self.act3(out + self.shortcut(x))


class CifarRegNet(CifarNet):
    """RegNet for 32x32 inputs; ``forward_features`` returns (B, widths[-1], H/8, W/8).

    Args:
        cfg: The architecture (see ``MODEL_CFGS``).
        num_classes, in_chans, drop_rate, global_pool: As for every zoo model.
    """

    stem_names = ('conv1', 'bn1', 'act1')

    def __init__(
            self,
            cfg: RegNetCfg,
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.,
            global_pool: str = 'avg',
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, cfg.stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.stem_width)
        self.act1 = nn.ReLU(inplace=True)

        in_chs = cfg.stem_width
        reduction = 1
        stages = []
        for i, (depth, out_chs, stride) in enumerate(zip(cfg.depths, cfg.widths, cfg.strides)):
            blocks = []
            for j in range(depth):
                blocks.append(RegNetBlock(in_chs, out_chs, stride if j == 0 else 1, cfg.group_width, cfg.se_ratio))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            reduction *= stride
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.stage_names = tuple(f'stages.{i}' for i in range(len(stages)))

        self._init_head(in_chs, num_classes, drop_rate, global_pool)
        init_weights(self)


default_cfgs = generate_zoo_cfgs({f'cifar_{name}': cifar_cfg(pool_size=(4, 4)) for name in MODEL_CFGS})


def _create_regnet(name: str, pretrained: bool = False, **kwargs: Any) -> CifarRegNet:
    return build_model_with_cfg(
        CifarRegNet,
        f'cifar_{name}',
        pretrained,
        model_cfg=MODEL_CFGS[name],
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


@register_zoo_model
def cifar_regnetx_200mf(pretrained: bool = False, **kwargs: Any) -> CifarRegNet:
    """RegNetX-200MF for CIFAR (depths 1/1/4/7, widths 24/56/152/368, group width 8); 2.35M params."""
    return _create_regnet('regnetx_200mf', pretrained, **kwargs)


@register_zoo_model
def cifar_regnetx_400mf(pretrained: bool = False, **kwargs: Any) -> CifarRegNet:
    """RegNetX-400MF for CIFAR (depths 1/2/7/12, widths 32/64/160/384, group width 16); 4.81M params."""
    return _create_regnet('regnetx_400mf', pretrained, **kwargs)


@register_zoo_model
def cifar_regnety_400mf(pretrained: bool = False, **kwargs: Any) -> CifarRegNet:
    """RegNetY-400MF for CIFAR (depths 1/3/6/6, widths 48/104/208/440, group width 8, SE 0.25); 3.95M params."""
    return _create_regnet('regnety_400mf', pretrained, **kwargs)
