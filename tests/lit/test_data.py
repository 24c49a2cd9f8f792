"""Data modules: splits, shapes, and clear errors for missing data."""

import gzip
from pathlib import Path

import pytest
import timm
import torch

from csdlab.lit import data as data_mod
from csdlab.lit.data import DATASETS, EpochSeededSampler, ImageDataModule, data_config_for


def _assert_splits_disjoint(dm: ImageDataModule) -> None:
    """No sample in two of train / val / test (indices into the same source file), none twice."""
    seen: dict[tuple[str, int], str] = {}
    for split, (source, idx) in dm.split_indices.items():
        assert len(set(idx)) == len(idx), f"{split} holds a sample twice"
        for i in idx:
            other = seen.setdefault((source, i), split)
            assert other == split, f"{source}[{i}] is in both {other} and {split}"


def test_digits_splits_are_disjoint_and_shaped():
    dm = ImageDataModule("digits", batch_size=32)
    dm.setup()
    assert (dm.num_classes, dm.in_chans, dm.img_size) == (10, 1, 16)
    sizes = {k: len(idx) for k, (_, idx) in dm.split_indices.items()}
    assert sizes == {"train": 1294, "val": 144, "test": 359}  # 1797 = 80/20, val 10 % of the 80
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1294, 144, 359)
    _assert_splits_disjoint(dm)
    all_ids = sorted(i for _, idx in dm.split_indices.values() for i in idx)
    assert all_ids == list(range(1797))  # every image used once
    # the sets hold the images the indices name
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images, dtype=torch.float32)[dm.split_indices["test"][1][:5]]
    expect = dm._normalise(torch.nn.functional.interpolate(raw.unsqueeze(1) / 16, size=16, mode="bilinear"))
    torch.testing.assert_close(dm.test_set.images[:5], expect)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and y.dtype == torch.long
    assert abs(float(dm.train_set.images.mean())) < 0.3  # normalised


def test_a_split_that_leaks_test_images_is_caught(monkeypatch):
    """The check above fails on a split whose training pool holds half the test set."""
    honest = data_mod.digits_split

    def leaky(n):
        pool, test = honest(n)
        return torch.cat([pool, test[: len(test) // 2]]), test

    monkeypatch.setattr(data_mod, "digits_split", leaky)
    dm = ImageDataModule("digits")
    dm.setup()
    with pytest.raises(AssertionError, match=r"digits\[\d+\] is in both (train|val) and test"):
        _assert_splits_disjoint(dm)


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
    with pytest.raises(RuntimeError, match=f"not under {tmp_path / 'data'}/FashionMNIST.*"
                                           "apt-get install dataset-fashion-mnist"):
        dm.setup()


def test_missing_imagenet_and_cifar_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageFolder tree"):
        ImageDataModule("imagenet", data_dir=str(tmp_path)).setup()
    with pytest.raises(RuntimeError, match="CIFAR10 is not under"):
        ImageDataModule("cifar10", data_dir=str(tmp_path), download=False).setup()


@pytest.mark.skipif(not data_mod.DEBIAN_FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_offline_from_debian_files(tmp_path):
    # an earlier extraction was interrupted after one file: the others are still extracted
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(data_mod.DEBIAN_FMNIST / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        (raw / "t10k-labels-idx1-ubyte").write_bytes(f.read())
    dm = ImageDataModule("fashion_mnist", data_dir=str(tmp_path), batch_size=16)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 60_000 and len(dm.test_set) == 10_000
    _assert_splits_disjoint(dm)
    assert {k: src for k, (src, _) in dm.split_indices.items()} == {"train": "train", "val": "train", "test": "test"}
    assert not list(raw.glob(".*.tmp"))  # no temporary extraction left behind
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
    _assert_splits_disjoint(dm)


# -- data configuration from the model (timm pretrained_cfg) --------------------------------------
def test_vit_small_gets_its_own_statistics_not_imagenets():
    model = timm.create_model("vit_small_patch16_224", pretrained=False)  # pretrained_cfg is attached anyway
    cfg = data_config_for(model)
    assert cfg == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                   "crop_pct": 0.9, "input_size": (3, 224, 224)}
    assert cfg["mean"] != DATASETS["imagenet"].mean


def test_input_size_is_the_models_own():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96)
    assert data_config_for(model)["input_size"] == (3, 96, 96)  # timm's resolver would say 224


@pytest.mark.parametrize(("name", "dataset"), [("csdformer_tiny", "cifar10"), ("csdformer_4_384", "cifar10"),
                                               ("csdformer_8_512", "imagenet")])
def test_csdformer_cfgs_agree_with_the_dataset_table(name, dataset):
    import csdlab.models  # noqa: F401  registers csdformer_*

    with torch.device("meta"):
        model = timm.create_model(name)
    cfg, info = data_config_for(model), DATASETS[dataset]
    assert cfg["mean"] == info.mean and cfg["std"] == info.std
    assert cfg["input_size"] == (info.in_chans, info.img_size, info.img_size)
    dm = ImageDataModule(dataset)  # the data module's defaults are these numbers
    assert (dm.hparams.mean, dm.hparams.std, dm.hparams.crop_pct) == (cfg["mean"], cfg["std"], cfg["crop_pct"])


def test_a_model_built_for_other_channels_refuses_its_cfg():
    import csdlab.models  # noqa: F401

    model = timm.create_model("csdformer_tiny", in_chans=1, img_size=16, pool_stages=[2, 3])
    with pytest.raises(ValueError, match="takes 1 input channels but its pretrained_cfg has mean/std for 3"):
        data_config_for(model)
    with pytest.raises(ValueError, match="has no timm pretrained_cfg"):
        data_config_for(torch.nn.Linear(2, 2))


def test_mean_std_override_the_table_and_are_recorded():
    dm = ImageDataModule("digits", mean=(0.5,), std=(0.25,), interpolation="nearest")
    dm.setup()
    assert (dm.hparams.mean, dm.hparams.std, dm.hparams.interpolation) == ((0.5,), (0.25,), "nearest")
    from sklearn.datasets import load_digits

    first = torch.tensor(load_digits().images[dm.split_indices["test"][1][0]], dtype=torch.float32) / 16
    expect = (first.repeat_interleave(2, 0).repeat_interleave(2, 1) - 0.5) / 0.25  # nearest 8 -> 16
    torch.testing.assert_close(dm.test_set.images[0, 0], expect)
    assert ImageDataModule("digits").hparams.mean == DATASETS["digits"].mean  # None: the table's value


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(mean=(0.5, 0.5, 0.5)), r"mean=\(0.5, 0.5, 0.5\) has 3 entries but digits images have 1 channel"),
    (dict(std=(0.0,)), r"std must be > 0"),
    (dict(interpolation="lanczos"), r"interpolation='lanczos' is not supported"),
    (dict(crop_pct=1.5), r"crop_pct must be in \(0, 1\]"),
])
def test_bad_data_config_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageDataModule("digits", **kwargs)
