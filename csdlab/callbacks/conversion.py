"""Lightning callback: convert the CSDformer being trained into its SNN and measure it.

On the last validation of ``fit`` (and every ``every_n_epochs`` epochs if set) and on every
``test``, a copy of ``pl_module.model`` is converted once per delay D
(:class:`csdlab.convert.csdformer.CSDformerConverter`) and scored on the same batches as the QANN by
the one evaluation path (:class:`csdlab.eval.ConversionMetrics`). Figures go through
``pl_module.log_dict`` under ``conversion/{val,test}/`` with the evaluation's keys
(``snn/D3/agreement``, ``energy/D3/ratio``, ...); plots go to ``<log_dir>/conversion/`` and, with a
``WandbLogger``, to W&B.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from csdlab.callbacks.report import log_images
from csdlab.convert.csdformer import CSDformerConverter
from csdlab.eval.api import SpikingModel
from csdlab.eval.metrics import ConversionMetrics
from csdlab.eval.report import plot_report

__all__ = ["ConversionCallback"]

log = logging.getLogger(__name__)


class ConversionCallback(Callback):
    """Converts ``pl_module.model`` (a quantized CSDformer) and logs SNN-vs-QANN figures.

    Args:
        delays: the delays D to evaluate, one SNN each.
        every_n_epochs: also run after every n-th validation epoch (0: only at the end of fit).
        time_steps: T (default: the model's quantization levels L).
        plots: write the plots (rank 0) and send them to W&B when a ``WandbLogger`` is attached.
    """

    def __init__(self, delays: Sequence[int] = (0, 1, 2, 3), every_n_epochs: int = 0,
                 time_steps: int | None = None, plots: bool = True) -> None:
        super().__init__()
        if not delays:
            raise ValueError("delays must be a non-empty list of integers >= 0, got []")
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0 = only at the end of fit), got {every_n_epochs}")
        self.converter = CSDformerConverter(delay=max(delays), delays=list(delays), time_steps=time_steps)
        self.every_n_epochs = every_n_epochs
        self.plots = plots
        self._snns: dict[str, SpikingModel] | None = None
        self._metrics: ConversionMetrics | None = None
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

    def _start(self, pl_module: L.LightningModule) -> None:
        qann = self._model(pl_module)
        self._snns = self.converter.convert(qann)
        self._metrics = ConversionMetrics(qann.num_classes, self._snns).to(pl_module.device)

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
            log.info("conversion (%s): %s", stage, "; ".join(
                f"SNN {v} top-1 {figures[f'snn/{v}/top1']:.4f}, agreement {figures[f'snn/{v}/agreement']:.4f}"
                for v in variants))
        if self.plots and trainer.is_global_zero:
            out = Path(log_dir) / "conversion" / f"{stage}_epoch{trainer.current_epoch}"
            results: dict[str, Any] = {"method": "csdformer", "figures": figures, "variants": variants}
            log_images(trainer, plot_report(results, out, "QANN"), f"conversion/{stage}")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_run(trainer):
            self._start(pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(pl_module, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")
