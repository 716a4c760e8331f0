"""Model zoo for distillation: importing it registers the CIFAR (32x32) architectures into timm's registry.

After ``import zoo``, ``timm.create_model('cifar_resnet56', num_classes=100)`` works; every zoo model follows
timm's classifier API. ``zoo.list_models()`` lists the zoo's architectures, ``zoo.POOLS`` / ``zoo.get_pool()``
the named teacher pools.
"""
from __future__ import annotations

from typing import List

from . import cifar
from .cifar._common import zoo_model_names
from .pools import POOLS, Pool, get_pool, list_pools

__all__ = ['list_models', 'POOLS', 'Pool', 'get_pool', 'list_pools']


def list_models() -> List[str]:
    """Return the sorted architecture names the zoo registered with timm (all start with ``cifar_``)."""
    return zoo_model_names()
