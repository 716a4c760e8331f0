"""Shared pieces of the CIFAR model zoo: pretrained-cfg helpers, the registry hook and a classifier base class.

Every zoo model is a :class:`CifarNet`. A subclass builds its layers as named child modules and declares, as
tuples of (dotted) module names, which run as the stem, which are the stages (one feature map each), which run
after the last stage before pooling (``post_names``) and which of those are a final norm (``norm_names``). The
base class derives timm's classifier API from that: ``forward_features``, ``forward_head``, ``forward``,
``forward_intermediates``, ``prune_intermediate_layers``, ``get_classifier``, ``reset_classifier``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.layers import create_classifier
from timm.models import _registry as _timm_registry
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

__all__ = [
    'CIFAR100_MEAN', 'CIFAR100_STD', 'IMAGENET_MEAN', 'IMAGENET_STD',
    'CifarNet', 'cifar_cfg', 'generate_zoo_cfgs', 'register_zoo_model', 'zoo_model_names',
]

CIFAR100_MEAN: Tuple[float, float, float] = (0.5071, 0.4867, 0.4408)
CIFAR100_STD: Tuple[float, float, float] = (0.2675, 0.2565, 0.2761)

_ZOO_MODEL_NAMES: set[str] = set()


def cifar_cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    """Return a pretrained-cfg dict for a 32x32 CIFAR model (CIFAR-100 statistics and 100 classes by default)."""
    cfg: Dict[str, Any] = {
        'url': url,
        'num_classes': 100,
        'input_size': (3, 32, 32),
        'pool_size': None,
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': CIFAR100_MEAN,
        'std': CIFAR100_STD,
        'first_conv': 'conv1',
        'classifier': 'fc',
    }
    cfg.update(kwargs)
    return cfg


def generate_zoo_cfgs(cfgs: Dict[str, Dict[str, Any]]):
    """Like timm's ``generate_default_cfgs``, but an untagged entry always stays its architecture's default.

    timm makes the first tag *with weights* the default; in the zoo the untagged entry means "random init"
    (e.g. the CIFAR-100 ``cifar_resnet56``), and weights must be asked for by tag
    (``cifar_resnet56.akamaster_cifar10``). Returns the dict of ``DefaultCfg`` keyed by architecture.
    """
    out = generate_default_cfgs(cfgs)
    for default_cfg in out.values():
        if '' in default_cfg.cfgs and default_cfg.tags[0] != '':
            default_cfg.tags.remove('')
            default_cfg.tags.appendleft('')
    return out


ZOO_MODULE = 'zoo'  # the module name timm lists the zoo's models under: timm.list_models(module='zoo')


def register_zoo_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` with timm (``timm.models.register_model``) and remember it as a zoo architecture.

    timm files a model under the last part of its Python module's name; ours (``resnet``, ``regnet``) would
    mix the zoo into timm's own ``timm.list_models(module='resnet')``, so the entry is moved to ``'zoo'``.
    """
    name = fn.__name__
    _ZOO_MODEL_NAMES.add(name)
    fn = register_model(fn)
    model_to_module = getattr(_timm_registry, '_model_to_module', None)
    module_to_models = getattr(_timm_registry, '_module_to_models', None)
    if isinstance(model_to_module, dict) and isinstance(module_to_models, dict):  # private; skip if it changes
        old = model_to_module.get(name)
        if old is not None and old in module_to_models:
            module_to_models[old].discard(name)
            if not module_to_models[old]:
                del module_to_models[old]
        model_to_module[name] = ZOO_MODULE
        module_to_models.setdefault(ZOO_MODULE, set()).add(name)
    return fn


def zoo_model_names() -> List[str]:
    """Return the sorted names of every architecture registered by the zoo."""
    return sorted(_ZOO_MODEL_NAMES)


def init_weights(module: nn.Module) -> None:
    """Initialise convs (Kaiming normal, fan-out), norms (1/0) and linears (N(0, 0.01), zero bias) in place."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class CifarNet(nn.Module):
    """Base class of the zoo's CNN classifiers, implementing timm's classifier API from named module groups.

    Subclasses set ``stem_names``, ``stage_names``, ``post_names`` and ``norm_names`` (tuples of module names,
    dotted names allowed), build those modules, fill ``feature_info`` (one dict per stage) and finally call
    :meth:`_init_head`. ``forward_features`` runs stem -> stages -> post modules and returns the last feature
    map (B, num_features, H, W); ``forward_head`` average-pools, applies head dropout and the ``fc`` classifier.
    """

    stem_names: Tuple[str, ...] = ()
    stage_names: Tuple[str, ...] = ()
    post_names: Tuple[str, ...] = ()
    norm_names: Tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.feature_info: List[Dict[str, Any]] = []

    # construction helpers -------------------------------------------------------------------------------------

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float, global_pool: str = 'avg') -> None:
        """Create ``global_pool`` and the ``fc`` classifier and set the head attributes; call last in __init__."""
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)

    def _replace_module(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition('.')
        setattr(self.get_submodule(parent) if parent else self, child, module)

    def _run(self, names: Tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = self.get_submodule(name)(x)
        return x

    # timm API ---------------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each stage in ``forward_features`` (saves memory when training)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """Return the final classifier (``nn.Linear``, or ``nn.Identity`` when num_classes == 0)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` outputs (0: no classifier).

        ``global_pool`` ('avg', 'max', ..., or '' for none) changes the pooling when given.
        """
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool_type)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stem: (B, in_chans, H, W) -> (B, C_stem, H', W')."""
        return self._run(self.stem_names, x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map before global pooling, (B, num_features, H/r, W/r)."""
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.get_submodule(n) for n in self.stage_names], x)
        else:
            x = self._run(self.stage_names, x)
        return self._run(self.post_names, x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool a feature map: (B, num_features) if ``pre_logits`` else logits (B, num_classes)."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (B, num_classes) for images (B, in_chans, H, W)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the output map of selected stages.

        Args:
            x: Images (B, in_chans, H, W).
            indices: Last n stages if int, all stages if None, else the listed stage indices (negative allowed).
            norm: Pass the last stage's map through the final norm (models with one, e.g. pre-act WRN).
            stop_early: Stop after the last stage requested (only with ``intermediates_only``).
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the list of stage maps.

        Returns:
            List of (B, C_i, H_i, W_i) stage maps, or ``(forward_features(x), that list)``.
        """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        num_stages = len(self.stage_names)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        stage_names = self.stage_names
        if stop_early and intermediates_only:
            stage_names = stage_names[:max_index + 1]

        intermediates = []
        x = self.forward_stem(x)
        for idx, name in enumerate(stage_names):
            x = self.get_submodule(name)(x)
            if idx in take_indices:
                if norm and idx == num_stages - 1:
                    intermediates.append(self._run(self.norm_names, x))
                else:
                    intermediates.append(x)

        if intermediates_only:
            return intermediates
        return self._run(self.post_names, x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and post layers / head) not needed for the requested intermediates.

        Returns:
            The absolute stage indices kept.
        """
        num_stages = len(self.stage_names)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        for name in self.stage_names[max_index + 1:]:
            self._replace_module(name, nn.Identity())
        prune_end = max_index < num_stages - 1
        if prune_end:
            # features now end at the last kept stage: post layers and the head (sized for them) go
            for name in self.post_names:
                self._replace_module(name, nn.Identity())
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        elif prune_norm:
            for name in self.norm_names:
                self._replace_module(name, nn.Identity())
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices
