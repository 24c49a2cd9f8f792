"""Lightning callback: convert the network being trained with any converter and measure it.

On the last validation of ``fit`` (and every ``every_n_epochs`` epochs if set) and on every
``test``, ``pl_module.model`` is converted by the converter the callback is given (in YAML a
``class_path``, as in ``configs/convert/``: CSDformer for a quantized CSDformer, ECMT or MBE for a
ViT), after calibrating on training images when the converter needs it, and scored on the same
batches as the network by the one evaluation path (:class:`csdlab.eval.ConversionMetrics`): the
figures are those ``convert.py test`` gives on the same checkpoint, images and calibration batches.
Figures go through ``pl_module.log_dict`` under ``conversion/{val,test}/`` with the evaluation's
keys (``snn/D3/agreement``, ``energy/T10/ratio_t8``, ...); plots go to ``<log_dir>/conversion/``
and, with a ``WandbLogger``, to W&B.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from csdlab.eval.api import Converter, SpikingModel
from csdlab.eval.metrics import ConversionMetrics
from csdlab.eval.report import log_images, plot_report

__all__ = ["ConversionCallback"]

log = logging.getLogger(__name__)


class ConversionCallback(Callback):
    """Converts ``pl_module.model`` and logs the spiking variants' figures against it.

    Args:
        converter: the method and its options, as ``model.converter`` in ``configs/convert/``
            (default: :class:`~csdlab.convert.csdformer.CSDformerConverter` with D = 0..3).
        every_n_epochs: also run after every n-th validation epoch (0: only at the end of fit).
        calib_batches: batches of training images (the data module's ``calibration_dataloader``,
            split between processes as ``convert.py`` does) a converter that calibrates observes.
        plots: write the plots (rank 0) and send them to W&B when a ``WandbLogger`` is attached.
    """

    def __init__(self, converter: Converter | None = None, every_n_epochs: int = 0, calib_batches: int = 8,
                 plots: bool = True) -> None:
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0 = only at the end of fit), got {every_n_epochs}")
        if calib_batches < 0:
            raise ValueError(f"calib_batches must be >= 0, got {calib_batches}")
        if converter is None:
            from csdlab.convert.csdformer import CSDformerConverter

            converter = CSDformerConverter(delay=3, delays=[0, 1, 2, 3])
        self.converter = converter
        self.every_n_epochs = every_n_epochs
        self.calib_batches = calib_batches
        self.plots = plots
        self._snns: dict[str, SpikingModel] | None = None
        self._metrics: ConversionMetrics | None = None
        self.calibration: dict[str, Any] = {}
        self.last_results: dict[str, float] = {}

    @staticmethod
    def _model(pl_module: L.LightningModule) -> nn.Module:
        model = getattr(pl_module, "model", None)
        if model is None:
            raise ValueError(f"ConversionCallback needs pl_module.model (the timm model); "
                             f"{type(pl_module).__name__} has none")
        return model

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # fail at the start of the run, not after hours of training
        self.converter.check(self._model(pl_module))

    def _should_run(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING:
            return True  # a stand-alone trainer.validate() always measures
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        return last or (self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0)

    def _calibration_batches(self, trainer: L.Trainer, device: torch.device) -> Iterator[Tensor]:
        """This process's share of the first ``calib_batches`` calibration batches (as ConversionData)."""
        dm = trainer.datamodule
        if not hasattr(dm, "calibration_dataloader"):
            raise ValueError(f"{self.converter.name} calibrates on training images: the data module needs a "
                             f"calibration_dataloader() (csdlab.lit.ImageDataModule has one)")
        rank, world = trainer.global_rank, trainer.world_size
        if 0 < self.calib_batches < world:
            raise ValueError(f"calib_batches ({self.calib_batches}) must be >= the number of processes ({world})")
        for i, (x, _) in enumerate(islice(dm.calibration_dataloader(), self.calib_batches)):
            if i % world == rank:
                yield x.to(device)

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = self._model(pl_module)
        was_training = model.training
        model.eval()
        try:
            if self.converter.needs_calibration:
                def all_reduce(t: Tensor) -> Tensor:
                    return trainer.strategy.reduce(t.to(pl_module.device), reduce_op="sum")

                with torch.no_grad():
                    self.calibration = self.converter.calibrate(
                        model, self._calibration_batches(trainer, pl_module.device), all_reduce)
            self._snns = self.converter.convert(model)
        finally:
            model.train(was_training)
        self._metrics = ConversionMetrics(model.num_classes, self._snns).to(pl_module.device)

    def _update(self, pl_module: L.LightningModule, batch: tuple[Tensor, Tensor]) -> None:
        if self._metrics is None:
            return
        x, y = batch
        model = self._model(pl_module)
        was_training = model.training
        model.eval()
        self._metrics.update(x, y, model, self._snns)
        model.train(was_training)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._metrics is None:
            return
        figures = self._metrics.compute()
        variants = {v: {"time_steps": s.time_steps, "latency": s.latency, "readout_steps": s.readout_steps}
                    for v, s in self._snns.items()}
        self._snns = self._metrics = None  # never kept as a submodule of pl_module
        self.last_results = figures
        pl_module.log_dict({f"conversion/{stage}/{k}": v for k, v in figures.items()}, sync_dist=False)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast under DDP: every rank asks
        if trainer.is_global_zero:
            log.info("%s conversion (%s): %s", self.converter.name, stage, "; ".join(
                f"SNN {v} top-1 {figures[f'snn/{v}/top1']:.4f}, agreement {figures[f'snn/{v}/agreement']:.4f}"
                for v in variants))
        if self.plots and trainer.is_global_zero:
            out = Path(log_dir) / "conversion" / f"{stage}_epoch{trainer.current_epoch}"
            results: dict[str, Any] = {"method": self.converter.name, "figures": figures, "variants": variants}
            log_images(trainer, plot_report(results, out, self.converter.reference_name), f"conversion/{stage}")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_run(trainer):
            self._start(trainer, pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(pl_module, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")
