"""One resolver for every kind of model spec."""

import pickle
import shutil

import pytest
import timm
import torch

from distill.errors import DistillError, RecipeError
from distill.paths import weights_dir
from distill.resolve import check_spec, resolve_model

from .conftest import SHARED_DATA

torch.set_num_threads(1)

AKA20 = SHARED_DATA / "weights" / "akamaster_resnet_cifar10" / "resnet20-12fca82f.th"
needs_aka = pytest.mark.skipif(not AKA20.is_file(), reason="shared akamaster weights not found")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(RecipeError, match=r"unknown model 'cifar_resnet21'.*did you mean: .*cifar_resnet2"):
        check_spec("cifar_resnet21", "student.model")
    with pytest.raises(RecipeError, match="has no pretrained tag"):
        check_spec("cifar_resnet56.imagenet", "student.model")
    with pytest.raises(RecipeError, match="no checkpoint file"):
        check_spec("runs/missing/best.safetensors", "student.model")


def test_random_init_uses_dataset_classes_and_has_no_data_spec():
    resolved = resolve_model("cifar_resnet8", num_classes=7, in_chans=1)
    assert resolved.model.num_classes == 7 and resolved.data is None
    assert resolved.model(torch.zeros(1, 1, 8, 8)).shape == (1, 7)
    assert resolved.model_args == {"in_chans": 1}


@needs_aka
def test_cached_download_and_local_weights_file_give_the_same_model():
    weights_dir().mkdir(parents=True)
    shutil.copy(AKA20, weights_dir())
    cached = resolve_model("cifar_resnet20.akamaster_cifar10", pretrained=True)
    local = resolve_model("cifar_resnet20.akamaster_cifar10", weights=str(AKA20))
    assert cached.model.num_classes == 10
    assert cached.data.mean == pytest.approx((0.485, 0.456, 0.406))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(cached.model.eval()(x), local.model.eval()(x))
    assert local.source["file"] == str(AKA20)


@needs_aka
def test_weights_that_do_not_fit_are_a_clear_error():
    with pytest.raises(DistillError, match="weights do not fit cifar_resnet32"):
        resolve_model("cifar_resnet32.akamaster_cifar10", weights=str(AKA20))


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": Evil()}, handle)
    with pytest.raises(DistillError, match="evil.pth: cannot load weights"):
        resolve_model("cifar_resnet20", weights=str(path))


def test_local_dir_in_timm_hub_layout(tmp_path):
    from timm.models import save_for_hf

    model = timm.create_model("cifar_resnet8", num_classes=4)
    save_for_hf(model, str(tmp_path / "hub"))
    resolved = resolve_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(resolved.model.eval()(x), model.eval()(x))
    assert resolved.model.num_classes == 4
