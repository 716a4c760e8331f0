"""The paper's recipes: hyper-parameters, dry runs of every recipe, heterogeneous pools,
soft targets (mixup) through every policy, and docs/recipes.md covering the schema."""

import torch

torch.set_num_threads(1)

import dataclasses  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from distill import cli  # noqa: E402
from distill.data import build_mixup  # noqa: E402
from distill.engine import mix_batch  # noqa: E402
from distill.pipeline import make_teacher, teacher_input_size  # noqa: E402
from distill.projectors import GridProjector, MapProjector, TokenProjector, build_projector  # noqa: E402
from distill.recipe import DataConfig, TeacherConfig  # noqa: E402
from distill.recipe_load import load_recipe, teacher_configs  # noqa: E402
from distill.recipe_docs import dataclasses_in_schema, render  # noqa: E402
from distill.resolve import DataSpec, ResolvedModel  # noqa: E402
from distill.taps import FeatureTap  # noqa: E402
from zoo.pools import POOLS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))
HEAVY = {"recipes/deit_tiny.yaml", "recipes/cait_xxs24.yaml",  # DeiT-B + CaiT-S24 teachers at 224 px
         "recipes/resnet18.yaml", "recipes/resnet34.yaml"}  # four ImageNet CNN teachers at 224 px


def _load(name, *overrides):
    return load_recipe(ROOT / name, list(overrides), check_data=False)


# ----------------------------------------------------------------------------- hyper-parameters


@pytest.mark.parametrize("student", ["regnetx_200mf", "mobilenetv2", "shufflenetv2", "resnet56"])
def test_cifar100_recipes_follow_the_authors(student):
    r = _load(f"recipes/cifar100/{student}.yaml")
    assert r.pool == "cifar100_cnn4" and r.distill.policy == "mtkd_rl" and r.distill.features == "last_map"
    assert (r.optim.name, r.optim.lr, r.optim.momentum, r.optim.nesterov, r.optim.weight_decay) == \
        ("sgd", 0.05, 0.9, True, 1e-4)
    assert (r.data.dataset, r.data.batch_size, r.data.augment) == ("cifar100", 64, "cifar")
    assert r.data.mean == [0.5071, 0.4867, 0.4408] and r.data.std == [0.2675, 0.2565, 0.2761]
    assert (r.schedule.name, r.schedule.epochs, r.schedule.milestones) == ("multistep", 240, [150, 180, 210])
    teachers = teacher_configs(r)
    assert [t.model for t in teachers] == list(POOLS["cifar100_cnn4"].teachers)  # the pool, configured
    for t in teachers:
        assert not t.pretrained and t.train.epochs == 240 and t.train.lr == 0.05 and t.train.weight_decay == 5e-4
    assert "100 and 150" in (ROOT / f"recipes/cifar100/{student}.yaml").read_text()


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_imagenet_cnn_recipes(name):
    r = _load(f"recipes/{name}.yaml")
    assert (r.pool, r.student.model, r.data.dataset, r.data.batch_size) == ("imagenet_cnn4", name, "imagefolder", 256)
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay) == ("sgd", 0.1, 1e-4)
    assert (r.schedule.epochs, r.schedule.milestones) == (100, [30, 60, 90])


@pytest.mark.parametrize("name", ["deit_tiny", "cait_xxs24"])
def test_imagenet_vit_recipes(name):
    r = _load(f"recipes/{name}.yaml")
    assert r.pool == "imagenet_vit3" and r.distill.policy == "mtkd_rl"
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.data.batch_size) == ("adamw", 1e-3, 0.05, 1024)
    assert r.schedule.name == "cosine" and r.schedule.warmup_epochs > 0
    d = r.data
    assert d.auto_augment.startswith("rand-") and d.re_prob > 0 and d.mixup > 0 and d.cutmix > 0
    assert d.label_smoothing == 0.1 and r.student.model_args == {"drop_path_rate": 0.1}
    assert d.aug_repeats == 3 and d.color_jitter == 0.3  # DeiT's repeated augmentation and jitter
    assert r.run.ema and r.run.ema_decay == 0.99996 and not r.run.ema_warmup and r.optim.clip_grad is None


def test_pool_member_named_explicitly_is_not_added_twice():
    r = _load("recipes/resnet18.yaml", "teachers=[{model: resnet50.tv_in1k, input_size: 256}]")
    teachers = teacher_configs(r)
    assert [t.model for t in teachers] == ["resnet50.tv_in1k", "resnet101.tv_in1k", "wide_resnet50_2.tv_in1k",
                                           "resnext50_32x4d.tv_in1k"]
    assert teachers[0].input_size == 256


# ----------------------------------------------------------------------------- dry runs


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.heavy) if r in HEAVY else r for r in RECIPES])
def test_dry_run_every_recipe(recipe, capsys):
    """Every recipe builds and takes one step offline; only the batch is shrunk."""
    started = time.perf_counter()
    code = cli.train_main([recipe, "--dry-run", "--offline", "data.batch_size=2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "memory per step" in out and "steps" in out and "policy" in out
    r = _load(recipe)
    assert len(teacher_configs(r)) == out.count("\nteacher ")
    if r.distill.policy == "mtkd_rl":  # the settings it resolved: every recipe's pool has M >= 3
        assert "reward=heldout, fusion=refine, prior=consensus" in out, out
    if r.data.dataset == "cifar100":
        assert "25,000 per epoch" in out  # 50,000 / 2
    print(f"{recipe}: {time.perf_counter() - started:.1f} s")


# ----------------------------------------------------------------------------- heterogeneous pools


def test_token_map_projectors():
    cases = [((196, 192), (2048, 7, 7), GridProjector), ((512, 7, 7), (196, 384), GridProjector),
             ((196, 192), (196, 384), TokenProjector), ((196, 192), (576, 384), GridProjector),
             ((512, 14, 14), (2048, 7, 7), MapProjector)]
    for s, t, kind in cases:
        proj = build_projector(s, t, "t")
        assert isinstance(proj, kind)
        y = proj(torch.randn(2, *s))
        assert tuple(y.shape[1:]) == t
        y.sum().backward()
    assert (build_projector((512, 7, 7), (196, 384), "t")(torch.randn(2, 512, 7, 7)) < 0).any()  # tokens are signed


def test_teacher_resized_to_its_pretrained_size():
    data = DataSpec((3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    at384 = DataSpec((3, 384, 384), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert teacher_input_size(TeacherConfig(model="x"), at384, data) == 384
    assert teacher_input_size(TeacherConfig(model="x"), data, data) is None
    assert teacher_input_size(TeacherConfig(model="x"), None, data) is None  # trained here / random init
    assert teacher_input_size(TeacherConfig(model="x", input_size=224), at384, data) == 224  # explicit wins
    import timm

    model = timm.create_model("cifar_resnet8", num_classes=10)
    teacher = make_teacher("t", TeacherConfig(model="x"), ResolvedModel(model, "cifar_resnet8", at384), data,
                           FeatureTap("last_map"))
    x = teacher.adapter(torch.randn(1, 3, 224, 224))
    assert x.shape[-1] == 384 and teacher.adapter.renormalise


# ----------------------------------------------------------------------------- soft targets


@pytest.mark.parametrize("policy", ["aver", "ebkd", "camkd", "mtkd_rl", "mixture"])
def test_policies_accept_mixup_soft_targets(policy):
    import timm

    from distill.distiller import Distiller
    from distill.policies import build_policy
    from distill.teachers import TeacherPool

    torch.manual_seed(0)
    data = DataSpec((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    tap = FeatureTap("last_map")
    teachers = [make_teacher(f"{i}", TeacherConfig(model="x"),
                             ResolvedModel(timm.create_model(name, num_classes=10), name, None), data, tap)
                for i, name in enumerate(["cifar_resnet8", "cifar_resnet14", "cifar_resnet8"])]
    pool = TeacherPool(teachers)
    pol = build_policy(policy, 3, {})  # three teachers: mtkd_rl's default prior is the consensus
    d = Distiller(timm.create_model("cifar_resnet8", num_classes=10), pool, pol, tap, data.input_size)
    mixup = build_mixup(DataConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1), 10)
    x, y = mix_batch(mixup, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 10) and torch.allclose(y.sum(1), torch.ones(4))
    pol.begin_epoch(1)  # past every warm-up: camkd's feature weights read the soft targets too
    out = d(x, y)
    assert torch.isfinite(out.loss) and torch.isfinite(out.weights.logit).all()
    if policy == "mtkd_rl":
        assert pol.prior == "consensus"
    out.loss.backward()
    pol.observe(out.signals, out.weights, out.teachers, out.student, y)
    pol.end_epoch(1)
    # odd batch: not mixed, smoothed one-hot targets
    x3, y3 = mix_batch(mixup, torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    assert y3.shape == (3, 10) and y3.argmax(1).tolist() == [0, 1, 2]


def test_timm_augmentation_keys_reach_create_transform():
    from distill.data import DATASETS, image_transforms, timm_transform_args

    cfg = DataConfig(dataset="imagefolder", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                     interpolation="bicubic")
    train_tf, _ = image_transforms(DATASETS["imagefolder"], 224, "timm", (0.5,) * 3, (0.5,) * 3,
                                   timm_transform_args(cfg))
    text = repr(train_tf)
    assert "RandAugment" in text and "RandomErasing" in text


# ----------------------------------------------------------------------------- docs


def test_docs_document_every_recipe_field():
    text = (ROOT / "docs" / "recipes.md").read_text()
    missing = [f"{cls.__name__}.{f.name}" for cls in dataclasses_in_schema() for f in dataclasses.fields(cls)
               if f"| `{f.name}` |" not in text]
    assert not missing, f"docs/recipes.md lacks {missing}; regenerate: python -m distill.recipe_docs > docs/recipes.md"
    for cls in dataclasses_in_schema():
        assert f"({cls.__name__})" in text
    assert render().count("| `") >= sum(len(dataclasses.fields(c)) for c in dataclasses_in_schema())


# ----------------------------------------------------------------------------- end to end with DeiT-style keys


def _image_tree(root: Path, classes=("a", "b"), per_class=4, size=40):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_imagefolder_num_classes_is_checked(tmp_path):
    from distill.data import build_data
    from distill.errors import DistillError

    _image_tree(tmp_path)
    with pytest.raises(DistillError, match="data.num_classes"):
        build_data(DataConfig(dataset="imagefolder", root=str(tmp_path), num_classes=3))


@pytest.mark.parametrize("policy", ["camkd", "mtkd_rl"])
def test_train_with_randaugment_erasing_mixup(tmp_path, policy):
    """A real (tiny) run through RecipeRunner with DeiT's data keys: soft targets in the training loop."""
    import yaml

    from distill.pipeline import RecipeRunner
    from distill.recipe_load import recipe_from_dict

    _image_tree(tmp_path / "data")
    raw = yaml.safe_load(f"""
name: tiny
output_dir: {tmp_path / 'run'}
data: {{dataset: imagefolder, root: {tmp_path / 'data'}, num_classes: 2, input_size: 32, batch_size: 4,
        num_workers: 0, augment: timm, auto_augment: rand-m9-mstd0.5-inc1, re_prob: 0.25, mixup: 0.8,
        cutmix: 1.0, label_smoothing: 0.1}}
student: {{model: cifar_resnet8}}
teachers:
  - {{model: cifar_resnet8, pretrained: false, train: {{epochs: 1, lr: 0.01}}}}
  - {{model: cifar_resnet14, pretrained: false, train: {{epochs: 1, lr: 0.01}}}}
distill: {{features: last_map, policy: {policy}}}
optim: {{name: adamw, lr: 1.0e-3, weight_decay: 0.05}}
schedule: {{name: cosine, epochs: 2, warmup_epochs: 1}}
run: {{progress: false}}
""")
    report = RecipeRunner(recipe_from_dict(raw)).run()
    assert report.student["epochs"] == 2
