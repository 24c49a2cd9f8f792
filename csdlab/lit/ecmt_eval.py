"""ECMT calibration and evaluation as Lightning ``validate`` / ``test`` runs (any devices, DDP).

* ``trainer.validate(module, datamodule=ECMTData(...))`` calibrates: every rank runs the float
  network on its share of the calibration batches (whole batches, so the batch-tensor percentiles
  of METHODS 2.2 do not depend on the world size), the per-site percentile sums are all-reduced,
  and every rank sets the same thresholds.
* ``trainer.test(...)`` evaluates: ANN accuracy; SNN accuracy, logit error and energy ratio at
  every ``t = 1..T``; firing rate per MT site and per level. Sums are all-reduced; accuracies are
  torchmetrics metrics (one per ``t``), synchronised by torchmetrics.

The samples are split between ranks without padding (``use_distributed_sampler=False`` with the
sharding done here), so 1 and N processes see the same samples and give the same figures.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from csdlab.convert.vit import (analog_layers, convert_vit, finalize_thresholds, mt_sites, observe_sites,
                                simulate, site_overrides)
from csdlab.energy import E_AC_PJ, E_MAC_PJ, OpCounter
from csdlab.lit.data import ImageDataModule

__all__ = ["ECMTData", "ECMTEvaluation"]

log = logging.getLogger(__name__)


class _Batches(Dataset):
    """A list of ready batches as a map-style dataset."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.batches[i]


class ECMTData(L.LightningDataModule):
    """Calibration batches (validate) and the test set (test), sharded by rank without padding.

    Args:
        data: the csdlab data module (``calibration_dataloader`` = training images, eval transforms).
        calib_batches: number of calibration batches (shared between ranks, batch by batch).
        split: evaluation split, ``test`` or ``val``.
        limit: evaluate only the first ``limit`` samples of the split (None: all).
    """

    def __init__(self, data: ImageDataModule, calib_batches: int = 8, split: str = "test",
                 limit: int | None = None) -> None:
        super().__init__()
        if calib_batches < 1:
            raise ValueError(f"calib_batches must be >= 1, got {calib_batches}")
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        self.data, self.calib_batches, self.split, self.limit = data, calib_batches, split, limit

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.data.setup()

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        if self.calib_batches < world:
            raise ValueError(f"calib_batches ({self.calib_batches}) must be >= the number of processes ({world})")
        batches = []
        for i, batch in enumerate(self.data.calibration_dataloader()):
            if i >= self.calib_batches:
                break
            if i % world == rank:
                batches.append(batch)
        if len(batches) * world < self.calib_batches and rank == 0:
            log.warning("only %d calibration batches available", len(batches) * world)
        # whole, already collated batches: batch_size=None stops the loader from batching again
        return DataLoader(_Batches(batches), batch_size=None, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        ds = self.data.test_set if self.split == "test" else self.data.val_set
        n = len(ds) if self.limit is None else min(self.limit, len(ds))
        hp = self.data.hparams
        return DataLoader(Subset(ds, range(rank, n, world)), batch_size=hp.batch_size, shuffle=False,
                          num_workers=hp.num_workers)


class ECMTEvaluation(L.LightningModule):
    """Calibrates (validate) and evaluates (test) the ECMT SNN of a timm ViT against the ANN.

    Args:
        model: the float timm ``VisionTransformer`` (kept as ``self.ann``).
        num_classes: classes of the evaluation data.
        T: time steps simulated; figures are reported at every ``t = 1..T``.
        levels: MT levels per sign n.
        percentile: p of the percentile thresholds (METHODS 2.2).
        softmax_threshold: fixed post-softmax thresholds (None: percentile).
        gelu_thresholds: fixed post-GELU ``(th1, th2)`` (None: percentile).
    """

    def __init__(self, model: nn.Module, num_classes: int, T: int = 8, levels: int = 8, percentile: float = 99.0,
                 softmax_threshold: float | None = 0.0125,
                 gelu_thresholds: tuple[float, float] | None = None) -> None:
        super().__init__()
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.save_hyperparameters(ignore=["model"])
        self.ann = model.eval().requires_grad_(False)
        self.snn = convert_vit(self.ann, levels=levels).requires_grad_(False)
        self.sites = list(mt_sites(self.snn))
        self.register_buffer("calib_sum", torch.zeros(len(self.sites), 2, dtype=torch.float64))
        self.register_buffer("calib_count", torch.zeros((), dtype=torch.float64))
        # per t: cumulative SNN MACs, SNN ACs; then ANN MACs and samples (all summed over batches)
        self.register_buffer("snn_ops", torch.zeros(T, 2, dtype=torch.float64))
        self.register_buffer("ann_ops", torch.zeros(2, dtype=torch.float64))
        self.ann_acc = MulticlassAccuracy(num_classes, average="micro")
        self.snn_acc = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in range(T))
        self.logit_err = nn.ModuleList(MeanMetric() for _ in range(T))
        self.thresholds: dict[str, tuple[float, float]] = {}
        self.results: dict[str, Any] = {}

    # -- calibration -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.calib_sum.zero_()
        self.calib_count.zero_()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        with observe_sites(self.snn, self.hparams.percentile) as stats:
            self.snn(batch[0])  # one step with identity sites = the float ANN (EC is exact at t = 1)
        self.calib_sum += torch.stack([stats[s][0] for s in self.sites]).to(self.calib_sum)
        self.calib_count += 1

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(torch.cat([self.calib_sum.flatten(), self.calib_count.view(1)]),
                                             reduce_op="sum")
        count = float(total[-1])
        if count == 0:
            raise ValueError("calibration saw no batches")
        mean = (total[:-1].view(-1, 2) / count).tolist()
        hp = self.hparams
        self.thresholds = finalize_thresholds(
            self.snn, {s: tuple(v) for s, v in zip(self.sites, mean)},
            site_overrides(self.snn, hp.softmax_threshold, hp.gelu_thresholds))
        log.info("calibrated %d MT sites on %d batches (p=%g)", len(self.thresholds), int(count), hp.percentile)

    # -- evaluation ------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        if not self.thresholds:
            raise RuntimeError("run trainer.validate (calibration) before trainer.test")
        self.snn_ops.zero_()
        self.ann_ops.zero_()
        for m in mt_sites(self.snn).values():
            m.clear_counts()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        with FlopCounterMode(display=False) as fc:
            ann_logits = self.ann(x)
        self.ann_acc.update(ann_logits, y)
        self.ann_ops += torch.tensor([fc.get_total_flops() / 2, len(y)], dtype=torch.float64,
                                     device=self.ann_ops.device)
        per_t = torch.zeros_like(self.snn_ops)
        with OpCounter(self.snn, analog=analog_layers(self.snn)) as counter:
            def read(t: int) -> None:
                total = counter.total
                per_t[t - 1, 0], per_t[t - 1, 1] = total.macs, total.acs

            readout = simulate(self.snn, x, self.hparams.T, step_hook=read)  # [T, B, classes]
        self.snn_ops += per_t
        for t in range(self.hparams.T):
            self.snn_acc[t].update(readout[t], y)
            self.logit_err[t].update((readout[t] - ann_logits).abs().mean(dim=1))

    def on_test_epoch_end(self) -> None:
        reduce = self.trainer.strategy.reduce
        snn_ops, ann_ops = reduce(self.snn_ops.clone(), reduce_op="sum"), reduce(self.ann_ops.clone(), reduce_op="sum")
        sites = mt_sites(self.snn)
        counts = reduce(torch.stack([m.spike_counts for m in sites.values()]).double(), reduce_op="sum")
        steps = reduce(torch.stack([m.neuron_steps for m in sites.values()]).double(), reduce_op="sum")
        ann_energy = ann_ops[0] * E_MAC_PJ
        energy = (snn_ops[:, 0] * E_MAC_PJ + snn_ops[:, 1] * E_AC_PJ) / ann_energy
        level_rates = counts / steps.clamp(min=1).unsqueeze(1)  # spikes per neuron per step, per level
        T = self.hparams.T
        acc = [float(m.compute()) * 100 for m in self.snn_acc]
        err = [float(m.compute()) for m in self.logit_err]
        metrics = {"ann/acc": float(self.ann_acc.compute()) * 100}
        for t in range(T):
            metrics[f"snn/acc_t{t + 1}"] = acc[t]
            metrics[f"snn/energy_ratio_t{t + 1}"] = float(energy[t])
            metrics[f"snn/logit_err_t{t + 1}"] = err[t]
        for name, rate in zip(sites, level_rates.sum(1).tolist()):
            metrics[f"firing/{name}"] = rate
        self.log_dict(metrics, rank_zero_only=True)
        n = self.hparams.levels
        self.results = {
            "samples": int(ann_ops[1]), "ann_acc": metrics["ann/acc"], "snn_acc": acc, "logit_error": err,
            "energy_ratio": energy.tolist(), "ann_macs_per_sample": float(ann_ops[0] / ann_ops[1]),
            "thresholds": {s: list(v) for s, v in self.thresholds.items()},
            "firing_rate": {s: r for s, r in zip(sites, level_rates.sum(1).tolist())},
            "firing_rate_per_level": {
                s: {"levels": [f"+{2 ** k}" for k in range(n)] + [f"-{2 ** k}" for k in range(n)], "rate": r}
                for s, r in zip(sites, level_rates.tolist())},
        }
