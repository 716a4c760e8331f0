"""Hugging Face datasets (``data.dataset: hfds/NAME``) read offline: items, errors, and a run end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill import cli
from distill.data import build_data, build_loader
from distill.errors import DistillError, RecipeError
from distill.recipe import DataConfig

torch.set_num_threads(1)

COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))  # class c is mostly colour c
CLASSES = ["red", "green", "blue"]


def _write_dataset(folder: Path, n_train: int = 48, n_test: int = 24, size: int = 16) -> None:
    """Write the Hub's data-dir layout (data/{split}-00000-of-00001.parquet): image + ClassLabel columns."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [i % 3 for i in range(n)]
        images = []
        for c in labels:
            pixels = np.clip(np.array(COLOURS[c]) * 0.8 + rng.integers(0, 50, (size, size, 3)), 0, 255)
            images.append(Image.fromarray(pixels.astype(np.uint8)))
        table = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    _write_dataset(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)  # hfds/tiny: the local folder ./tiny
    return "hfds/tiny"


def test_hfds_items_labels_and_seeded_augmentation(tiny):
    bundle = build_data(DataConfig(dataset=tiny, input_size=16))
    assert (bundle.num_classes, bundle.class_names, bundle.input_size) == (3, CLASSES, (3, 16, 16))
    assert (len(bundle.train), len(bundle.val)) == (48, 24)
    assert bundle.train.targets == [i % 3 for i in range(48)]
    for i in range(6):  # decoded in the written colour: the class's channel is the brightest after normalising
        x, y = bundle.val[i]
        assert x.shape == (3, 16, 16) and y == i % 3
        assert int(x.mean(dim=(1, 2)).argmax()) == y

    def first_batch(epoch):
        loader = build_loader(bundle.train, 8, True, 0, seed=3)
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    (a, ya), (b, yb), (c, _) = first_batch(0), first_batch(0), first_batch(1)
    assert torch.equal(a, b) and torch.equal(ya, yb)  # per-item seeding: the same views again
    assert not torch.equal(a, c)


def test_hfds_errors_name_the_field(tiny, tmp_path):
    with pytest.raises(DistillError, match="data.dataset: cannot read hfds/missing from the local"):
        build_data(DataConfig(dataset="hfds/missing"))
    with pytest.raises(DistillError, match="names no dataset"):
        build_data(DataConfig(dataset="hfds/"))
    with pytest.raises(RecipeError, match="unknown dataset 'hfd'"):
        build_data(DataConfig(dataset="hfd"))


def test_hfds_recipe_trains_and_evaluates_end_to_end(tiny, tmp_path, capsys):
    raw = {
        "name": "hfds-tiny", "output_dir": str(tmp_path / "run"),
        "data": {"dataset": tiny, "input_size": 16, "augment": "cifar", "batch_size": 8, "num_workers": 0},
        "student": "cifar_resnet8",
        "teachers": [{"model": "cifar_resnet8", "pretrained": False, "train": {"epochs": 1, "lr": 0.05}}],
        "optim": {"lr": 0.05},
        "schedule": {"name": "multistep", "epochs": 1, "milestones": []},
        "run": {"progress": False},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.train_main([str(path)]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    lines = (run / "summary.csv").read_text().splitlines()
    assert len(lines) == 2  # header + one epoch

    assert cli.eval_main([str(run), "--dataset", tiny, "--num-workers", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].endswith(f"on {tiny} (24 images)")
    top1 = float(out[-1].split()[0].split("=")[1])
    assert top1 == pytest.approx(results["student"]["best_top1"], abs=0.01)
