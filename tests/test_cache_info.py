"""distill-cache info RECIPE: the projected size before the build equals the built cache's tensors."""

import json

import torch

from distill.cache.projection import project
from distill.cache.store import cache_root, open_cache
from distill.cli import cache_main

torch.set_num_threads(1)


def _recipe_file(tmp_path, features):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({
        "name": "c", "output_dir": str(tmp_path / "run"), "seed": 3,
        "data": {"dataset": "digits", "num_workers": 0, "train_subset": 40, "augment": "cifar", "batch_size": 16,
                 "fixed_views": 3},
        "student": "cifar_resnet8",
        "teachers": [{"model": "cifar_resnet8", "pretrained": False}, {"model": "cifar_resnet14", "pretrained": False}],
        "distill": {"features": features},
        "run": {"device": "cpu", "progress": False, "teacher_cache": "auto", "teacher_top_k": 4}}))
    return path


def _projected_mib(out):
    """Return the MiB of the projection's records, logits and feature lines."""
    return [float(line.split()[1]) for line in out.splitlines()
            if line.split()[:1] in (["records"], ["logits"], ["feature"]) and line.startswith("  ")]


def test_info_projects_the_size_before_the_build_and_it_matches(tmp_path, capsys):
    for features in ("last_map", "pre_logits"):
        recipe = _recipe_file(tmp_path, features)
        assert cache_main(["info", str(recipe)]) == 0
        out = capsys.readouterr().out
        assert "not built yet" in out and "40 images x 3 views x 2 teachers" in out
        assert ("last_map stores whole feature maps" in out) == (features == "last_map")
        assert cache_main(["build", str(recipe), "--shard-images", "16"]) == 0
        capsys.readouterr()
        (folder,) = [f for f in cache_root().iterdir() if json.loads((f / "index.json").read_text())["spec"]
                     ["teachers"][0]["tap"][0] == features]
        cache = open_cache(folder)
        feature_rows = [[tuple(a.row_shape)] + ([tuple(e.row_shape)] if e is not None else [])
                        for a, e in zip(cache.features, cache.embeddings)]
        size = project(40, 3, 4, 10, ["a", "b"], feature_rows)
        assert size.total == cache.nbytes  # every stored tensor, counted
        assert size.logits == 40 * 3 * 2 * (4 * (2 + 2) + 4 + 2 + 4) and size.records == 40 * 3 * 7 * 8
        assert cache_main(["info", str(recipe)]) == 0  # built: the projection, then the cache itself
        out = capsys.readouterr().out
        assert f"key        {folder.name}" in out and "40/40 images" in out and "view seed  3" in out
        assert "logits and ids, tail, label and its logit)" in out  # top-4 of 10: tails kept
        parts = _projected_mib(out)
        assert len(parts) == 4 and abs(sum(parts) * 2**20 - cache.nbytes) <= 0.05 * 2**20 * len(parts)  # rounding


def test_projection_names_tails_only_when_kept():
    from distill.cache.projection import describe_projection, project

    full = describe_projection(project(10, 1, 10, 10, ["a"], [[(4,)]]), "pre_logits")
    topk = describe_projection(project(10, 1, 4, 10, ["a"], [[(4,)]]), "pre_logits")
    assert full[2].endswith("(40 bytes per view and teacher: top-k fp16 logits and ids)")
    assert topk[2].endswith("(26 bytes per view and teacher: top-k fp16 logits and ids, tail, label and its logit)")
