"""One LightningDataModule for every image dataset csdlab trains and converts on.

Datasets differ only in a small table (:data:`DATASETS`); the validation split is always carved
out of the training set, so the test set is touched only by ``test``.

Where the normalisation comes from:

* a model trained from scratch by csdlab is normalised with its dataset's statistics (the table);
  :class:`ImageDataModule` records the values it used in its hyper-parameters, which Lightning
  stores in every checkpoint (``datamodule_hyper_parameters``), so a checkpoint says how its
  images were prepared;
* a model with pretrained weights expects the statistics its weights were trained with: timm
  attaches them to the model as ``pretrained_cfg`` (``vit_small_patch16_224``: mean = std = 0.5),
  and :func:`data_config_for` reads them (``timm.data.resolve_model_data_config``). The training
  CLI passes them to the data module when ``model.pretrained`` is true. CSDformer's
  ``default_cfgs`` (:mod:`csdlab.models.csdformer`) hold the statistics of the dataset each
  variant is built for (CIFAR for the 32-pixel layouts, ImageNet for the 224-pixel ones) and agree
  with this table, so both routes give a CSDformer the same numbers.
"""

from __future__ import annotations

import gzip
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

__all__ = ["ImageDataModule", "DATASETS", "EpochSeededSampler", "data_config_for", "model_input_size",
           "pretrained_data_args"]

log = logging.getLogger(__name__)

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(10, 1, 16, (0.3,), (0.4,)),  # 8x8 upscaled to 16x16
    "fashion_mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": DatasetInfo(1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def model_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """``(C, H, W)`` the model was built for, read from the model itself (CSDformer, timm ViTs)."""
    in_chans = getattr(model, "in_chans", None)
    img_size = getattr(model, "img_size", None)
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        img_size = getattr(patch_embed, "img_size", img_size)
        proj = getattr(patch_embed, "proj", None)
        in_chans = getattr(proj, "in_channels", in_chans)
    if in_chans is None or img_size is None:
        return None
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return int(in_chans), int(h), int(w)


def data_config_for(model: nn.Module) -> dict[str, Any]:
    """The image preparation a model's weights expect, from its timm ``pretrained_cfg``.

    Built on ``timm.data.resolve_model_data_config``; the input size is the one the model was
    built with (timm's resolver reports the pretrained default even when ``img_size`` or
    ``in_chans`` were changed).

    Args:
        model: a timm model (``timm.create_model(..., pretrained=False)`` is enough: the config is
            attached without the weights).

    Returns:
        ``mean`` and ``std`` (tuples, one entry per input channel), ``interpolation``
        (``bicubic``, ``bilinear``, ...), ``crop_pct`` (centre-crop fraction at evaluation) and
        ``input_size`` ``(C, H, W)``.

    Raises:
        ValueError: the model has no ``pretrained_cfg``, or was built for another channel count
            than its configuration's statistics (then they cannot apply: use the dataset's).
    """
    from timm.data import resolve_model_data_config

    if not getattr(model, "pretrained_cfg", None):
        raise ValueError(f"{type(model).__name__} has no timm pretrained_cfg to read its mean/std from; "
                         f"build it with timm.create_model, or give ImageDataModule mean/std explicitly")
    cfg = resolve_model_data_config(model)
    input_size = model_input_size(model) or tuple(cfg["input_size"])
    mean, std = tuple(float(m) for m in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if len(mean) != input_size[0] or len(std) != input_size[0]:
        raise ValueError(f"{type(model).__name__} takes {input_size[0]} input channels but its pretrained_cfg "
                         f"has mean/std for {len(mean)}: those statistics do not apply; normalise with the "
                         f"dataset's statistics (ImageDataModule with mean=None, std=None)")
    return {"mean": mean, "std": std, "interpolation": str(cfg["interpolation"]),
            "crop_pct": float(cfg["crop_pct"]), "input_size": tuple(int(v) for v in input_size)}


def pretrained_data_args(model_name: str, model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """:class:`ImageDataModule` arguments (``mean``, ``std``, ``interpolation``, ``crop_pct``) for
    fine-tuning ``model_name``'s pretrained weights: the model is built on the ``meta`` device, so
    nothing is downloaded or allocated."""
    import timm

    import csdlab.models  # noqa: F401  registers csdformer_* with timm

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, **(model_kwargs or {}))
    cfg = data_config_for(model)
    return {k: cfg[k] for k in ("mean", "std", "interpolation", "crop_pct")}


def digits_split(n: int) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits have no test split: a fixed 80/20 one (seed 1234), returned as
    ``(train pool, test)`` indices; validation is later carved out of the train pool."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1234))
    n_test = n // 5
    return perm[n_test:], perm[:n_test]


class EpochSeededSampler(Sampler[int]):
    """Random order that depends only on (seed, epoch), so a resumed run sees the same batches.

    Lightning calls ``set_epoch`` on the sampler every epoch (and swaps in a DistributedSampler,
    which is epoch-seeded too, under DDP).
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class AugmentedTensorDataset(Dataset):
    """Normalised image tensors, with random flips and shifts (pad + crop) when ``train``."""

    def __init__(self, images: Tensor, labels: Tensor, train: bool, hflip: bool, pad: int) -> None:
        self.images, self.labels, self.train, self.hflip, self.pad = images, labels, train, hflip, pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i]
        if self.train:
            if self.hflip and torch.rand(()) < 0.5:
                x = x.flip(-1)
            if self.pad:
                h, w = x.shape[-2:]
                dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
                x = F.pad(x, [self.pad] * 4)[:, dy:dy + h, dx:dx + w]
        return x, self.labels[i]


class ImageDataModule(L.LightningDataModule):
    """Digits (scikit-learn, embedded), Fashion-MNIST, CIFAR-10/100 (torchvision), ImageNet (ImageFolder).

    Args:
        dataset: ``digits``, ``fashion_mnist``, ``cifar10``, ``cifar100`` or ``imagenet``.
        data_dir: where datasets live / are downloaded (ImageNet: a root with ``train/`` and ``val/``).
        img_size: input resolution; default per dataset (digits 16, Fashion-MNIST 28, CIFAR 32, ImageNet 224).
        batch_size: per-device batch size.
        num_workers: data-loading worker processes.
        val_fraction: share of the training set held out for validation.
        seed: seed of the train/val split and of the shuffling order.
        download: let torchvision download CIFAR / Fashion-MNIST when missing.
        augment: random flips/shifts (small datasets) or timm's training transform (CIFAR, ImageNet).
        auto_augment: timm auto-augment policy for CIFAR/ImageNet, e.g. ``rand-m9-mstd0.5-inc1``.
        re_prob: random-erasing probability for CIFAR/ImageNet.
        mean: per-channel normalisation mean; None: the dataset's (the table). A pretrained model's
            own values come from :func:`data_config_for`.
        std: per-channel normalisation standard deviation; None: the dataset's.
        interpolation: resize filter (``nearest``, ``bilinear``, ``bicubic``); None: bilinear for
            the tensor datasets (digits, Fashion-MNIST), bicubic for CIFAR / ImageNet.
        crop_pct: centre-crop fraction of the evaluation transform (CIFAR / ImageNet); None: 1.0 up
            to 64 pixels, 0.875 above.

    The resolved ``mean``, ``std``, ``interpolation`` and ``crop_pct`` replace the None values in
    ``hparams``, so a checkpoint records the preparation its model was trained with.
    """

    def __init__(self, dataset: str = "digits", data_dir: str = "data", img_size: int | None = None,
                 batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.1, seed: int = 0,
                 download: bool = True, augment: bool = True, auto_augment: str | None = None,
                 re_prob: float = 0.0, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 interpolation: str | None = None, crop_pct: float | None = None) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.info = DATASETS[dataset]
        self.img_size = img_size or self.info.img_size
        small = self.img_size <= 64
        mean = tuple(float(m) for m in (self.info.mean if mean is None else mean))
        std = tuple(float(v) for v in (self.info.std if std is None else std))
        for name, values in (("mean", mean), ("std", std)):
            if len(values) != self.info.in_chans:
                raise ValueError(f"{name}={values} has {len(values)} entries but {dataset} images have "
                                 f"{self.info.in_chans} channel(s); give one value per channel")
        if not all(v > 0 for v in std):
            raise ValueError(f"std must be > 0 for every channel, got {std}")
        if interpolation is None:
            interpolation = "bicubic" if dataset in ("cifar10", "cifar100", "imagenet") else "bilinear"
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r} is not supported; choose one of {INTERPOLATIONS}")
        crop_pct = (1.0 if small else 0.875) if crop_pct is None else float(crop_pct)
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.hparams.update(mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.calib_set: Dataset | None = None
        #: after ``setup``: the samples of each split as ``(source, indices)``; ``source`` names the
        #: file the indices point into (``train`` / ``test``, or ``digits`` for the one digits array)
        self.split_indices: dict[str, tuple[str, list[int]]] = {}

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def in_chans(self) -> int:
        return self.info.in_chans

    # -- preparation (rank 0 only): make the files exist ------------------------------------
    def prepare_data(self) -> None:
        if self.hparams.dataset == "fashion_mnist":
            self._fashion_mnist(train=True)
        elif self.hparams.dataset in ("cifar10", "cifar100"):
            self._cifar(train=True, transform=None)

    def _fashion_mnist(self, train: bool) -> Any:
        from torchvision.datasets import FashionMNIST

        root = Path(self.hparams.data_dir)
        raw = root / "FashionMNIST" / "raw"
        # Debian's dataset-fashion-mnist ships the canonical files with another gzip encoding,
        # so torchvision's checksums fail on the .gz; extracted files are found without download.
        if DEBIAN_FMNIST.is_dir():
            for gz in sorted(DEBIAN_FMNIST.glob("*-ubyte.gz")):
                if (raw / gz.stem).exists():
                    continue
                raw.mkdir(parents=True, exist_ok=True)
                # extract beside the target and rename: an interrupted run leaves no truncated file
                # that a later run would take for a complete one
                tmp = raw / f".{gz.stem}.tmp"
                with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                tmp.replace(raw / gz.stem)
        try:
            return FashionMNIST(root, train=train, download=self.hparams.download)
        except (RuntimeError, OSError) as e:
            raise RuntimeError(
                f"Fashion-MNIST is not under {root}/FashionMNIST and could not be downloaded ({e}). "
                "Offline: `apt-get install dataset-fashion-mnist` (csdlab extracts "
                f"{DEBIAN_FMNIST}/*.gz by itself); online: keep data.download=true.") from e

    def _cifar(self, train: bool, transform: Callable | None) -> Any:
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if self.hparams.dataset == "cifar10" else CIFAR100
        try:
            return cls(self.hparams.data_dir, train=train, transform=transform, download=self.hparams.download)
        except (RuntimeError, OSError) as e:
            raise RuntimeError(
                f"{cls.__name__} is not under {self.hparams.data_dir} and could not be downloaded ({e}). "
                f"Download it where the internet is reachable (torchvision {cls.__name__}(root, download=True)) "
                f"and point data.data_dir at that root.") from e

    # -- datasets --------------------------------------------------------------------------
    def _split(self, n: int) -> tuple[list[int], list[int]]:
        g = torch.Generator().manual_seed(self.hparams.seed)
        perm = torch.randperm(n, generator=g).tolist()
        n_val = max(1, int(round(n * self.hparams.val_fraction)))
        return sorted(perm[n_val:]), sorted(perm[:n_val])

    def _normalise(self, x: Tensor) -> Tensor:
        mean = torch.tensor(self.hparams.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.hparams.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def _record_split(self, train_source: str, train_ids: Tensor | list[int], tr: list[int], va: list[int],
                      test_source: str, test_ids: Tensor | list[int]) -> None:
        ids = torch.as_tensor(train_ids)
        self.split_indices = {"train": (train_source, ids[tr].tolist()), "val": (train_source, ids[va].tolist()),
                              "test": (test_source, torch.as_tensor(test_ids).tolist())}

    def _tensor_sets(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                     hflip: bool, pad: int, sources: tuple[str, Tensor, str, Tensor]) -> None:
        if train_x.shape[-1] != self.img_size:
            mode = self.hparams.interpolation
            kw = {} if mode == "nearest" else {"align_corners": False}
            train_x = F.interpolate(train_x, size=self.img_size, mode=mode, **kw)
            test_x = F.interpolate(test_x, size=self.img_size, mode=mode, **kw)
        train_x, test_x = self._normalise(train_x), self._normalise(test_x)
        tr, va = self._split(len(train_y))
        self._record_split(sources[0], sources[1], tr, va, sources[2], sources[3])
        aug = self.hparams.augment
        self.train_set = AugmentedTensorDataset(train_x[tr], train_y[tr], aug, hflip, pad)
        self.calib_set = AugmentedTensorDataset(train_x[tr], train_y[tr], False, hflip, pad)
        self.val_set = AugmentedTensorDataset(train_x[va], train_y[va], False, hflip, pad)
        self.test_set = AugmentedTensorDataset(test_x, test_y, False, hflip, pad)

    def _timm_sets(self, make: Callable[[bool, Callable], Dataset]) -> None:
        from timm.data import create_transform

        hp = self.hparams
        kw = dict(input_size=(self.in_chans, self.img_size, self.img_size), mean=hp.mean, std=hp.std,
                  interpolation=hp.interpolation)
        small = self.img_size <= 64
        train_tf = create_transform(**kw, is_training=hp.augment, auto_augment=hp.auto_augment, re_prob=hp.re_prob,
                                    scale=(0.35, 1.0) if small else (0.08, 1.0))
        eval_tf = create_transform(**kw, is_training=False, crop_pct=hp.crop_pct)
        train_full, eval_full = make(True, train_tf), make(True, eval_tf)
        tr, va = self._split(len(train_full))
        self.train_set, self.calib_set = Subset(train_full, tr), Subset(eval_full, tr)
        self.val_set = Subset(eval_full, va)
        self.test_set = make(False, eval_tf)
        self._record_split("train", torch.arange(len(train_full)), tr, va, "test", torch.arange(len(self.test_set)))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        name = self.hparams.dataset
        if name == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
            y = torch.tensor(d.target, dtype=torch.long)
            tr, te = digits_split(len(y))
            self._tensor_sets(x[tr], y[tr], x[te], y[te], hflip=False, pad=0, sources=("digits", tr, "digits", te))
        elif name == "fashion_mnist":
            train, test = self._fashion_mnist(True), self._fashion_mnist(False)
            self._tensor_sets(train.data.unsqueeze(1).float() / 255, train.targets,
                              test.data.unsqueeze(1).float() / 255, test.targets, hflip=True, pad=2,
                              sources=("train", torch.arange(len(train.targets)), "test", torch.arange(len(test.targets))))
        elif name in ("cifar10", "cifar100"):
            self._timm_sets(lambda train, tf: self._cifar(train, tf))
        else:  # imagenet
            from torchvision.datasets import ImageFolder

            root = Path(self.hparams.data_dir)
            for split in ("train", "val"):
                if not (root / split).is_dir():
                    raise FileNotFoundError(
                        f"ImageNet needs an ImageFolder tree {root}/{split}/<class>/<image>; "
                        f"{root / split} does not exist. Set data.data_dir to the ImageNet root.")
            self._timm_sets(lambda train, tf: ImageFolder(str(root / ("train" if train else "val")), transform=tf))

    # -- loaders ---------------------------------------------------------------------------
    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        sampler = EpochSeededSampler(len(ds), hp.seed) if shuffle else None
        return DataLoader(ds, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0, drop_last=shuffle and len(ds) > hp.batch_size)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)

    def calibration_dataloader(self) -> DataLoader:
        """Training images with evaluation transforms, shuffled by the seed (for threshold calibration)."""
        self.setup()
        return self._loader(self.calib_set, shuffle=True)
