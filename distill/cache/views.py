"""Replayable training augmentation: a view is the record of its random draws.

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

import contextlib
import random
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info
from torchvision.transforms import functional as F

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


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run the block with the torch CPU, Python and NumPy RNGs seeded with ``seed``.

    In a DataLoader worker the RNGs serve this loader only and are left as the block leaves
    them; in the main process they are restored afterwards.
    """
    if get_worker_info() is not None:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        yield
        return
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


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
