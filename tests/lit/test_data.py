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


def _foolbox_images(prefix: str) -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(Path(spec.submodule_search_locations[0], "data").glob(f"{prefix}_*"))


@pytest.mark.skipif(not _foolbox_images("imagenet"), reason="foolbox's sample images not installed (pip install --no-deps foolbox)")
def test_imagenet_pipeline_on_real_jpegs(tmp_path):
    """20 real ImageNet JPEGs (foolbox) laid out as an ImageFolder tree: timm transforms, 224 px, labels."""
    images = _foolbox_images("imagenet")
    for split in ("train", "val"):
        for f in images:
            label = int(f.stem.split("_")[-1])
            d = tmp_path / split / f"n{label:08d}"  # WordNet-like folder names sort like class indices
            d.mkdir(parents=True, exist_ok=True)
            (d / f.name).symlink_to(f)
    dm = ImageDataModule("imagenet", data_dir=str(tmp_path), batch_size=4, val_fraction=0.25, augment=True,
                         auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 224, 224) and torch.isfinite(x).all()
    xt, yt = next(iter(dm.test_dataloader()))
    classes = dm.test_set.classes
    # the eval pipeline keeps labels: folder names carry the original class index
    from_names = [int(Path(path).stem.split("_")[-1]) for path, _ in dm.test_set.samples[:4]]
    assert [int(classes[i][1:]) for i in yt.tolist()] == from_names
    assert abs(float(xt.mean())) < 1.0  # normalised with the ImageNet mean/std
    assert len(dm.train_set) + len(dm.val_set) == len(images)
