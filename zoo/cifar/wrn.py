"""Wide ResNets for CIFAR (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k: a 3x3 stem conv (16 channels), three stages of n = (d - 4) / 6 pre-activation blocks
(BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) with 16k/32k/64k channels and strides 1/2/2, a 1x1 conv shortcut
(on the pre-activated input) where the shape changes, then a final BN-ReLU, average pooling and ``fc``.

Parameter counts at 100 classes: wrn_16_1 0.18M, wrn_16_2 0.70M, wrn_16_4 2.77M, wrn_28_1 0.38M,
wrn_28_2 1.48M, wrn_28_4 5.87M, wrn_40_1 0.57M, wrn_40_2 2.26M, wrn_40_4 8.97M.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg

from ._common import CifarNet, cifar_cfg, generate_zoo_cfgs, init_weights, register_zoo_model

__all__ = ['CifarWideResNet', 'PreActBlock']


class PreActBlock(nn.Module):
    """Pre-activation wide basic block: (B, in_chs, H, W) -> (B, out_chs, H/stride, W/stride)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, dropout: float = 0.) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.has_proj = stride != 1 or in_chs != out_chs
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False) if self.has_proj else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        # the projection sees the pre-activated input, the identity the raw one (as in the original code)
        shortcut = self.shortcut(pre) if self.has_proj else x
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + shortcut


class CifarWideResNet(CifarNet):
    """WRN-depth-widen for CIFAR; ``forward_features`` returns (B, 64 * widen, H/4, W/4) after the final BN-ReLU.

    Args:
        depth: 6n + 4.
        widen: Width factor k.
        dropout: Dropout inside the blocks (0 as in the KD literature's teachers).
        num_classes, in_chans, drop_rate, global_pool: As for every zoo model.
    """

    stem_names = ('conv1',)
    stage_names = ('layer1', 'layer2', 'layer3')
    post_names = ('norm', 'act')
    norm_names = ('norm', 'act')

    def __init__(
            self,
            depth: int = 28,
            widen: int = 4,
            dropout: float = 0.,
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.,
            global_pool: str = 'avg',
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f'WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}')
        num_blocks = (depth - 4) // 6
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)

        in_chs = 16
        reduction = 1
        for i, (base, stride) in enumerate(zip((16, 32, 64), (1, 2, 2))):
            out_chs = base * widen
            blocks = []
            for j in range(num_blocks):
                blocks.append(PreActBlock(in_chs, out_chs, stride if j == 0 else 1, dropout=dropout))
                in_chs = out_chs
            reduction *= stride
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{i + 1}'))
        self.norm = nn.BatchNorm2d(in_chs)
        self.act = nn.ReLU(inplace=True)

        self._init_head(in_chs, num_classes, drop_rate, global_pool)
        init_weights(self)


_VARIANTS = [(d, k) for d in (16, 28, 40) for k in (1, 2, 4)]

default_cfgs = generate_zoo_cfgs({f'cifar_wrn_{d}_{k}': cifar_cfg(pool_size=(8, 8)) for d, k in _VARIANTS})


def _create_wrn(depth: int, widen: int, pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    model_args: Dict[str, Any] = dict(depth=depth, widen=widen)
    return build_model_with_cfg(
        CifarWideResNet,
        f'cifar_wrn_{depth}_{widen}',
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2)),
        **dict(model_args, **kwargs),
    )


@register_zoo_model
def cifar_wrn_16_1(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-16-1 for CIFAR (2 blocks per stage, 16/32/64 channels)."""
    return _create_wrn(16, 1, pretrained, **kwargs)


@register_zoo_model
def cifar_wrn_16_2(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-16-2 for CIFAR (2 blocks per stage, 32/64/128 channels)."""
    return _create_wrn(16, 2, pretrained, **kwargs)


@register_zoo_model
def cifar_wrn_16_4(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-16-4 for CIFAR (2 blocks per stage, 64/128/256 channels)."""
    return _create_wrn(16, 4, pretrained, **kwargs)


@register_zoo_model
def cifar_wrn_28_1(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-28-1 for CIFAR (4 blocks per stage, 16/32/64 channels)."""
    return _create_wrn(28, 1, pretrained, **kwargs)


@register_zoo_model
def cifar_wrn_28_2(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-28-2 for CIFAR (4 blocks per stage, 32/64/128 channels)."""
    return _create_wrn(28, 2, pretrained, **kwargs)


@register_zoo_model
def cifar_wrn_28_4(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-28-4 for CIFAR (4 blocks per stage, 64/128/256 channels; 5.9M params at 100 classes)."""
    return _create_wrn(28, 4, pretrained, **kwargs)


@register_zoo_model
def cifar_wrn_40_1(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-40-1 for CIFAR (6 blocks per stage, 16/32/64 channels)."""
    return _create_wrn(40, 1, pretrained, **kwargs)


@register_zoo_model
def cifar_wrn_40_2(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-40-2 for CIFAR (6 blocks per stage, 32/64/128 channels)."""
    return _create_wrn(40, 2, pretrained, **kwargs)


@register_zoo_model
def cifar_wrn_40_4(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-40-4 for CIFAR (6 blocks per stage, 64/128/256 channels)."""
    return _create_wrn(40, 4, pretrained, **kwargs)
