"""QANN-vs-SNN evaluation with torchmetrics (reduced across DDP ranks), and a LightningModule that
runs it through ``Trainer.validate`` / ``Trainer.test`` for ``convert.py csdformer``.

Figures (fractions, not percent), for every delay D:

* ``snn/top1_D{D}``, ``snn/agreement_D{D}`` (argmax equal to the QANN's), ``snn/max_logit_diff_D{D}``;
* ``snn/top1_D{D}_t{t}``: accuracy of the readout averaged over output slots 1..t;
* ``snn/firing_rate_D{D}`` and ``snn/firing_rate_D{D}/{layer}``: spikes per neuron per time step;
* ``energy/ratio_D{D}`` (METHODS 3) with ``energy/{snn_macs,snn_acs}_D{D}`` and ``energy/ann_macs``
  per sample;
* ``qann/top1`` and, when a float model is given, ``ann/top1``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import MaxMetric, MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from csdlab.convert.csdformer import SpikingCSDformer, convert_csdformer
from csdlab.energy import LayerOps, OpCounter, ann_macs, energy_ratio
from csdlab.snn.neurons import DelayedIFNode

__all__ = ["VectorSum", "ConversionEvaluator", "SNNEvalModule", "neuron_layers"]

log = logging.getLogger(__name__)


class VectorSum(Metric):
    """Element-wise sum of fixed-size vectors, summed across ranks (float64 counters)."""

    full_state_update = False

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        self.total += values.detach().to(self.total)

    def compute(self) -> Tensor:
        return self.total


def neuron_layers(snn: nn.Module) -> list[tuple[str, DelayedIFNode]]:
    """The SNN's neurons with readable names (``blocks.0.attn.act_q``; wrappers stripped)."""
    return [(name.removeprefix("model.").replace(".module", ""), m)
            for name, m in snn.named_modules() if isinstance(m, DelayedIFNode)]


class ConversionEvaluator(nn.Module):
    """Accumulates the QANN-vs-SNN figures over batches; ``compute()`` gives rank-reduced floats.

    Args:
        num_classes: classifier outputs.
        delays: the SNNs' delays D, one SNN each.
        time_steps: T of the SNNs.
        layer_names: neuron layer names (see :func:`neuron_layers`), for the firing rates.
        with_ann: also score a float ANN.
    """

    def __init__(self, num_classes: int, delays: Sequence[int], time_steps: int, layer_names: Sequence[str],
                 with_ann: bool = False) -> None:
        super().__init__()
        self.delays = list(delays)
        self.time_steps = time_steps
        self.layer_names = list(layer_names)
        self.with_ann = with_ann
        keys = ["qann", *(["ann"] if with_ann else []), *(f"D{d}" for d in self.delays)]
        self.top1 = nn.ModuleDict({k: MulticlassAccuracy(num_classes, average="micro") for k in keys})
        self.agreement = nn.ModuleDict({f"D{d}": MeanMetric() for d in self.delays})
        self.max_diff = nn.ModuleDict({f"D{d}": MaxMetric() for d in self.delays})
        # per D: correct predictions of the readout after slots 1..T, then the sample count
        self.slot_correct = nn.ModuleDict({f"D{d}": VectorSum(time_steps + 1) for d in self.delays})
        # per D: spikes per layer, then neuron-steps per layer
        self.spikes = nn.ModuleDict({f"D{d}": VectorSum(2 * len(self.layer_names)) for d in self.delays})
        # per D: SNN MACs, SNN ACs, ANN MACs (whole batches)
        self.ops = nn.ModuleDict({f"D{d}": VectorSum(3) for d in self.delays})
        self._ann_macs_per_sample: float | None = None

    def _run_snn(self, snn: SpikingCSDformer, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-slot readout ``[T, B, K]``, spikes and neuron-steps per layer, (MACs, ACs)."""
        layers = [m for _, m in neuron_layers(snn)]
        counts = torch.zeros(2, len(layers), dtype=torch.float64)

        def record(i: int) -> Any:
            def hook(mod: nn.Module, inputs: tuple[Any, ...], out: Tensor) -> None:
                counts[0, i] += float(out.sum())
                counts[1, i] += out.numel()
            return hook

        handles = [m.register_forward_hook(record(i)) for i, m in enumerate(layers)]
        try:
            with OpCounter(snn, analog=[snn.first_conv, snn.head]) as counter:
                slots = snn(x, per_slot=True)
        finally:
            for h in handles:
                h.remove()
        total = counter.total
        return slots, counts.flatten(), torch.tensor([total.macs, total.acs])

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor, qann: nn.Module, snns: dict[int, SpikingCSDformer],
               ann: nn.Module | None = None) -> None:
        """Score one batch. ``snns`` maps each delay D to its SNN."""
        # full precision even inside an AMP loop: half-precision sums would break the exact
        # integer TDEC products and the level boundaries the SNN must reproduce
        with torch.autocast(x.device.type, enabled=False):
            self._update(x, y, qann, snns, ann)

    def _update(self, x: Tensor, y: Tensor, qann: nn.Module, snns: dict[int, SpikingCSDformer],
                ann: nn.Module | None) -> None:
        ref = qann(x)
        self.top1["qann"].update(ref, y)
        if ann is not None:
            self.top1["ann"].update(ann(x), y)
        if self._ann_macs_per_sample is None:
            # dense MACs do not depend on the data: count once, on one sample
            self._ann_macs_per_sample = ann_macs(qann, x[:1])
        n = x.shape[0]
        for d in self.delays:
            key = f"D{d}"
            slots, spikes, ops = self._run_snn(snns[d], x)
            logits = slots[-1]
            self.top1[key].update(logits, y)
            self.agreement[key].update((logits.argmax(-1) == ref.argmax(-1)).float())
            self.max_diff[key].update((logits - ref).abs().max())
            correct = (slots.argmax(-1) == y).sum(-1).double()  # [T]
            self.slot_correct[key].update(torch.cat([correct.cpu(), torch.tensor([float(n)])]))
            self.spikes[key].update(spikes)
            self.ops[key].update(torch.cat([ops.double(), torch.tensor([self._ann_macs_per_sample * n])]))

    def reset(self) -> None:
        for m in self.modules():
            if isinstance(m, Metric):
                m.reset()

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {"qann/top1": float(self.top1["qann"].compute())}
        if self.with_ann:
            out["ann/top1"] = float(self.top1["ann"].compute())
        n_layers = len(self.layer_names)
        for d in self.delays:
            key = f"D{d}"
            out[f"snn/top1_{key}"] = float(self.top1[key].compute())
            out[f"snn/agreement_{key}"] = float(self.agreement[key].compute())
            out[f"snn/max_logit_diff_{key}"] = float(self.max_diff[key].compute())
            slot = self.slot_correct[key].compute()
            for t in range(self.time_steps):
                out[f"snn/top1_{key}_t{t + 1}"] = float(slot[t] / slot[-1])
            counts = self.spikes[key].compute().view(2, n_layers)
            out[f"snn/firing_rate_{key}"] = float(counts[0].sum() / counts[1].sum())
            for name, rate in zip(self.layer_names, (counts[0] / counts[1]).tolist(), strict=True):
                out[f"snn/firing_rate_{key}/{name}"] = rate
            macs, acs, ann = self.ops[key].compute().tolist()
            samples = float(slot[-1])
            out[f"energy/ratio_{key}"] = energy_ratio(LayerOps(macs, acs), ann)
            out[f"energy/snn_macs_{key}"] = macs / samples
            out[f"energy/snn_acs_{key}"] = acs / samples
            out["energy/ann_macs"] = ann / samples
        return out


class SNNEvalModule(L.LightningModule):
    """Evaluates a QANN, its SNNs (one per delay) and optionally the float ANN in
    ``Trainer.validate`` / ``Trainer.test``; every rank sees its own shard, metrics are reduced.

    The loaders come from ``datamodule`` and are re-sharded without repeats (Lightning's default
    sampler pads ranks with repeated samples, which would make 2 processes score more samples than
    one): build the ``Trainer`` with ``use_distributed_sampler=False``.

    Args:
        qann: the quantized CSDformer.
        delays: the SNN delays to evaluate.
        datamodule: provides ``val_dataloader`` / ``test_dataloader``.
        time_steps: T (default L).
        ann: optional float model scored alongside.
        config: timm name / kwargs of the QANN, stored in the SNNs for saving.
    """

    def __init__(self, qann: nn.Module, delays: Sequence[int], datamodule: L.LightningDataModule | None = None,
                 time_steps: int | None = None, ann: nn.Module | None = None,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.qann = qann.eval()
        self.ann = ann.eval() if ann is not None else None
        self.delays = sorted(set(int(d) for d in delays))
        snns = {d: convert_csdformer(qann, time_steps, d, config=config) for d in self.delays}
        self.snns = nn.ModuleDict({f"D{d}": s for d, s in snns.items()})
        first = snns[self.delays[0]]
        self.evaluator = ConversionEvaluator(qann.num_classes, self.delays, first.time_steps,
                                             [n for n, _ in neuron_layers(first)], with_ann=ann is not None)
        self.dm = datamodule
        self.results: dict[str, float] = {}

    def snn(self, delay: int) -> SpikingCSDformer:
        return self.snns[f"D{delay}"]

    def _step(self, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        x = x.to(next(self.qann.parameters()).dtype)
        self.evaluator.update(x, y, self.qann, {d: self.snn(d) for d in self.delays}, self.ann)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch)

    def _epoch_end(self, stage: str) -> None:
        self.results = self.evaluator.compute()
        self.evaluator.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in self.results.items()}, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def _unrepeated(self, loader: DataLoader) -> DataLoader:
        sampler = None
        if self.trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(loader.dataset, num_replicas=self.trainer.world_size,
                                                   rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                          num_workers=loader.num_workers, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._unrepeated(self.dm.val_dataloader())

    def test_dataloader(self) -> DataLoader:
        return self._unrepeated(self.dm.test_dataloader())
