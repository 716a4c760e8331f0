"""The discrimination benchmark's corrupted teachers: every path to their logits and
features (the tap's split head, the tapped map, a head applied to another feature) carries
the corruption the study claims, so the benchmark measures what its tables say."""

import json
import sys
from pathlib import Path

import pytest
import timm
import torch

import zoo  # noqa: F401  (registers the CIFAR archs)
from distill.taps import TappedModel, parse_feature_tap

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import corruptions  # noqa: E402
import discrimination  # noqa: E402


@pytest.fixture(scope="module")
def inner():
    torch.manual_seed(0)
    return timm.create_model("cifar_resnet8", num_classes=10).eval()


def _tapped(model, tap="last_map"):
    return TappedModel(model, parse_feature_tap(tap), (3, 32, 32))


def _corrupted(inner, kind, index):
    return corruptions.CorruptedModel(inner, kind, index).eval()  # frozen, as a teacher


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_blind_teacher_is_wrong_exactly_on_its_classes_through_the_tap(inner, index):
    torch.manual_seed(1)
    x = torch.randn(64, 3, 32, 32)
    clean = _tapped(inner)(x).logits
    out = _tapped(_corrupted(inner, "blind", index))(x)
    blind = clean.argmax(-1) % corruptions.BLIND_PERIOD == index
    assert torch.equal(out.logits[blind], clean[blind].roll(1, dims=-1))
    assert torch.equal(out.logits[~blind], clean[~blind])
    # the head CA-MKD applies to a projected feature carries the same corruption
    assert torch.allclose(_tapped(_corrupted(inner, "blind", index)).head(out.feature), out.logits)


def test_shift_teacher_rolls_every_logit_and_keeps_its_feature(inner):
    x = torch.randn(8, 3, 32, 32)
    clean = _tapped(inner)(x)
    for tap in ("last_map", "pre_logits"):
        model = _corrupted(inner, "shift", 3)
        out = _tapped(model, tap)(x)
        assert torch.equal(out.logits, clean.logits.roll(1, dims=-1))
        assert torch.allclose(_tapped(model, tap).head(out.feature), out.logits)
    assert torch.equal(out.embedding, clean.embedding)


def test_noise_feature_teacher_exposes_noise_keeps_logits_and_its_head_reads_its_input(inner):
    x = torch.randn(8, 3, 32, 32)
    clean = _tapped(inner)(x)
    model = _corrupted(inner, "noise_feature", 3)
    tapped = _tapped(model)
    out = tapped(x)
    assert torch.equal(out.logits, clean.logits) and torch.equal(out.embedding, clean.embedding)
    assert torch.equal(out.feature, torch.sin(1000.0 * clean.feature))
    # a head applied to any other map (a student's projected feature) is the real head on that map
    other = torch.randn_like(clean.feature)
    assert torch.allclose(tapped.head(other), inner.forward_head(other))
    assert not torch.allclose(tapped.head(out.feature.clone()), out.logits, atol=1e-2)


# ----------------------------------------------------------------------------- pools the label's CE cannot see


@pytest.fixture(scope="module")
def varied():
    """A ResNet-8 whose top-1 on random inputs covers every class (both halves)."""
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet8", num_classes=10).eval()
    torch.manual_seed(1)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        fc = model.get_classifier()
        fc.weight.normal_(0, 3)
        fc.bias.sub_(model(x).mean(0))
    return model, x


def test_reverse_dark_knowledge_keeps_the_top1_and_reverses_the_rest():
    logits = torch.tensor([[0.0, 5.0, 2.0, 1.0, 3.0]])
    out = corruptions.reverse_dark_knowledge(logits)
    # ranks of the non-argmax classes 4 > 2 > 3 > 0 become 0 > 3 > 2 > 4
    assert torch.equal(out, torch.tensor([[3.0, 5.0, 1.0, 2.0, 0.0]]))
    x = torch.randn(32, 10)
    out = corruptions.reverse_dark_knowledge(x)
    assert torch.equal(out.argmax(-1), x.argmax(-1))
    assert torch.equal(out.sort(-1).values, x.sort(-1).values)  # a permutation of each row
    second = x.topk(2, -1).indices[:, 1]
    assert torch.equal(out.gather(1, second[:, None]), x.min(-1, keepdim=True).values)


def test_shuffled_dark_knowledge_keeps_the_top1_and_moves_the_rest_by_a_fixed_map_per_class():
    maps = corruptions.dark_permutations(10)
    assert torch.equal(maps, corruptions.dark_permutations(10))  # seeded: the same teacher every run
    assert torch.equal(maps.diagonal(), torch.arange(10))  # class k stays in place in its own map
    assert torch.equal(maps.sort(-1).values, torch.arange(10).expand(10, 10))  # each row a permutation
    assert (maps != torch.arange(10)).sum(-1).min() >= 6  # most of the other classes move
    logits = torch.tensor([[0.0, 5.0, 2.0, 1.0, 3.0, -1.0, -2.0, 0.5, 0.2, -0.5]])
    out = corruptions.shuffle_dark_knowledge(logits, maps)
    assert torch.equal(out, logits[:, maps[1]])  # column c reads column maps[1, c]
    x = torch.randn(64, 10)
    out = corruptions.shuffle_dark_knowledge(x, maps)
    assert torch.equal(out.argmax(-1), x.argmax(-1))
    assert torch.equal(out.sort(-1).values, x.sort(-1).values)
    assert not torch.equal(out, corruptions.reverse_dark_knowledge(x))


@pytest.mark.parametrize("tap", ["last_map", "pre_logits"])
@pytest.mark.parametrize("kind", ["dark", "dark_shuffled"])
def test_dark_teacher_through_every_path(varied, tap, kind):
    inner, x = varied
    index = 3
    clean = _tapped(inner, tap)(x)
    model = _corrupted(inner, kind, index)
    tapped = _tapped(model, tap)
    out = tapped(x)
    hit = clean.logits.argmax(-1) % 2 == index % 2
    assert 0 < hit.sum() < len(hit)
    expected = corruptions.reverse_dark_knowledge(clean.logits[hit]) if kind == "dark" else \
        corruptions.shuffle_dark_knowledge(clean.logits[hit], corruptions.dark_permutations(10))
    assert torch.equal(out.logits[hit], expected)
    assert torch.equal(out.logits[~hit], clean.logits[~hit])
    # top-1 everywhere, and the CE wherever the teacher is right, are unchanged
    label = clean.logits.argmax(-1)
    ce = torch.nn.functional.cross_entropy
    assert torch.equal(out.logits.argmax(-1), label)
    assert torch.allclose(ce(out.logits, label, reduction="none"), ce(clean.logits, label, reduction="none"))
    assert torch.equal(out.feature, clean.feature) and torch.equal(out.embedding, clean.embedding)
    # the split head (classifier on the embedding) and CA-MKD's head on a feature carry it too
    assert torch.allclose(model.get_classifier()(out.embedding), out.logits)
    assert torch.allclose(tapped.head(out.feature), out.logits)
    assert torch.equal(corruptions.corrupted_pairs(torch.stack([clean.logits, out.logits]), {1: kind})[1], hit)


def test_noise_half_teacher_exposes_noise_on_its_half_only(varied):
    inner, x = varied
    index = 3
    clean = _tapped(inner)(x)
    model = _corrupted(inner, "noise_half", index)
    tapped = _tapped(model)
    out = tapped(x)
    hit = clean.logits.argmax(-1) % 2 == index % 2
    assert 0 < hit.sum() < len(hit)
    assert torch.equal(out.logits, clean.logits) and torch.equal(out.embedding, clean.embedding)
    assert torch.equal(out.feature[~hit], clean.feature[~hit])
    noise = out.feature[hit]
    assert torch.equal(noise, corruptions.per_sample_noise(clean.feature[hit]))
    assert torch.equal(_tapped(_corrupted(inner, "noise_half", index))(x).feature, out.feature)  # deterministic
    # no trace of the real map: its ReLU zeros are not kept, nor is its correlation with it
    assert (clean.feature[hit] == 0).float().mean() > 0.2 and (noise == 0).float().mean() < 1e-3
    corr = torch.corrcoef(torch.stack([noise.flatten(), clean.feature[hit].flatten()]))[0, 1]
    assert abs(corr) < 0.05
    # per-sample mean and std match the real map's
    assert torch.allclose(noise.flatten(1).mean(1), clean.feature[hit].flatten(1).mean(1), atol=0.05)
    # the head (CA-MKD's path, and the tap's embedding) reads the real map behind this model's own noise only
    other = torch.randn_like(clean.feature)
    assert torch.allclose(tapped.head(other), inner.forward_head(other))
    even = clean.logits.argmax(-1) % 2 == 0
    assert torch.equal(corruptions.corrupted_pairs(clean.logits[None], {0: "noise_half"})[0], even)


def test_pair_weights_record_the_corrupted_and_clean_pairs(tmp_path):
    from distill.policies.base import Weights

    logits = torch.zeros(2, 4, 10)
    logits[1, :, :] = torch.eye(10)[[1, 2, 3, 5]]  # teacher 1's top-1: odd, even, odd, odd
    recorder = discrimination.PairWeights(tmp_path / "pairs.json", {1: "dark"})
    w_logit = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.7, 0.3]])
    recorder.add(Weights(w_logit, torch.full((4, 2), 0.5)), logits, torch.tensor([0, 0, 0, 0]))
    recorder.write(0)
    stored = json.loads((tmp_path / "pairs.json").read_text())["0"]["1"]
    assert stored["corrupted"]["pairs"] == 3 and stored["clean"]["pairs"] == 1
    assert stored["corrupted"]["logit"] == pytest.approx((0.1 + 0.2 + 0.3) / 3 * 2)
    assert stored["clean"]["logit"] == pytest.approx(0.6 * 2)
    assert stored["corrupted"]["feat"] == pytest.approx(1.0)


def test_a_specialists_off_pairs_are_the_labels_outside_its_half(tmp_path):
    from distill.policies.base import Weights

    logits = torch.zeros(3, 4, 10)
    logits[:, :, 0] = 1.0  # every teacher predicts class 0: the split must come from the labels
    target = torch.tensor([1, 2, 4, 7])  # odd, even, even, odd
    mask = corruptions.corrupted_pairs(logits, {0: "specialist", 1: "specialist"}, target)
    assert mask.tolist() == [[True, False, False, True], [False, True, True, False], [False] * 4]
    with pytest.raises(ValueError, match="specialist's off pairs need the labels"):
        corruptions.corrupted_pairs(logits, {0: "specialist"})
    recorder = discrimination.PairWeights(tmp_path / "pairs.json", {0: "specialist", 2: "dark"})
    w_logit = torch.tensor([[0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4], [0.1, 0.8, 0.1]])
    recorder.add(Weights(w_logit, torch.full((4, 3), 1 / 3)), logits, target)
    recorder.write(2)
    stored = json.loads((tmp_path / "pairs.json").read_text())["2"]
    assert stored["0"]["corrupted"]["pairs"] == 2 and stored["0"]["clean"]["pairs"] == 2
    assert stored["0"]["corrupted"]["logit"] == pytest.approx((0.6 + 0.1) / 2 * 3)  # labels 1 and 7
    assert stored["0"]["clean"]["logit"] == pytest.approx((0.3 + 0.5) / 2 * 3)
    assert stored["2"]["corrupted"]["pairs"] == 4  # the dark teacher's top-1 (class 0) is in its half


def test_every_run_of_the_discrimination_config_is_a_valid_recipe():
    study = discrimination.DiscriminationStudy(REPO / "benchmarks/configs/discrimination.yaml")
    runs = [study.recipe(name, label, 0, check_data=False) for name in study.recipes for label in study.policies]
    assert len(runs) == len(study.recipes) * len(study.policies) >= 100


def test_scales_give_every_policy_the_same_effective_loss_scale():
    assert discrimination.term_scale("aver", {}, 4) == pytest.approx((1.0, 1.0))
    assert discrimination.term_scale("camkd", {}, 4) == pytest.approx((0.25, 0.25))  # published: sums / M
    assert discrimination.term_scale("camkd", {"variant": "shared"}, 4) == pytest.approx((1.0, 1.0))
    assert discrimination.term_scale("mtkd_rl", {"fusion": "refine"}, 4) == pytest.approx((1.0, 1.0))
    study = discrimination.DiscriminationStudy(REPO / "benchmarks/configs/discrimination.yaml")
    expected = {"aver@camkd": (0.25, 12.5), "camkd@camkd": (1.0, 50.0), "camkd@recipe": (4.0, 20.0),
                "aver@recipe": (1.0, 5.0), "mtkd_rl_refine@camkd": (0.25, 12.5)}
    for label, (alpha, beta) in expected.items():
        recipe = study.recipe("dark", label, 0, check_data=False)
        assert (recipe.distill.alpha, recipe.distill.beta) == pytest.approx((alpha, beta)), label
    # three teachers: CA-MKD's scale is 1/3, 50/3; CA-MKD as published runs with its own alpha 1, beta 50
    three = study.recipe("specialists", "aver@camkd", 0, check_data=False).distill
    assert (three.alpha, three.beta) == pytest.approx((1 / 3, 50 / 3))
    three = study.recipe("specialists", "camkd@camkd", 0, check_data=False).distill
    assert (three.alpha, three.beta) == pytest.approx((1.0, 50.0))


def test_specialists_are_trained_on_their_half_once_per_pool_and_seed(tmp_path):
    import yaml

    from distill.recipe_load import teacher_configs

    torch.set_num_threads(1)
    trained = {"model": "cifar_resnet8", "pretrained": False, "train": {"epochs": 2, "lr": 0.1}}
    config = {"name": "spec", "output_dir": str(tmp_path / "out"), "seeds": [0],
              "recipes": [{"name": "specialists",
                           "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0, "train_subset": 256,
                                    "val_subset": 128},
                           "student": "cifar_resnet8", "teachers": [trained, trained],
                           "distill": {"policy": "aver"}, "optim": {"lr": 0.05},
                           "schedule": {"name": "cosine", "epochs": 1}, "run": {"device": "cpu", "progress": False},
                           "corrupt": {0: "specialist", 1: "specialist"}}],
              "policies": {"aver": {"distill.policy": "aver"}, "camkd": {"distill.policy": "camkd"}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    study = discrimination.DiscriminationStudy(path)
    recipe = study.recipe("specialists", "aver", 0)
    runner = study.make_runner("specialists", recipe)
    cfgs = teacher_configs(recipe)
    specialists = [runner.prepare_teacher(i, cfg) for i, cfg in enumerate(cfgs)]
    assert [t.name.split("+")[-1] for t in specialists] == ["specialist0", "specialist1"]
    assert runner.run_dir == recipe.run_dir  # restored after training in the shared folder
    x = torch.stack([runner.bundle.val[i][0] for i in range(len(runner.bundle.val))])
    for index, teacher in enumerate(specialists):
        with torch.no_grad():
            top1 = teacher.model(teacher.adapter(x)).argmax(-1)
        # never trained on the other half: it predicts its own half
        assert (top1 % 2 == index).float().mean() >= 0.95, top1
        assert teacher.source["specialist_classes"] == list(range(index, 10, 2))
    weights = study.output_dir / "_teachers/specialists/seed0/teachers/0-cifar_resnet8/last.safetensors"
    stamp = weights.stat().st_mtime_ns
    # another policy of the same pool and seed reuses the trained specialists
    other = study.make_runner("specialists", study.recipe("specialists", "camkd", 0))
    again = other.prepare_teacher(0, teacher_configs(recipe)[0])
    assert weights.stat().st_mtime_ns == stamp and again.source["sha256"] == specialists[0].source["sha256"]
