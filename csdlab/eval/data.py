"""Data of a conversion run: calibration batches (training images) and the evaluation split,
both split between processes without padding, so 1 and N processes score the same images."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from csdlab.lit.data import ImageDataModule

__all__ = ["ConversionData"]

log = logging.getLogger(__name__)


def _image_data(**kwargs: Any) -> ImageDataModule:
    """The inner data module, built one frame away from ``ConversionData.__init__``: Lightning's
    ``save_hyperparameters`` collects the arguments of directly nested ``__init__`` frames, and the
    inner module must record its own. (``convert.py`` builds ConversionData without Lightning's
    hyper-parameter injection, ``load_from_checkpoint_support=False``.)"""
    return ImageDataModule(**kwargs)


class ConversionData(L.LightningDataModule):
    """Calibration batches and the evaluation split for ``convert.py``.

    Args:
        dataset: ``digits``, ``fashion_mnist``, ``cifar10``, ``cifar100`` or ``imagenet``
            (default: the dataset recorded in a ``train.py`` checkpoint).
        data_dir: dataset root.
        split: ``test`` (the test set) or ``val`` (the held-out part of the training set).
        batch_size: images per batch and process (calibration batches too).
        num_workers: data-loading workers.
        limit: score only the first ``limit`` images of the split (None: all); the table and
            JSON say how many were scored.
        calib_batches: calibration batches of training images (shared between processes, batch
            by batch, so the figures do not depend on the world size).
        img_size: input resolution (default: the checkpoint's, else the dataset's).
        exit_images: labelled images the early-exit setting is calibrated on (``--model.early_exit``).
        exit_split: where they come from: ``val`` (the part of the training set held out of
            training: the network never fitted them, so its confidence there is that of unseen
            images) or ``train`` (training images, evaluation transforms); never the test set.
        model_data: the data settings the model expects (recorded dataset, split seed, and
            normalisation); filled in from ``model`` by the command line.
    """

    def __init__(self, dataset: str | None = None, data_dir: str = "data", split: str = "test",
                 batch_size: int = 128, num_workers: int = 0, limit: int | None = None, calib_batches: int = 8,
                 img_size: int | None = None, model_data: dict[str, Any] | None = None, exit_images: int = 5000,
                 exit_split: str = "val") -> None:
        super().__init__()
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        if exit_split not in ("val", "train"):
            raise ValueError(f"exit_split must be 'val' (held-out training images) or 'train', got {exit_split!r}")
        if exit_split == split:
            raise ValueError(f"exit_split {exit_split!r} is the split being scored: calibrate early exit on other "
                             "images (--data.exit_split train)")
        if exit_images < 1:
            raise ValueError(f"exit_images must be >= 1, got {exit_images}")
        self.exit_images, self.exit_split = exit_images, exit_split
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 image (or None for all), got {limit}")
        if calib_batches < 0:
            raise ValueError(f"calib_batches must be >= 0, got {calib_batches}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.limit, self.calib_batches = split, limit, calib_batches
        recorded = dict(model_data or {})
        name = dataset or recorded.get("dataset")
        if name is None:
            raise ValueError("which dataset? the model does not record one: pass --data.dataset "
                             "(digits, fashion_mnist, cifar10, cifar100, imagenet)")
        # the split seed / fraction and the normalisation follow training (or the hub weights)
        accepted = inspect.signature(ImageDataModule).parameters
        settings = {k: v for k, v in recorded.items() if k in accepted and k not in ("dataset", "data_dir",
                    "batch_size", "num_workers", "augment", "download", "img_size")}
        self.images = _image_data(dataset=name, data_dir=data_dir, batch_size=batch_size, num_workers=num_workers,
                                  augment=False, img_size=img_size or recorded.get("img_size"), **settings)

    @property
    def dataset(self) -> str:
        return self.images.hparams.dataset

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def prepare_data(self) -> None:
        self.images.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.images.setup()

    def calibration_batches(self) -> Iterator[Tensor]:
        """This process's share of the calibration batches (images only)."""
        rank, world = self._rank_world()
        if 0 < self.calib_batches < world:
            raise ValueError(f"calib_batches ({self.calib_batches}) must be >= the number of processes ({world})")
        seen = 0
        for i, (x, _) in enumerate(self.images.calibration_dataloader()):
            if i >= self.calib_batches:
                break
            seen += 1
            if i % world == rank:
                yield x
        if seen < self.calib_batches and rank == 0:
            log.warning("only %d of %d calibration batches available", seen, self.calib_batches)

    def _exit_set(self) -> Any:
        self.images.setup()
        ds = self.images.val_set if self.exit_split == "val" else self.images.calib_set
        # a fixed, seeded draw: the first images of the training file could be ordered by class
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: self.exit_images]
        return Subset(ds, order.tolist())

    def exit_batch_count(self) -> int:
        """Early-exit calibration batches (all processes together)."""
        return math.ceil(len(self._exit_set()) / self.images.hparams.batch_size)

    def exit_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's share of the early-exit calibration batches (images and labels)."""
        rank, world = self._rank_world()
        if self.exit_batch_count() < world:
            raise ValueError(f"{self.exit_batch_count()} early-exit calibration batches for {world} processes: raise "
                             "--data.exit_images to at least one batch per process")
        loader = DataLoader(self._exit_set(), batch_size=self.images.hparams.batch_size, shuffle=False,
                            num_workers=self.images.hparams.num_workers)
        for i, (x, y) in enumerate(loader):
            if i % world == rank:
                yield x, y

    def _eval_set(self) -> Any:
        self.images.setup()
        return self.images.test_set if self.split == "test" else self.images.val_set

    def num_images(self) -> int:
        """Images the evaluation scores (the limit applied)."""
        n = len(self._eval_set())
        return n if self.limit is None else min(self.limit, n)

    def test_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        hp = self.images.hparams
        # every world-th image from this rank's offset: no padding, no repeats
        return DataLoader(Subset(self._eval_set(), range(rank, self.num_images(), world)),
                          batch_size=hp.batch_size, shuffle=False, num_workers=hp.num_workers)
