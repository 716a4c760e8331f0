"""Tests of the model zoo: timm registration, the classifier API, parameter counts, akamaster weights, pools."""
from __future__ import annotations

import dataclasses
import shutil
import tarfile
from pathlib import Path

import torch

torch.set_num_threads(1)  # noqa: E402  (thread contention on small CI machines)

import numpy as np
import pytest
import timm
import torch.nn as nn

import zoo
from zoo.cifar.resnet import PadShortcut, akamaster_filter_fn

DATA_DIR = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
AKAMASTER_DIR = DATA_DIR / 'weights' / 'akamaster_resnet_cifar10'
CIFAR10_JPG = DATA_DIR / 'cifar10-jpg.tar.gz'
AKAMASTER_FILES = {
    20: 'resnet20-12fca82f.th',
    32: 'resnet32-d509ac18.th',
    44: 'resnet44-014dd654.th',
    56: 'resnet56-4bfd9763.th',
}

EXPECTED_MODELS = {
    *(f'cifar_resnet{d}' for d in (8, 14, 20, 32, 44, 56, 110)),
    'cifar_resnet8x4', 'cifar_resnet32x4',
    *(f'cifar_wrn_{d}_{k}' for d in (16, 28, 40) for k in (1, 2, 4)),
    'cifar_shufflenetv2', 'cifar_mobilenetv2',
    'cifar_regnetx_200mf', 'cifar_regnetx_400mf', 'cifar_regnety_400mf',
}
MODELS = zoo.list_models()


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _batch(chans: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, chans, 32, 32, generator=torch.Generator().manual_seed(seed))


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f'shared test data not found at {path} (expected ../shared/data beside the checkout)')


# registry -----------------------------------------------------------------------------------------------------

def test_list_models_is_the_registered_zoo():
    assert MODELS == sorted(EXPECTED_MODELS)
    for name in MODELS:
        assert timm.is_model(name)
    assert timm.list_models('cifar_*') == timm.list_models(module='zoo')
    assert sorted(timm.list_models(module='zoo')) == MODELS
    # the zoo's files are called resnet.py / regnet.py, but timm's own module listings stay timm's
    assert not timm.list_models('cifar_*', module=['resnet', 'regnet', 'mobilenetv2', 'wrn'])


def test_untagged_default_has_no_weights_and_tag_is_explicit():
    for depth, filename in AKAMASTER_FILES.items():
        arch = f'cifar_resnet{depth}'
        assert not timm.models.is_model_pretrained(arch)
        default = timm.models.get_pretrained_cfg(arch)
        assert not default.url and default.num_classes == 100 and default.mean == (0.5071, 0.4867, 0.4408)
        tagged = timm.models.get_pretrained_cfg(f'{arch}.akamaster_cifar10')
        assert timm.models.is_model_pretrained(f'{arch}.akamaster_cifar10')
        assert tagged.url == ('https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/'
                              f'pretrained_models/{filename}')
        assert tagged.num_classes == 10
        assert tagged.mean == (0.485, 0.456, 0.406) and tagged.std == (0.229, 0.224, 0.225)
        assert tagged.license == 'bsd-2-clause'
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('cifar_resnet56', pretrained=True)
    assert timm.create_model('cifar_resnet56', pretrained=False, num_classes=100).num_classes == 100
    assert timm.create_model('cifar_resnet56.akamaster_cifar10').num_classes == 10


# classifier API -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', MODELS)
def test_classifier_api(name):
    model = timm.create_model(name, pretrained=False, num_classes=100).eval()
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32) and cfg['classifier'] == 'fc' and cfg['num_classes'] == 100
    assert cfg['mean'] == (0.5071, 0.4867, 0.4408) and cfg['std'] == (0.2675, 0.2565, 0.2761)
    assert isinstance(model.get_submodule(cfg['first_conv']), nn.Conv2d)
    assert isinstance(model.get_classifier(), nn.Linear) and model.get_classifier() is model.fc
    assert model.get_classifier().out_features == 100 == model.num_classes
    assert model.head_hidden_size == model.num_features

    x = _batch()
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        head = model.forward_head(feats)
        final, inters = model.forward_intermediates(x)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    assert logits.shape == (2, 100) and torch.isfinite(logits).all()
    assert feats.ndim == 4 and feats.shape[1] == model.num_features
    assert pooled.shape == (2, model.num_features)
    assert torch.equal(logits, head)
    assert torch.equal(final, feats)
    num_stages = len(model.feature_info)
    assert len(inters) == num_stages and len(last2) == 2 and len(first) == 1
    for info, inter in zip(model.feature_info, inters):
        assert inter.shape[1] == info['num_chs']
        assert inter.shape[-1] == 32 // info['reduction']
    assert torch.equal(last2[-1], inters[-1]) and torch.equal(first[0], inters[0])


@pytest.mark.parametrize('name', MODELS)
def test_in_chans_1(name):
    model = timm.create_model(name, num_classes=100, in_chans=1).eval()
    assert model.get_submodule(model.pretrained_cfg['first_conv']).in_channels == 1
    with torch.no_grad():
        assert model(_batch(chans=1)).shape == (2, 100)


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_wrn_16_2', 'cifar_mobilenetv2', 'cifar_regnetx_200mf'])
def test_reset_classifier_prune_and_features_only(name):
    x = _batch()
    model = timm.create_model(name).eval()
    model.reset_classifier(10)
    assert model(x).shape == (2, 10) and model.fc.out_features == 10
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)

    model = timm.create_model(name).eval()
    kept = model.prune_intermediate_layers(indices=[1])
    assert kept == [1]
    with torch.no_grad():
        feats = model.forward_features(x)
        inter = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert feats.shape[1] == model.num_features == model.feature_info[1]['num_chs']
    assert torch.equal(inter[0], feats)
    with torch.no_grad():
        assert torch.equal(model(x), feats)  # as in timm, pruning drops the head and its pooling

    extractor = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        maps = extractor(x)
    assert [m.shape[1] for m in maps] == extractor.feature_info.channels()


def test_drop_rate_only_acts_in_training():
    model = timm.create_model('cifar_resnet20', drop_rate=0.5)
    x = _batch()
    assert model.drop_rate == 0.5
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert not torch.equal(model.forward_head(feats, pre_logits=True), model.global_pool(feats))


# parameter counts (MTKD-RL Table 1, at 100 classes) --------------------------------------------------------------

@pytest.mark.parametrize('name, paper_m, rel_tol', [
    ('cifar_resnet32x4', 7.4, 0.05),     # measured 7.43M
    ('cifar_wrn_28_4', 5.9, 0.05),       # measured 5.87M
    ('cifar_regnetx_200mf', 2.4, 0.05),  # measured 2.35M
    ('cifar_regnetx_400mf', 4.8, 0.05),  # measured 4.81M
    ('cifar_mobilenetv2', 2.4, 0.05),    # measured 2.35M
    ('cifar_shufflenetv2', 1.4, 0.05),   # measured 1.36M
    ('cifar_resnet56', 0.9, 0.06),       # measured 0.86M (the paper rounds)
    # the paper says 5.8M, but the genuine RegNetY-400MF has 3.95M here (4.34M at 1000 classes); pin ours
    ('cifar_regnety_400mf', 3.95, 0.02),
])
def test_param_counts(name, paper_m, rel_tol):
    count = _num_params(timm.create_model(name, num_classes=100)) / 1e6
    assert abs(count - paper_m) <= rel_tol * paper_m, f'{name}: {count:.3f}M params'


# shortcuts ----------------------------------------------------------------------------------------------------

def test_option_a_shortcuts_have_no_parameters():
    model = timm.create_model('cifar_resnet56')
    assert model.shortcut_type == 'A'
    shortcuts = [m.shortcut for layer in (model.layer1, model.layer2, model.layer3) for m in layer]
    assert sum(isinstance(s, PadShortcut) for s in shortcuts) == 2
    assert all(_num_params(s) == 0 for s in shortcuts)
    assert not any('shortcut' in k for k in model.state_dict())
    # zero channels go in front of and behind the subsampled input
    out = PadShortcut(16, 32, 2)(torch.ones(1, 16, 8, 8))
    assert out.shape == (1, 32, 4, 4)
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0 and (out[:, 8:24] == 1).all()


@pytest.mark.parametrize('name, kwargs, expected', [
    ('cifar_resnet20', dict(shortcut='B'), 2),  # layer2[0], layer3[0]
    ('cifar_resnet32x4', {}, 3),                # also layer1[0]: 32-channel stem -> 64
])
def test_option_b_shortcuts_project_where_shapes_change(name, kwargs, expected):
    model = timm.create_model(name, **kwargs)
    num_proj = 0
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in layer:
            changes = block.conv1.stride != (1, 1) or block.conv1.in_channels != block.conv2.out_channels
            if changes:
                num_proj += 1
                assert isinstance(block.shortcut[0], nn.Conv2d) and isinstance(block.shortcut[1], nn.BatchNorm2d)
            else:
                assert isinstance(block.shortcut, nn.Identity)
    assert num_proj == expected


# akamaster CIFAR-10 weights -----------------------------------------------------------------------------------

def test_akamaster_filter_fn_accepts_wrapped_and_unwrapped():
    _need(AKAMASTER_DIR / AKAMASTER_FILES[20])
    ckpt = torch.load(AKAMASTER_DIR / AKAMASTER_FILES[20], map_location='cpu', weights_only=True)
    model = timm.create_model('cifar_resnet20', num_classes=10)
    from_whole = akamaster_filter_fn(ckpt, model)
    from_inner = akamaster_filter_fn(ckpt['state_dict'], model)
    assert from_whole.keys() == from_inner.keys()
    assert not any(k.startswith(('module.', 'linear.')) for k in from_whole)
    assert torch.equal(from_whole['fc.weight'], ckpt['state_dict']['module.linear.weight'])
    model.load_state_dict(from_whole, strict=True)
    # without the model for reference it still loads strictly (BatchNorm fills the missing counters)
    timm.create_model('cifar_resnet20', num_classes=10).load_state_dict(akamaster_filter_fn(ckpt), strict=True)


@pytest.fixture(scope='module')
def akamaster56(tmp_path_factory):
    _need(AKAMASTER_DIR / AKAMASTER_FILES[56])
    cache = tmp_path_factory.mktemp('hub_cache')
    shutil.copy(AKAMASTER_DIR / AKAMASTER_FILES[56], cache / AKAMASTER_FILES[56])
    model = timm.create_model('cifar_resnet56.akamaster_cifar10', pretrained=True, cache_dir=cache).eval()
    return model


def test_akamaster_loads_from_cache_dir(akamaster56):
    model = akamaster56
    assert model.num_classes == 10
    ckpt = torch.load(AKAMASTER_DIR / AKAMASTER_FILES[56], map_location='cpu', weights_only=True)['state_dict']
    for key, value in model.state_dict().items():
        if not key.endswith('num_batches_tracked'):
            src = 'module.' + ('linear.' + key[3:] if key.startswith('fc.') else key)
            assert torch.equal(value, ckpt[src]), key
    random_init = timm.create_model('cifar_resnet56.akamaster_cifar10', pretrained=False).eval()
    x = _batch(seed=1)
    with torch.no_grad():
        logits, random_logits = model(x), random_init(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert not torch.allclose(logits, random_logits)


@pytest.fixture(scope='module')
def cifar10_test_subset(tmp_path_factory):
    """The first 50 test images (0000-0049) of each CIFAR-10 class, extracted to a tmp dir: (x in [0, 1], y)."""
    _need(CIFAR10_JPG)
    root = tmp_path_factory.mktemp('cifar10_jpg')
    with tarfile.open(CIFAR10_JPG) as tar:
        members = [m for m in tar if m.isfile() and m.name.startswith('test/') and m.name.endswith('.jpg')
                   and int(Path(m.name).stem) < 50]
        if hasattr(tarfile, 'data_filter'):
            tar.extractall(root, members=members, filter='data')
        else:  # Python without extraction filters; members are plain files from our own data set
            tar.extractall(root, members=members)
    from PIL import Image
    classes = sorted(p.name for p in (root / 'test').iterdir())
    assert len(classes) == 10
    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / 'test' / cls).glob('*.jpg')):
            images.append(np.asarray(Image.open(path).convert('RGB')))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor(labels)


def test_akamaster_accuracy_on_real_images(akamaster56, cifar10_test_subset):
    x, y = cifar10_test_subset
    assert len(y) == 500
    cfg = akamaster56.pretrained_cfg
    x = (x - torch.tensor(cfg['mean']).view(1, 3, 1, 1)) / torch.tensor(cfg['std']).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = torch.cat([akamaster56(chunk).argmax(1) for chunk in x.split(250)])
    acc = (pred == y).float().mean().item()
    assert acc > 0.70, f'top-1 {acc:.3f} on 500 CIFAR-10 JPEG test images'


# teacher pools ------------------------------------------------------------------------------------------------

def test_pools_resolve_to_registered_models():
    assert zoo.list_pools() == sorted(zoo.POOLS) == ['cifar100_cnn4', 'cifar10_resnet4', 'imagenet_cnn4',
                                                     'imagenet_vit3']
    pretrained = set(timm.list_pretrained())
    for name in zoo.list_pools():
        pool = zoo.get_pool(name)
        assert isinstance(pool, zoo.Pool) and pool.name == name and pool.teachers and pool.description
        for teacher in pool.teachers:
            assert timm.is_model(timm.models.get_arch_name(teacher)), teacher
            if '.' in teacher:
                assert teacher in pretrained, teacher
    assert zoo.get_pool('cifar100_cnn4').teachers == (
        'cifar_regnety_400mf', 'cifar_regnetx_400mf', 'cifar_resnet32x4', 'cifar_wrn_28_4')
    assert 'no public' in zoo.get_pool('cifar100_cnn4').description


def test_get_pool_typo_suggests_close_matches():
    with pytest.raises(KeyError, match='cifar100_cnn4'):
        zoo.get_pool('cifar100_cnn')
    with pytest.raises(KeyError, match='imagenet_vit3'):
        zoo.get_pool('imagenet_vit')
    with pytest.raises(dataclasses.FrozenInstanceError):
        zoo.get_pool('cifar10_resnet4').name = 'x'
