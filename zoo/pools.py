"""Named teacher pools for multi-teacher distillation: lists of timm model names (``arch.tag``)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, List, Tuple

__all__ = ['Pool', 'POOLS', 'get_pool', 'list_pools']


@dataclass(frozen=True)
class Pool:
    """A teacher pool: ``teachers`` are timm model names (optionally ``arch.tag``) trained on ``dataset``."""
    name: str
    teachers: Tuple[str, ...]
    dataset: str
    description: str


def _pools(*pools: Pool) -> Dict[str, Pool]:
    return {p.name: p for p in pools}


POOLS: Dict[str, Pool] = _pools(
    Pool(
        name='cifar100_cnn4',
        teachers=('cifar_regnety_400mf', 'cifar_regnetx_400mf', 'cifar_resnet32x4', 'cifar_wrn_28_4'),
        dataset='cifar100',
        description=(
            'The four CIFAR-100 CNN teachers of MTKD-RL (Table 1). The zoo has no public CIFAR-100 weights for '
            'them yet: the names build randomly initialised models, train the teachers first (or load your own '
            'checkpoints).'
        ),
    ),
    Pool(
        name='imagenet_cnn4',
        teachers=('resnet50.tv_in1k', 'resnet101.tv_in1k', 'wide_resnet50_2.tv_in1k', 'resnext50_32x4d.tv_in1k'),
        dataset='imagenet-1k',
        description='Four ImageNet CNN teachers with the torchvision weights used by MTKD-RL (timm names).',
    ),
    Pool(
        name='imagenet_vit3',
        teachers=('cait_s24_224.fb_dist_in1k', 'deit_small_patch16_224.fb_in1k', 'deit_base_patch16_224.fb_in1k'),
        dataset='imagenet-1k',
        description='Three ImageNet vision-transformer teachers (CaiT-S24, DeiT-S, DeiT-B; Facebook weights).',
    ),
    Pool(
        name='cifar10_resnet4',
        teachers=tuple(f'cifar_resnet{d}.akamaster_cifar10' for d in (20, 32, 44, 56)),
        dataset='cifar10',
        description=(
            'CIFAR ResNet-20/32/44/56 (option A) with the public CIFAR-10 weights of '
            'github.com/akamaster/pytorch_resnet_cifar10 (BSD-2-Clause); they expect ImageNet mean/std.'
        ),
    ),
)


def list_pools() -> List[str]:
    """Return the sorted names of the registered teacher pools."""
    return sorted(POOLS)


def get_pool(name: str) -> Pool:
    """Return the pool called ``name``; raises KeyError naming close matches when there is none."""
    try:
        return POOLS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(POOLS), n=3, cutoff=0.5)
        hint = f'; did you mean {", ".join(repr(c) for c in close)}?' if close else ''
        raise KeyError(f'unknown teacher pool {name!r}{hint} (known: {", ".join(list_pools())})') from None
