"""The one conversion evaluation: a LightningModule run by ``Trainer.test`` for every converter.

``on_test_start`` calibrates (when the converter needs it: each process observes its share of the
calibration batches, sums go through an all-reduce) and converts; ``test_step`` scores the
reference, the optional ANN and every spiking variant on each batch (:class:`ConversionMetrics`);
``on_test_epoch_end`` computes the rank-reduced figures, logs them (W&B or any logger) and keeps
them in ``results`` for :class:`csdlab.eval.report.ConversionReport`, which writes the tables, JSON
and plots.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from csdlab.eval.api import Converter, SpikingModel
from csdlab.eval.load import load_reference
from csdlab.eval.metrics import ConversionMetrics
from csdlab.eval.progress import Heartbeat

__all__ = ["ConversionEvaluation"]

log = logging.getLogger(__name__)


def _loaders(loaders: Any) -> list[Any]:
    return list(loaders.values()) if isinstance(loaders, dict) else list(loaders) if isinstance(
        loaders, (list, tuple)) else [loaders]


class ConversionEvaluation(L.LightningModule):
    """Convert a trained network and measure its spiking variants against it.

    Args:
        converter: the method and its options (``csdlab.convert.csdformer.CSDformerConverter``,
            ``csdlab.convert.ecmt.ECMTConverter``, ``csdlab.convert.mbe.MBEConverter``).
        checkpoint: a ``train.py`` checkpoint or a timm state dict of the network to convert.
        model_name: timm name (a plain state dict or ``pretrained``).
        pretrained: start from timm's hub weights for ``model_name``.
        model_kwargs: ``timm.create_model`` keyword arguments (state dict or pretrained).
        ann_checkpoint: a float twin of the same architecture, scored alongside (CSDformer: the
            ReLU model the QANN was made from).
        float64: simulate in float64 (removes float32 rounding at level boundaries).
    """

    def __init__(self, converter: Converter, checkpoint: str | None = None, model_name: str | None = None,
                 pretrained: bool = False, model_kwargs: dict[str, Any] | None = None,
                 ann_checkpoint: str | None = None, float64: bool = False) -> None:
        super().__init__()
        self.converter = converter
        reference, self.data_config = load_reference(checkpoint, model_name, pretrained, model_kwargs)
        converter.check(reference)
        self.reference = reference.eval().requires_grad_(False)
        self.ann: nn.Module | None = None
        if ann_checkpoint is not None:
            from csdlab.lit.module import load_classifier

            name = getattr(reference, "default_cfg", {}).get("architecture")
            self.ann, _ = load_classifier(ann_checkpoint, expected_model=name)
            self.ann.eval().requires_grad_(False)
        if float64:
            self.reference.double()
            if self.ann is not None:
                self.ann.double()
        self.checkpoint, self.float64 = checkpoint, float64
        self.snns: nn.ModuleDict | None = None
        self.metrics: ConversionMetrics | None = None
        self.calibration: dict[str, Any] = {}
        self.results: dict[str, Any] = {}
        self.progress = Heartbeat()

    @property
    def num_classes(self) -> int:
        return int(self.reference.num_classes)

    def variants(self) -> dict[str, SpikingModel]:
        if self.snns is None:
            raise RuntimeError("the SNN variants exist once the test run has started (on_test_start)")
        return dict(self.snns.items())

    def _ref_dtype(self) -> torch.dtype:
        return next(self.reference.parameters()).dtype

    def _all_reduce(self, x: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(x.to(self.device), reduce_op="sum")

    def _calibrate(self) -> None:
        dm = self.trainer.datamodule
        if not hasattr(dm, "calibration_batches"):
            raise ValueError(f"{self.converter.name} calibrates on training images: use csdlab.eval.ConversionData")
        batches = (x.to(self.device, self._ref_dtype()) for x in dm.calibration_batches())
        batches = self.progress.batches(batches, f"{self.converter.name} calibration", dm.calib_batches)
        with torch.no_grad():
            self.calibration = self.converter.calibrate(self.reference, batches, self._all_reduce)
        log.info("%s: calibrated on %d batches", self.converter.name, dm.calib_batches)

    def on_test_start(self) -> None:
        data_classes = getattr(self.trainer.datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(f"the data has {data_classes} classes but the model has {self.num_classes}: "
                             "pass the dataset the model was trained on (--data.dataset)")
        if any(isinstance(getattr(dl, "sampler", None), DistributedSampler)
               for dl in _loaders(self.trainer.test_dataloaders)):
            raise ValueError("build the Trainer with use_distributed_sampler=False: ConversionData splits the "
                             "images between processes itself (no padding, no repeated images)")
        if self.converter.needs_calibration:
            self._calibrate()
        log.info("%s: building the spiking variants", self.converter.name)
        self.snns = nn.ModuleDict(self.converter.convert(self.reference)).to(self.device)
        self.progress.batches_total = int(sum(self.trainer.num_test_batches))
        self.progress.watch(self.snns)
        self.metrics = ConversionMetrics(self.num_classes, self.variants(), with_ann=self.ann is not None)
        self.metrics.to(self.device)
        log.info("%s: evaluating %s", self.converter.name, ", ".join(self.snns))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.progress.batch = batch_idx
        self.metrics.update(x.to(self._ref_dtype()), y, self.reference, self.variants(), self.ann)

    def on_test_epoch_end(self) -> None:
        figures = self.metrics.compute()
        declared = self.converter.payload()
        self.results = {"method": self.converter.name, "figures": figures, "calibration": self.calibration,
                        "payload_declared": {"kind": declared.kind, "max_units": declared.max_units,
                                             "values": declared.values, "bits": declared.bits},
                        "variants": {v: {"time_steps": int(s.time_steps), "latency": int(s.latency),
                                         "readout_steps": list(s.readout_steps)}
                                     for v, s in self.variants().items()}}
        # torchmetrics already reduced every figure across processes: log the same value everywhere
        self.log_dict(figures, sync_dist=False, rank_zero_only=True)
