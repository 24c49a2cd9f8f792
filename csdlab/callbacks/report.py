"""Lightning callback: the written output of a conversion evaluation (rank 0).

After ``Trainer.test`` of a :class:`csdlab.eval.ConversionEvaluation`: logs the summary table and
the per-step table, runs the spike-driven check on a few test images, writes ``figures.json`` and
the plots under ``out_dir`` (default: the trainer's log dir), and sends the plots to W&B when a
``WandbLogger`` is attached.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from csdlab.eval.report import write_report
from csdlab.eval.checks import spike_driven_check

__all__ = ["ConversionReport", "log_images"]

log = logging.getLogger(__name__)


def log_images(trainer: L.Trainer, paths: list[Path], prefix: str) -> None:
    """Send image files to every W&B logger of ``trainer`` under ``prefix/<file stem>``."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            for p in paths:
                logger.log_image(key=f"{prefix}/{Path(p).stem}", images=[str(p)])


class ConversionReport(Callback):
    """Tables, JSON, plots and the spike-driven check of a conversion evaluation.

    Args:
        out_dir: where ``figures.json`` and the plots go (default: the trainer's log dir, else
            its ``default_root_dir``).
        check_images: test images the spike-driven check runs on (0: skip the check).
    """

    def __init__(self, out_dir: str | None = None, check_images: int = 8) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.check_images = check_images
        self._images: Tensor | None = None
        self.written: dict[str, Any] = {}

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and self.check_images > 0:
            self._images = batch[0][: self.check_images].detach()

    def _spike_driven(self, pl_module: L.LightningModule) -> dict[str, Any]:
        if self._images is None:
            return {}
        x = self._images.to(next(pl_module.reference.parameters()).dtype)
        verdicts = {}
        for v, snn in pl_module.variants().items():
            with torch.no_grad():
                report = spike_driven_check(snn, lambda s: s(x), exempt=snn.analog_layers())
            verdicts[v] = {"spike_driven": report.ok, "layers_checked": len(report.layers),
                           "analog_inputs": report.violations, "operands": report.operand_kinds(),
                           "failed_sources": report.failed_sources,
                           "exempt": [c.name for c in report.layers if c.exempt], "summary": report.summary()}
            log.info("spike-driven check %s: %s", v, report.summary())
        return verdicts

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # log_dir is a collective under DDP: every rank asks, rank 0 writes
        out = Path(self.out_dir or trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero or not getattr(pl_module, "results", None):
            return
        pl_module.results["spike_driven_check"] = self._spike_driven(pl_module)
        results = pl_module.results
        ref_name = pl_module.converter.reference_name
        meta = {"checkpoint": pl_module.checkpoint, "float64": pl_module.float64, "world_size": trainer.world_size}
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "num_images"):
            meta.update(dataset=dm.dataset, split=dm.split, images=dm.num_images(), limit=dm.limit)
        self.written = write_report(results, out, ref_name, extra=meta)
        images = int(results["figures"]["samples"])
        for name, table in self.written["tables"].items():
            log.info("%s conversion, %s (%d images, %s split):\n%s", results["method"], name, images,
                     meta.get("split", "?"), table)
        log.info("figures: %s", self.written["json"])
        log_images(trainer, self.written["plots"], f"conversion/{results['method']}")
