"""Data modules: splits, shapes, and clear errors for missing data."""

from pathlib import Path

import pytest
import torch

from csdlab.lit import data as data_mod
from csdlab.lit.data import EpochSeededSampler, ImageDataModule


def test_digits_splits_are_disjoint_and_shaped():
    dm = ImageDataModule("digits", batch_size=32)
    dm.setup()
    assert (dm.num_classes, dm.in_chans, dm.img_size) == (10, 1, 16)
    sizes = len(dm.train_set) + len(dm.val_set) + len(dm.test_set)
    assert sizes == 1797 and len(dm.test_set) == 1797 // 5
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and y.dtype == torch.long
    # validation comes out of the training images, never the test images
    train_val = torch.cat([dm.train_set.images, dm.val_set.images]).flatten(1)
    test = dm.test_set.images.flatten(1)
    assert not (torch.cdist(test, train_val).min(dim=1).values == 0).all()
    assert abs(float(dm.train_set.images.mean())) < 0.3  # normalised


def test_epoch_seeded_sampler_is_reproducible():
    s = EpochSeededSampler(100, seed=3)
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(3)
    b = list(s)
    s.set_epoch(2)
    assert list(s) == a != b and sorted(a) == list(range(100))


def test_unknown_dataset_named():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*fashion_mnist"):
        ImageDataModule("mnist")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "DEBIAN_FMNIST", tmp_path / "nowhere")
    dm = ImageDataModule("fashion_mnist", data_dir=str(tmp_path / "data"), download=False)
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        dm.setup()
    assert not any((tmp_path).rglob("*.pt"))  # nothing half-written


def test_missing_imagenet_and_cifar_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageFolder tree"):
        ImageDataModule("imagenet", data_dir=str(tmp_path)).setup()
    with pytest.raises(RuntimeError, match="CIFAR10 is not under"):
        ImageDataModule("cifar10", data_dir=str(tmp_path), download=False).setup()


@pytest.mark.skipif(not data_mod.DEBIAN_FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_offline_from_debian_files(tmp_path):
    dm = ImageDataModule("fashion_mnist", data_dir=str(tmp_path), batch_size=16)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 60_000 and len(dm.test_set) == 10_000
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 1, 28, 28) and int(y[0]) == 9  # the first test image is an ankle boot
    assert Path(tmp_path, "FashionMNIST", "raw", "train-images-idx3-ubyte").is_file()
