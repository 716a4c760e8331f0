"""CIFAR ResNets: He et al.'s 6n+2 networks and the CRD-style wide "x4" variants, for 32x32 inputs.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2: a 3x3 stem conv (16 channels),
three stages of n BasicBlocks with 16/32/64 channels (strides 1/2/2), global average pooling and a linear
classifier; depth = 6n + 2. Option-A shortcuts (the paper's CIFAR choice) are parameter free: subsample by
the stride and zero-pad the new channels; option B uses a 1x1 conv + BN projection where the shape changes.

``cifar_resnet8x4`` / ``cifar_resnet32x4`` are the 4x-wide variants used as KD teachers since CRD
(Tian et al., ICLR 2020): 32-channel stem, stages of 64/128/256 channels, option-B shortcuts.

Parameter counts at 100 classes: resnet8 0.08M, resnet14 0.18M, resnet20 0.28M, resnet32 0.47M,
resnet44 0.67M, resnet56 0.86M, resnet110 1.73M, resnet8x4 1.23M, resnet32x4 7.43M.

``cifar_resnet20/32/44/56`` have the tag ``akamaster_cifar10``: CIFAR-10 weights from
github.com/akamaster/pytorch_resnet_cifar10 (BSD-2-Clause, option A), trained with ImageNet mean/std.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg

from ._common import IMAGENET_MEAN, IMAGENET_STD, CifarNet, cifar_cfg, generate_zoo_cfgs, init_weights, \
    register_zoo_model

__all__ = ['CifarResNet', 'BasicBlock', 'PadShortcut', 'akamaster_filter_fn']


class PadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling by ``stride`` and zero channels padded on both sides (no params).

    (B, in_chs, H, W) -> (B, out_chs, ceil(H/stride), ceil(W/stride)); with out_chs = 2 * in_chs this pads
    out_chs // 4 zero channels in front and behind, as the original CIFAR ResNet code does.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        assert out_chs >= in_chs, 'option-A shortcut can only add channels'
        self.stride = stride
        self.pad_front = (out_chs - in_chs) // 2
        self.pad_back = out_chs - in_chs - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Post-activation residual block of two 3x3 convs: (B, in_chs, H, W) -> (B, out_chs, H/stride, W/stride)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, shortcut: str = 'A') -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        if stride == 1 and in_chs == out_chs:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == 'A':
            self.shortcut = PadShortcut(in_chs, out_chs, stride)
        elif shortcut == 'B':
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(CifarNet):
    """CIFAR ResNet of depth 6n+2: 3x3 stem, three BasicBlock stages (strides 1/2/2), avg pool, ``fc``.

    Args:
        depth: Total depth, 6n + 2 (n blocks per stage).
        widths: Stem width followed by the three stage widths.
        shortcut: 'A' (parameter-free pad shortcut) or 'B' (1x1 conv + BN projection) where shapes change.
        num_classes: Classifier outputs (0: no classifier, forward returns pooled features).
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier.
        global_pool: Pooling type for the head.

    ``forward_features`` returns (B, widths[-1], H/4, W/4), i.e. 8x8 for 32x32 input.
    """

    stem_names = ('conv1', 'bn1', 'act1')
    stage_names = ('layer1', 'layer2', 'layer3')

    def __init__(
            self,
            depth: int = 56,
            widths: Sequence[int] = (16, 16, 32, 64),
            shortcut: str = 'A',
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.,
            global_pool: str = 'avg',
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f'CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}')
        if len(widths) != 4:
            raise ValueError('widths must be (stem, stage1, stage2, stage3)')
        num_blocks = (depth - 2) // 6
        self.in_chans = in_chans
        self.shortcut_type = shortcut

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)

        in_chs = widths[0]
        reduction = 1
        for i, (out_chs, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for j in range(num_blocks):
                blocks.append(BasicBlock(in_chs, out_chs, stride if j == 0 else 1, shortcut=shortcut))
                in_chs = out_chs
            reduction *= stride
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{i + 1}'))

        self._init_head(in_chs, num_classes, drop_rate, global_pool)
        init_weights(self)


def akamaster_filter_fn(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Convert an akamaster checkpoint to this module's key names; returns a state dict that loads strictly.

    Accepts the whole checkpoint ``{'state_dict': {'module.<key>': tensor}, 'best_prec1': float}`` or an
    already-unwrapped state dict; strips the DataParallel ``module.`` prefix and renames ``linear.`` to ``fc.``.
    The checkpoints predate BatchNorm's ``num_batches_tracked`` buffers; those are taken from ``model``.
    """
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], Mapping):
        state_dict = state_dict['state_dict']
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.startswith('module.'):
            key = key[len('module.'):]
        if key.startswith('linear.'):
            key = 'fc.' + key[len('linear.'):]
        out[key] = value
    if model is not None:
        for key, value in model.state_dict().items():
            if key.endswith('num_batches_tracked') and key not in out:
                out[key] = torch.zeros_like(value)
    return out


checkpoint_filter_fn = akamaster_filter_fn  # timm's name for a module's key mapping (distill.weightfile finds it)

_AKAMASTER_URL = 'https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/'
_AKAMASTER_FILES = {
    20: 'resnet20-12fca82f.th',
    32: 'resnet32-d509ac18.th',
    44: 'resnet44-014dd654.th',
    56: 'resnet56-4bfd9763.th',
}


def _akamaster_cfg(depth: int) -> Dict[str, Any]:
    return cifar_cfg(
        url=_AKAMASTER_URL + _AKAMASTER_FILES[depth],
        num_classes=10,
        pool_size=(8, 8),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        license='bsd-2-clause',
        origin_url='https://github.com/akamaster/pytorch_resnet_cifar10',
        paper_name='Deep Residual Learning for Image Recognition',
        paper_ids='arXiv:1512.03385',
        description=f'ResNet-{depth} (option A) trained on CIFAR-10 by Yerlan Idelbayev.',
    )


default_cfgs = generate_zoo_cfgs({
    **{f'cifar_resnet{d}': cifar_cfg(pool_size=(8, 8)) for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f'cifar_resnet{d}.akamaster_cifar10': _akamaster_cfg(d) for d in _AKAMASTER_FILES},
    'cifar_resnet8x4': cifar_cfg(pool_size=(8, 8)),
    'cifar_resnet32x4': cifar_cfg(pool_size=(8, 8)),
})


def _create_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        pretrained_filter_fn=akamaster_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2)),
        **kwargs,
    )


def _he_resnet(depth: int, variant: str, pretrained: bool, **kwargs: Any) -> CifarResNet:
    model_args: Dict[str, Any] = dict(depth=depth, widths=(16, 16, 32, 64), shortcut='A')
    return _create_resnet(variant, pretrained, **dict(model_args, **kwargs))


@register_zoo_model
def cifar_resnet8(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-8 for CIFAR (n=1, 16/32/64 channels, option-A shortcuts by default)."""
    return _he_resnet(8, 'cifar_resnet8', pretrained, **kwargs)


@register_zoo_model
def cifar_resnet14(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-14 for CIFAR (n=2, 16/32/64 channels, option-A shortcuts by default)."""
    return _he_resnet(14, 'cifar_resnet14', pretrained, **kwargs)


@register_zoo_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (n=3, option A by default); tag ``akamaster_cifar10`` has CIFAR-10 weights."""
    return _he_resnet(20, 'cifar_resnet20', pretrained, **kwargs)


@register_zoo_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (n=5, option A by default); tag ``akamaster_cifar10`` has CIFAR-10 weights."""
    return _he_resnet(32, 'cifar_resnet32', pretrained, **kwargs)


@register_zoo_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (n=7, option A by default); tag ``akamaster_cifar10`` has CIFAR-10 weights."""
    return _he_resnet(44, 'cifar_resnet44', pretrained, **kwargs)


@register_zoo_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (n=9, option A by default); tag ``akamaster_cifar10`` has CIFAR-10 weights."""
    return _he_resnet(56, 'cifar_resnet56', pretrained, **kwargs)


@register_zoo_model
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (n=18, 16/32/64 channels, option-A shortcuts by default)."""
    return _he_resnet(110, 'cifar_resnet110', pretrained, **kwargs)


@register_zoo_model
def cifar_resnet8x4(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-8x4 (CRD): 32-channel stem, one block per stage of 64/128/256 channels, option-B shortcuts."""
    model_args: Dict[str, Any] = dict(depth=8, widths=(32, 64, 128, 256), shortcut='B')
    return _create_resnet('cifar_resnet8x4', pretrained, **dict(model_args, **kwargs))


@register_zoo_model
def cifar_resnet32x4(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32x4 (CRD): 32-channel stem, five blocks per stage of 64/128/256 channels, option B (7.4M)."""
    model_args: Dict[str, Any] = dict(depth=32, widths=(32, 64, 128, 256), shortcut='B')
    return _create_resnet('cifar_resnet32x4', pretrained, **dict(model_args, **kwargs))
