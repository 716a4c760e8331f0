"""Training and evaluation transforms: replayable views, the augment kinds, mixup.

Augment kinds (``data.augment``) are registered in :data:`distill.registries.AUGMENTS`;
each builds a dataset's training transform from an :class:`AugmentSetting`.
:func:`image_transforms` returns a dataset's (train, eval) transforms and
:func:`build_mixup` the batch-level ``timm.data.Mixup`` of a recipe.

Replayable training augmentation: a view is the record of its random draws.
:class:`ViewAugment` is the training transform of the cifar and timm augmentations (and
of digits). Called on an image it draws, from the RNGs the loader seeded for this item,
the crop box, the flip and (timm) one seed for every random op after them (RandAugment,
colour jitter, random erasing), in the order the live transform draws them, and applies
them. :meth:`ViewAugment.sample` returns that record with the tensor;
:meth:`ViewAugment.replay` applies a stored record and gives the same tensor again.

A record is ``int64 (PARAMS,)``: ``top, left, height, width, flip, interpolation, seed``.
The cifar crop is in padded coordinates (pad by ``padding`` with zeros, then crop).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.transforms import functional as F

from ..errors import DistillError
from ..registries import AUGMENTS
from .sampling import seeded_rngs

PARAMS = 7  # top, left, height, width, flip, interpolation index, seed of the later random ops
SEED_LIMIT = 2**62


def image_size(image: Any) -> Tuple[int, int]:
    """Return ``(width, height)`` of a PIL image or a ``(..., H, W)`` tensor."""
    width, height = F.get_image_size(image)
    return int(width), int(height)


class PadCrop:
    """``RandomCrop(size, padding)`` as torchvision draws it (two ``torch.randint``)."""

    def __init__(self, size: int, padding: int):
        self.size, self.padding = int(size), int(padding)

    def __repr__(self) -> str:
        return f"PadCrop(size={self.size}, padding={self.padding})"

    def draw(self, image: Any) -> Tuple[int, int, int, int, int]:
        """Return ``(top, left, height, width, interpolation=0)`` in padded coordinates."""
        width, height = image_size(image)
        height, width = height + 2 * self.padding, width + 2 * self.padding
        if height == self.size and width == self.size:  # torchvision draws nothing then
            return 0, 0, self.size, self.size, 0
        top = int(torch.randint(0, height - self.size + 1, size=(1,)).item())
        left = int(torch.randint(0, width - self.size + 1, size=(1,)).item())
        return top, left, self.size, self.size, 0

    def apply(self, image: Any, top: int, left: int, height: int, width: int, interpolation: int) -> Any:
        """Return the padded image cropped to the box."""
        if self.padding:
            image = F.pad(image, self.padding, 0, "constant")
        return F.crop(image, top, left, height, width)


class ResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` split into its draws and its application."""

    def __init__(self, op: Any):
        self.op = op
        self.choices = list(op.interpolation) if isinstance(op.interpolation, (tuple, list)) else [op.interpolation]

    def __repr__(self) -> str:
        return f"ResizedCrop({self.op!r})"

    def draw(self, image: Any) -> Tuple[int, int, int, int, int]:
        """Return ``(top, left, height, width, interpolation index)`` as timm draws them."""
        top, left, height, width = self.op.get_params(image, self.op.scale, self.op.ratio)
        index = self.choices.index(random.choice(self.choices)) if len(self.choices) > 1 else 0
        return int(top), int(left), int(height), int(width), index

    def apply(self, image: Any, top: int, left: int, height: int, width: int, interpolation: int) -> Any:
        """Return the box resized to the crop size."""
        return F.resized_crop(image, top, left, height, width, self.op.size, self.choices[interpolation])


class ViewAugment:
    """A training transform ``pre -> crop -> flip -> rest`` whose random draws form a record.

    ``pre`` (deterministic, e.g. a resize) runs first; ``crop`` (:class:`PadCrop` or
    :class:`ResizedCrop`) and the flip (probability ``flip_p``, one ``torch.rand``) are
    drawn as torchvision / timm draw them; ``rest`` (e.g. RandAugment, ToTensor,
    Normalize, RandomErasing) runs after them, under a seed drawn next from torch when
    ``rest_random`` (so its randomness is part of the record too).
    """

    def __init__(self, crop: Any, flip_p: float, rest: Optional[Callable] = None, rest_random: bool = False,
                 pre: Optional[Callable] = None):
        self.crop, self.flip_p = crop, float(flip_p)
        self.rest, self.rest_random, self.pre = rest, rest_random, pre

    def __repr__(self) -> str:
        return (f"ViewAugment(pre={self.pre!r}, crop={self.crop!r}, flip_p={self.flip_p}, rest={self.rest!r}, "
                f"rest_random={self.rest_random})")

    def __call__(self, image: Any) -> Any:
        return self.sample(image)[0]

    def sample(self, image: Any) -> Tuple[Any, Tensor]:
        """Return ``(augmented image, record int64 (PARAMS,))``, drawing from the global RNGs."""
        if self.pre is not None:
            image = self.pre(image)
        box = self.crop.draw(image)
        flip = int(bool(torch.rand(1) < self.flip_p)) if self.flip_p > 0 else 0
        seed = int(torch.randint(0, SEED_LIMIT, (1,)).item()) if self.rest_random else 0
        record = torch.tensor([*box[:4], flip, box[4], seed], dtype=torch.int64)
        return self._finish(image, record), record

    def replay(self, image: Any, record: Tensor) -> Any:
        """Return ``image`` augmented as the record ``(PARAMS,)`` says (no global RNG draw)."""
        if self.pre is not None:
            image = self.pre(image)
        return self._finish(image, record)

    def _finish(self, image: Any, record: Tensor) -> Any:
        top, left, height, width, flip, interpolation, seed = (int(v) for v in record.tolist())
        image = self.crop.apply(image, top, left, height, width, interpolation)
        if flip:
            image = F.hflip(image)
        if self.rest is None:
            return image
        if not self.rest_random:
            return self.rest(image)
        with seeded_rngs(seed):
            return self.rest(image)


def timm_view_augment(transform: Any) -> ViewAugment:
    """Return the :class:`ViewAugment` of a timm ``create_transform(is_training=True)`` Compose."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    ops: Sequence[Any] = list(transform.transforms)
    if not ops or not isinstance(ops[0], RandomResizedCropAndInterpolation):
        raise ValueError(f"timm training transform does not start with a random resized crop: {transform}")
    flip_p, rest = 0.0, ops[1:]
    if rest and isinstance(rest[0], T.RandomHorizontalFlip):
        flip_p, rest = rest[0].p, rest[1:]
    return ViewAugment(ResizedCrop(ops[0]), flip_p, T.Compose(list(rest)), rest_random=True)


# ----------------------------------------------------------------------------- augment kinds


@dataclass(frozen=True)
class AugmentSetting:
    """What an augment kind builds a training transform from."""

    size: int  # square side of the training images
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    default: str  # the kind 'auto' stands for on this dataset
    dataset: str  # human-readable name for messages
    tensor: bool = False  # images are [0, 1] tensors (normalised by the dataset), not PIL images
    geometry: List[Callable] = field(default_factory=list)  # deterministic PIL ops before the random ones
    eval_transform: Optional[Callable] = None  # the evaluation transform (None: tensors, nothing to do)
    timm_args: Dict[str, Any] = field(default_factory=dict)  # create_transform kwargs (augment: timm)


@AUGMENTS.register("auto")
def auto_augment(setting: AugmentSetting) -> Optional[Callable]:
    """The dataset's default kind: none for digits, cifar for CIFAR, timm for image files."""
    return AUGMENTS.get(setting.default, "data.augment")(setting)


@AUGMENTS.register("none")
def no_augment(setting: AugmentSetting) -> Optional[Callable]:
    """No random augmentation: training items are transformed as evaluation items."""
    return setting.eval_transform


@AUGMENTS.register("cifar")
def cifar_augment(setting: AugmentSetting) -> Callable:
    """RandomCrop(size, padding=size // 8) + RandomHorizontalFlip, as a replayable view."""
    if setting.tensor:  # on the [0, 1] tensor, so padding is black as for image files
        return ViewAugment(PadCrop(setting.size, max(1, setting.size // 8)), 0.5)
    from torchvision import transforms as T

    finish = T.Compose([T.ToTensor(), T.Normalize(setting.mean, setting.std)])
    return ViewAugment(PadCrop(setting.size, setting.size // 8), 0.5, finish,
                       pre=T.Compose(setting.geometry) if setting.geometry else None)


@AUGMENTS.register("timm")
def timm_augment(setting: AugmentSetting) -> Callable:
    """timm's training transform (random resized crop, flip, RandAugment, erasing, ...), replayable."""
    if setting.tensor:
        raise DistillError(f"data.augment: 'timm' augmentation needs image files; {setting.dataset} supports "
                           "none or cifar")
    from timm.data import create_transform

    size = setting.size
    return timm_view_augment(create_transform((3, size, size), is_training=True, mean=setting.mean,
                                              std=setting.std, **setting.timm_args))


def timm_transform_args(cfg: Any) -> Dict[str, Any]:
    """Return the ``create_transform`` training kwargs of a DataConfig (RandAugment, erasing, ...)."""
    args: Dict[str, Any] = {"auto_augment": getattr(cfg, "auto_augment", None),
                            "re_prob": getattr(cfg, "re_prob", 0.0),
                            "interpolation": getattr(cfg, "interpolation", "bilinear")}
    if getattr(cfg, "color_jitter", None) is not None:
        args["color_jitter"] = cfg.color_jitter
    return args


def image_transforms(info: Any, size: int, augment: str, mean: Tuple[float, ...], std: Tuple[float, ...],
                     timm_args: Optional[Dict[str, Any]] = None) -> Tuple[Callable, Callable]:
    """Return (train, eval) transforms from a PIL image to a normalised tensor ``(C, size, size)``.

    ``info`` is a registered dataset (:mod:`distill.data.datasets`): images of a fixed size
    are resized only when ``size`` differs; image files of any size get timm's evaluation
    resize + centre crop. ``augment`` is a kind registered in :data:`AUGMENTS`.
    """
    from torchvision import transforms as T

    if not info.fixed_size:  # image files of any size: timm's eval (resize + centre crop)
        from timm.data import create_transform

        eval_tf = create_transform((3, size, size), is_training=False, mean=mean, std=std)
        geometry = [T.Resize(size), T.CenterCrop(size)]
    else:  # fixed-size images, resized only when asked
        geometry = [T.Resize(size)] if size != info.input_size else []
        eval_tf = T.Compose(geometry + [T.ToTensor(), T.Normalize(mean, std)])
    setting = AugmentSetting(size, tuple(mean), tuple(std), info.augment, info.label, False, geometry, eval_tf,
                             dict(timm_args or {}))
    return AUGMENTS.get(augment, "data.augment")(setting), eval_tf


# ----------------------------------------------------------------------------- batch mixing


def build_mixup(cfg: Any, num_classes: int) -> Optional[Callable]:
    """Return a ``timm.data.Mixup`` for a DataConfig, or None when it mixes nothing.

    With mixup / cutmix off but ``label_smoothing`` > 0 it still returns a Mixup with
    ``prob=0`` so that targets become smoothed one-hot ``(B, C)``. The returned callable
    maps ``(x, y) -> (x', soft targets (B, C))`` and needs an even batch size.
    """
    mixup, cutmix = getattr(cfg, "mixup", 0.0), getattr(cfg, "cutmix", 0.0)
    smoothing = getattr(cfg, "label_smoothing", 0.0)
    if mixup <= 0 and cutmix <= 0 and smoothing <= 0:
        return None
    from timm.data import Mixup

    prob = getattr(cfg, "mixup_prob", 1.0) if (mixup > 0 or cutmix > 0) else 0.0
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob,
                 switch_prob=getattr(cfg, "mixup_switch_prob", 0.5), mode="batch",
                 label_smoothing=smoothing, num_classes=num_classes)
