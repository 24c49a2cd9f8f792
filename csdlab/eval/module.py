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
from csdlab.eval.exit import EarlyExit, ExitGrid
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
        early_exit: per-image early exit (docs/early_exit.md): the rule the calibration may choose,
            ``auto`` (any), ``stable``, ``margin`` or ``confidence``; None: every image runs all
            steps. Needs a readout after every step (ECMT, CSDformer); calibrated on the held-out
            training images of ``ConversionData.exit_images``.
        exit_tolerance: the accuracy loss against the reference (a fraction) the calibrated exit
            setting may have on the calibration images.
        exit_grid: thresholds per score rule (margin, confidence) in the exit curve.
    """

    def __init__(self, converter: Converter, checkpoint: str | None = None, model_name: str | None = None,
                 pretrained: bool = False, model_kwargs: dict[str, Any] | None = None,
                 ann_checkpoint: str | None = None, float64: bool = False, early_exit: str | None = None,
                 exit_tolerance: float = 0.001, exit_grid: int = 40) -> None:
        super().__init__()
        self.converter = converter
        # checked here, before the model is read: a bad option fails at once
        self.early_exit = None if early_exit is None else EarlyExit(early_exit, exit_tolerance, exit_grid)
        self.exits: dict[str, ExitGrid] = {}
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

    def _gather(self, x: Tensor) -> Tensor:
        """``x`` of every process concatenated along dim 0 in rank order (through sums of
        zero-padded buffers: exact, and needs only the all-reduce every strategy has)."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world == 1:
            return x
        sizes = torch.zeros(world, dtype=torch.long, device=self.device)
        sizes[rank] = len(x)
        sizes = self._all_reduce(sizes)
        buf = torch.zeros(int(sizes.sum()), *x.shape[1:], dtype=x.dtype, device=self.device)
        start = int(sizes[:rank].sum())
        buf[start:start + len(x)] = x
        return self._all_reduce(buf)

    def _calibrate(self) -> None:
        dm = self.trainer.datamodule
        if not hasattr(dm, "calibration_batches"):
            raise ValueError(f"{self.converter.name} calibrates on training images: use csdlab.eval.ConversionData")
        batches = (x.to(self.device, self._ref_dtype()) for x in dm.calibration_batches())
        batches = self.progress.batches(batches, f"{self.converter.name} calibration", dm.calib_batches)
        with torch.no_grad():
            self.calibration = self.converter.calibrate(self.reference, batches, self._all_reduce)
        log.info("%s: calibrated on %d batches", self.converter.name, dm.calib_batches)

    def _calibrate_exit(self) -> None:
        variants = self.variants()
        per_step = {v: s for v, s in variants.items() if len(s.readout_steps) > 1}
        if not per_step:
            raise ValueError(f"early exit needs a readout after every step, but the {self.converter.name} variants "
                             f"({', '.join(variants)}) read out only after their last step: drop "
                             "--model.early_exit (it works with ECMT and CSDformer)")
        for v in set(variants) - set(per_step):
            log.warning("early exit: variant %s has a single readout, it runs all its steps", v)
        dm = self.trainer.datamodule
        if not hasattr(dm, "exit_batches"):
            raise ValueError("early exit calibrates on held-out training images: use csdlab.eval.ConversionData")
        readouts: dict[str, list[Tensor]] = {v: [] for v in per_step}
        refs: list[Tensor] = []
        labels: list[Tensor] = []
        batches = self.progress.batches(dm.exit_batches(), "early-exit calibration", dm.exit_batch_count())
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            for x, y in batches:
                x = x.to(self.device, self._ref_dtype())
                refs.append(self.reference(x))
                labels.append(y.to(self.device))
                for v, snn in per_step.items():
                    readouts[v].append(snn(x))
        self.exits = {v: self.early_exit.calibrate(readouts[v], refs, labels, snn.readout_steps, self._gather)
                      for v, snn in per_step.items()}

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
        if self.early_exit is not None:
            self._calibrate_exit()
        self.progress.batches_total = int(sum(self.trainer.num_test_batches))
        self.progress.watch(self.snns)
        self.metrics = ConversionMetrics(self.num_classes, self.variants(), with_ann=self.ann is not None,
                                         exits=self.exits)
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
        if self.exits:
            self.results["early_exit"] = {v: g.to_json() for v, g in self.exits.items()}
        # torchmetrics already reduced every figure across processes: log the same value everywhere
        self.log_dict(figures, sync_dist=False, rank_zero_only=True)
