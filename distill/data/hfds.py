"""Hugging Face datasets: ``data.dataset: hfds/NAME[:config]``, read offline from the local cache.

``NAME`` is what ``datasets.load_dataset`` takes: a Hub id (``org/name``) already in the
Hugging Face datasets cache (``data.root`` as ``cache_dir``, else ``HF_DATASETS_CACHE``),
or a local folder of data files (the data-dir form: ``train-*.parquet``, ``test-*.parquet``
...). Nothing is downloaded: fill the cache once with ``datasets.load_dataset(NAME)``.

The training split is ``train``, the evaluation split ``validation`` or else ``test``; the
image column is the first ``datasets.Image`` feature and the label column the first
``ClassLabel`` (its names are the class names, in label order). Items are indexable and
decoded per item, so the loader's per-item seeding (:mod:`distill.data.sampling`) holds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

from torch.utils.data import Dataset

from ..errors import DistillError
from ..fetch import offline
from ..registries import DATASETS
from .datasets import ImageFiles
from .images import decode_image

EVAL_SPLITS = ("validation", "test")


def parse_hfds(spec: str) -> Tuple[str, Optional[str]]:
    """Return ``(NAME, config or None)`` of ``hfds/NAME[:config]``."""
    rest = spec[len("hfds/"):]
    name, sep, config = rest.rpartition(":")
    if not sep or "/" in config or not name:
        name, config = rest, ""
    if not name:
        raise DistillError(f"data.dataset: {spec!r} names no dataset; write hfds/NAME or hfds/NAME:CONFIG")
    return name, config or None


@contextlib.contextmanager
def hf_datasets_offline() -> Iterator[None]:
    """Within the block, ``datasets`` and the Hub read local files only."""
    from datasets import config

    saved = config.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = True
    try:
        with offline():
            yield
    finally:
        config.HF_HUB_OFFLINE = saved


class HFImageDataset(Dataset):
    """One split of a Hugging Face dataset: items ``(transform(PIL image), int label)``.

    ``targets`` (the label column) and ``classes`` are read without decoding an image.
    """

    def __init__(self, table: Any, image_key: str, label_key: str, classes: List[str], transform: Callable,
                 root: str):
        import datasets

        self.table = table.cast_column(image_key, datasets.Image(decode=False))
        self.image_key, self.label_key = image_key, label_key
        self.targets = [int(t) for t in table[label_key]]
        self.classes = classes
        self.transform = transform
        self.root = root  # for messages

    def __len__(self) -> int:
        return len(self.targets)

    def raw_image(self, index: int) -> Any:
        """Return item ``index``'s RGB PIL image, untransformed."""
        cell = self.table[int(index)][self.image_key]
        if cell.get("bytes"):
            return decode_image(cell["bytes"], f"{self.root}[{index}]")
        with open(cell["path"], "rb") as handle:
            return decode_image(handle.read(), cell["path"])

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        return self.transform(self.raw_image(index)), self.targets[index]


def columns(features: Any, where: str) -> Tuple[str, str, List[str]]:
    """Return ``(image column, label column, class names)`` of a split's features."""
    import datasets

    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if not images or not labels:
        found = ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items())
        raise DistillError(f"data.dataset: {where} needs an image column (datasets.Image) and a label column "
                           f"(datasets.ClassLabel); it has: {found}")
    return images[0], labels[0], list(features[labels[0]].names)


@DATASETS.register("hfds")
class HuggingFaceDataset(ImageFiles):
    """hfds/NAME[:config]: a Hugging Face image dataset, read offline from the local cache."""

    label, class_unit = "Hugging Face dataset", "classes"

    def read(self, cfg: Any, train_tf: Any, eval_tf: Any) -> Tuple[Dataset, Dataset]:
        """Return the (train, validation-or-test) splits of the cached dataset."""
        import datasets

        name, config = parse_hfds(self.spec)
        where = f"hfds/{name}" + (f":{config}" if config else "")
        cache_dir = str(Path(cfg.root).expanduser()) if cfg.root else None
        try:
            with hf_datasets_offline():
                splits = datasets.load_dataset(name, config, cache_dir=cache_dir)
        except (OSError, ValueError) as exc:  # not cached: FileNotFoundError or ConnectionError, both OSError
            raise DistillError(f"data.dataset: cannot read {where} from the local Hugging Face datasets cache "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); fill the cache once "
                               f"online with datasets.load_dataset({name!r}), or give data.root as its cache_dir"
                               ) from None
        if "train" not in splits:
            raise DistillError(f"data.dataset: {where} has no train split (splits: {', '.join(splits)})")
        val_split = next((s for s in EVAL_SPLITS if s in splits), None)
        if val_split is None:
            raise DistillError(f"data.dataset: {where} has no validation or test split (splits: {', '.join(splits)})")
        image_key, label_key, classes = columns(splits["train"].features, where)
        val_classes = columns(splits[val_split].features, f"{where} ({val_split})")[2]
        train = HFImageDataset(splits["train"], image_key, label_key, classes, train_tf, f"{where} (train)")
        val = HFImageDataset(splits[val_split], image_key, label_key, val_classes, eval_tf, f"{where} ({val_split})")
        return train, val
