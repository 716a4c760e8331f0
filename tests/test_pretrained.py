"""The akamaster CIFAR-10 ResNets through the zoo: real weights, key mapping and data path."""

import shutil

import pytest
import torch

from distill import cli
from distill.paths import weights_dir

from .conftest import SHARED_DATA

AKAMASTER = SHARED_DATA / "weights" / "akamaster_resnet_cifar10"


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the heaviest test in the suite; nothing runs beside it
    yield
    torch.set_num_threads(before)


def test_resnet56_top1_on_the_jpeg_cifar10_test_set(cifar10_jpeg_root, capsys, two_threads):
    if not AKAMASTER.is_dir():
        pytest.skip(f"shared weights not found: {AKAMASTER}")
    # pre-fill the download cache the way an offline machine would: timm then finds the file
    weights_dir().mkdir(parents=True)
    shutil.copy(AKAMASTER / "resnet56-4bfd9763.th", weights_dir())
    code = cli.eval_main(["cifar_resnet56.akamaster_cifar10", "--dataset", "cifar10", "--data-dir",
                          str(cifar10_jpeg_root), "--no-download", "--num-workers", "0"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert "(10000 images)" in out[0]
    top1 = float(out[-1].split()[0].split("=")[1])
    assert top1 == pytest.approx(83.2, abs=0.5)
