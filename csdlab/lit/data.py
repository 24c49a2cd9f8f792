"""One LightningDataModule for every image dataset csdlab trains and converts on.

Datasets differ only in a small table (:data:`DATASETS`); the validation split is always carved
out of the training set, so the test set is touched only by ``test``.
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
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

__all__ = ["ImageDataModule", "DATASETS", "EpochSeededSampler"]

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
    """

    def __init__(self, dataset: str = "digits", data_dir: str = "data", img_size: int | None = None,
                 batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.1, seed: int = 0,
                 download: bool = True, augment: bool = True, auto_augment: str | None = None,
                 re_prob: float = 0.0) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.info = DATASETS[dataset]
        self.img_size = img_size or self.info.img_size
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.calib_set: Dataset | None = None

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
        if DEBIAN_FMNIST.is_dir() and not (raw / "t10k-labels-idx1-ubyte").exists():
            raw.mkdir(parents=True, exist_ok=True)
            for gz in DEBIAN_FMNIST.glob("*-ubyte.gz"):
                with gzip.open(gz, "rb") as src, open(raw / gz.stem, "wb") as dst:
                    shutil.copyfileobj(src, dst)
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
        mean = torch.tensor(self.info.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def _tensor_sets(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                     hflip: bool, pad: int) -> None:
        if train_x.shape[-1] != self.img_size:
            train_x = F.interpolate(train_x, size=self.img_size, mode="bilinear", align_corners=False)
            test_x = F.interpolate(test_x, size=self.img_size, mode="bilinear", align_corners=False)
        train_x, test_x = self._normalise(train_x), self._normalise(test_x)
        tr, va = self._split(len(train_y))
        aug = self.hparams.augment
        self.train_set = AugmentedTensorDataset(train_x[tr], train_y[tr], aug, hflip, pad)
        self.calib_set = AugmentedTensorDataset(train_x[tr], train_y[tr], False, hflip, pad)
        self.val_set = AugmentedTensorDataset(train_x[va], train_y[va], False, hflip, pad)
        self.test_set = AugmentedTensorDataset(test_x, test_y, False, hflip, pad)

    def _timm_sets(self, make: Callable[[bool, Callable], Dataset]) -> None:
        from timm.data import create_transform

        hp = self.hparams
        kw = dict(input_size=(self.in_chans, self.img_size, self.img_size), mean=self.info.mean, std=self.info.std)
        small = self.img_size <= 64
        train_tf = create_transform(**kw, is_training=hp.augment, auto_augment=hp.auto_augment, re_prob=hp.re_prob,
                                    scale=(0.35, 1.0) if small else (0.08, 1.0), interpolation="bicubic")
        eval_tf = create_transform(**kw, is_training=False, crop_pct=1.0 if small else 0.875, interpolation="bicubic")
        train_full, eval_full = make(True, train_tf), make(True, eval_tf)
        tr, va = self._split(len(train_full))
        self.train_set, self.calib_set = Subset(train_full, tr), Subset(eval_full, tr)
        self.val_set = Subset(eval_full, va)
        self.test_set = make(False, eval_tf)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        name = self.hparams.dataset
        if name == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
            y = torch.tensor(d.target, dtype=torch.long)
            # fixed 80/20 train/test split; validation comes out of the 80%
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
            n_test = len(y) // 5
            te, tr = perm[:n_test], perm[n_test:]
            self._tensor_sets(x[tr], y[tr], x[te], y[te], hflip=False, pad=0)
        elif name == "fashion_mnist":
            train, test = self._fashion_mnist(True), self._fashion_mnist(False)
            self._tensor_sets(train.data.unsqueeze(1).float() / 255, train.targets,
                              test.data.unsqueeze(1).float() / 255, test.targets, hflip=True, pad=2)
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
