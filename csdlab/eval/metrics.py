"""Everything measured about a converted network, for every converter: one ``nn.Module`` of
torchmetrics states (reduced across DDP ranks by torchmetrics), fed batch by batch.

Figures (fractions, never percent; ``{v}`` is a variant label such as ``D3`` or ``T16``, ``{t}``
a readout step):

================================  ============================================================
``samples``                        images scored
``ref/top1``                       the reference network (QANN for CSDformer, ANN otherwise)
``ann/top1``                       a float ANN scored alongside (when given)
``snn/{v}/top1``                   the SNN's final readout
``snn/{v}/top1_t{t}``              the readout after step t
``snn/{v}/agreement``              argmax equal to the reference's
``snn/{v}/logit_error[_t{t}]``     mean |SNN logit - reference logit|
``snn/{v}/max_logit_diff``         largest |SNN logit - reference logit|
``snn/{v}/firing_rate[/{site}]``   spikes per neuron per step (all sites / one site)
``energy/{v}/ratio[_t{t}]``        E_SNN / E_ANN, ops of steps 1..t (docs/methods.md §3); an
                                   event costs one AC per target whatever it carries (a graded
                                   spike or a burst counted once: the per-event rule)
``energy/{v}/ratio_spike[_t{t}]``  the same under the unit-spike rule: an event of k unit
                                   spikes costs k ACs per target (equal for binary spikes)
``energy/{v}/snn_macs``, ``_acs``  per image, whole simulation (``_acs_spike``: unit-spike rule)
``energy/ann_macs``                dense MACs of one ANN forward, per image
``payload/{v}/max_units``          the largest value one neuron sent in one step, in unit
                                   spikes (binary: 1; ECMT level k: 2^k; an STA burst: its size)
``payload/{v}/bits``               bits an event needs for the values seen at the worst site:
                                   ceil(log2(distinct values, silence included))
``payload/{v}/spikes_per_event``   unit spikes / events, all sites
``payload/{v}/max_units/{site}``   the largest value per site
``exit/{v}/top1``, ``/agreement``  with per-image early exit at the calibrated setting
``exit/{v}/mean_steps``            readout steps per image with early exit, mean
``exit/{v}/steps_t{t}``            share of images that exit after step t (the distribution)
``exit/{v}/energy_ratio``          E_SNN / E_ANN with early exit: each image charged the ops of
                                   the steps it ran, at its batch's mean ops per step (the
                                   counters count per batch, not per image; docs/early_exit.md)
``exit/{v}/{rule}/{f}_s{i}``       the curve: ``f`` = ``threshold``, ``top1``, ``agreement``,
                                   ``mean_steps``, ``energy_ratio`` at setting i of ``rule``
``exit/{v}/{rule}/first_step``     the earliest step ``rule``'s settings may exit at
================================  ============================================================

The ``exit/`` figures exist for variants given an exit grid (:mod:`csdlab.eval.exit`).

The payload figures are measured from what the sites sent (:class:`csdlab.eval.counters.PayloadCounter`),
never taken from the converter's declaration (:meth:`csdlab.eval.api.Converter.payload`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from csdlab.eval.api import SpikingModel
from csdlab.eval.counters import PAYLOAD_BINS, SimulationCounters, ann_macs, bits_of_values, energy_ratio
from csdlab.eval.exit import EXIT_RULES, ExitGrid

__all__ = ["VectorSum", "VectorMax", "ConversionMetrics", "check_finite"]


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


class VectorMax(Metric):
    """Element-wise maximum of fixed-size non-negative vectors, across ranks too (float64)."""

    full_state_update = False

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("peak", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, values: Tensor) -> None:
        torch.maximum(self.peak, values.detach().to(self.peak), out=self.peak)

    def compute(self) -> Tensor:
        return self.peak


def check_finite(x: Tensor, what: str = "input batch") -> None:
    """Refuse NaN / inf inputs: a neuron's ``v >= theta`` is False for NaN, so an SNN would turn
    them into silence and finite, wrong logits where the ANN gives NaN. One host read per batch (a
    ``meta`` tensor has no values to check: the device-cleanliness tests run on it)."""
    if x.device.type == "meta":
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"the {what} holds {bad} NaN/inf values: an SNN would silently read them as no "
                         "input; clean the data (check the dataset files and the normalisation)")


class ConversionMetrics(nn.Module):
    """Accumulates every figure of the module docstring over batches.

    Args:
        num_classes: classifier outputs.
        variants: the spiking variants by label (their readout steps and sites fix the metrics).
        with_ann: a float ANN is scored alongside the reference.
        exits: per variant label, the calibrated early-exit settings (variants with a per-step
            readout only; :class:`csdlab.eval.exit.EarlyExit`).
    """

    def __init__(self, num_classes: int, variants: Mapping[str, SpikingModel], with_ann: bool = False,
                 exits: Mapping[str, ExitGrid] | None = None) -> None:
        super().__init__()
        self.labels = list(variants)
        self.readout_steps = {v: list(s.readout_steps) for v, s in variants.items()}
        self.time_steps = {v: int(s.time_steps) for v, s in variants.items()}
        self.site_names = {v: list(s.sites()) for v, s in variants.items()}
        self.with_ann = with_ann

        def acc() -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes, average="micro")

        self.ref_top1 = acc()
        self.ann_top1 = acc() if with_ann else None
        self.top1 = nn.ModuleDict({v: nn.ModuleList(acc() for _ in self.readout_steps[v]) for v in self.labels})
        self.logit_error = nn.ModuleDict({v: nn.ModuleList(MeanMetric() for _ in self.readout_steps[v])
                                          for v in self.labels})
        self.agreement = nn.ModuleDict({v: MeanMetric() for v in self.labels})
        self.max_diff = nn.ModuleDict({v: MaxMetric() for v in self.labels})
        # per variant: events per site, then neuron-steps per site
        self.firing = nn.ModuleDict({v: VectorSum(2 * len(self.site_names[v])) for v in self.labels})
        # per variant: MACs per step, ACs per step (per event), ACs per step (per unit spike), summed over images
        self.ops = nn.ModuleDict({v: VectorSum(3 * self.time_steps[v]) for v in self.labels})
        # per variant: events and unit spikes per site; largest value per site; values seen per site
        self.payload = nn.ModuleDict({v: VectorSum(2 * len(self.site_names[v])) for v in self.labels})
        self.payload_max = nn.ModuleDict({v: VectorMax(len(self.site_names[v])) for v in self.labels})
        self.payload_seen = nn.ModuleDict({v: VectorMax(len(self.site_names[v]) * PAYLOAD_BINS) for v in self.labels})
        self.ann_ops = VectorSum(2)  # ANN MACs, images
        self.exits = dict(exits or {})
        unknown = set(self.exits) - set(self.labels)
        if unknown:
            raise ValueError(f"exit settings for unknown variants {sorted(unknown)}; the variants are {self.labels}")
        # per exited variant: (correct, agreeing, steps, MACs, ACs) x settings, summed over images;
        # then the exit row histogram of the chosen setting
        self.exit_sums = nn.ModuleDict({v: VectorSum(5 * len(g.rules)) for v, g in self.exits.items()})
        self.exit_hist = nn.ModuleDict({v: VectorSum(len(self.readout_steps[v])) for v in self.exits})
        self._ann_macs_per_image: float | None = None

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor, reference: nn.Module, snns: Mapping[str, SpikingModel],
               ann: nn.Module | None = None) -> None:
        """Score one batch: the reference, the optional ANN and every spiking variant."""
        check_finite(x)
        # full precision even inside an AMP loop: half-precision sums would break exact integer
        # products and the level boundaries an SNN must reproduce
        with torch.autocast(x.device.type, enabled=False):
            ref = reference(x)
            self.ref_top1.update(ref, y)
            if ann is not None and self.ann_top1 is not None:
                self.ann_top1.update(ann(x), y)
            if self._ann_macs_per_image is None:
                # dense MACs do not depend on the data: count once, on one image
                self._ann_macs_per_image = ann_macs(reference, x[:1])
            self.ann_ops.update(torch.tensor([self._ann_macs_per_image * len(x), float(len(x))], device=x.device))
            for v in self.labels:
                self._update_variant(v, snns[v], x, y, ref)

    def _update_variant(self, v: str, snn: SpikingModel, x: Tensor, y: Tensor, ref: Tensor) -> None:
        with SimulationCounters(snn, device=x.device) as counters:
            readout = snn(x)  # [len(readout_steps), B, K]
        if readout.shape[0] != len(self.readout_steps[v]):
            raise RuntimeError(f"variant {v} returned {readout.shape[0]} readouts, expected "
                               f"{len(self.readout_steps[v])} (its readout_steps)")
        for i, logits in enumerate(readout):
            self.top1[v][i].update(logits, y)
            self.logit_error[v][i].update((logits - ref).abs().mean(dim=1))
        final = readout[-1]
        self.agreement[v].update((final.argmax(-1) == ref.argmax(-1)).float())
        self.max_diff[v].update((final - ref).abs().max())
        self.firing[v].update(counters.firing.counts.flatten())
        ops = counters.ops
        per_step = ops.per_step
        self.ops[v].update(torch.cat([per_step.flatten(), ops.per_step_spike.to(per_step)]))
        self.payload[v].update(counters.payload.counts[:2].flatten())
        self.payload_max[v].update(counters.payload.counts[2])
        self.payload_seen[v].update(counters.payload.seen.flatten())
        if v in self.exits:
            self._update_exit(v, readout, y, ref, per_step)

    def _update_exit(self, v: str, readout: Tensor, y: Tensor, ref: Tensor, per_step: Tensor) -> None:
        grid = self.exits[v]
        idx = grid.indices(readout)  # [S, B]: the readout row each image exits at, per setting
        pred = readout.argmax(-1).gather(0, idx)  # [S, B]
        t = torch.tensor(self.readout_steps[v], device=readout.device)
        steps = t[idx]  # [S, B]
        # each image is charged the ops of steps 1..t_exit at this batch's mean ops per step
        cum = (per_step.to(readout.device, torch.float64) / len(y)).cumsum(1)  # [2, T]
        charged = cum[:, steps - 1]  # [2, S, B]
        sums = torch.stack([(pred == y.unsqueeze(0)).double().sum(1), (pred == ref.argmax(-1)).double().sum(1),
                            steps.double().sum(1), charged[0].sum(1), charged[1].sum(1)])  # [5, S]
        self.exit_sums[v].update(sums.flatten())
        self.exit_hist[v].update(torch.bincount(idx[grid.chosen], minlength=len(t)))

    def compute(self) -> dict[str, float]:
        """Every figure as a float (identical on every rank)."""
        ann_macs_total, images = self.ann_ops.compute().tolist()
        out: dict[str, float] = {"samples": images, "ref/top1": float(self.ref_top1.compute()),
                                 "energy/ann_macs": ann_macs_total / max(images, 1)}
        if self.ann_top1 is not None:
            out["ann/top1"] = float(self.ann_top1.compute())
        for v in self.labels:
            steps = self.readout_steps[v]
            for i, t in enumerate(steps):
                out[f"snn/{v}/top1_t{t}"] = float(self.top1[v][i].compute())
                out[f"snn/{v}/logit_error_t{t}"] = float(self.logit_error[v][i].compute())
            out[f"snn/{v}/top1"] = out[f"snn/{v}/top1_t{steps[-1]}"]
            out[f"snn/{v}/logit_error"] = out[f"snn/{v}/logit_error_t{steps[-1]}"]
            out[f"snn/{v}/agreement"] = float(self.agreement[v].compute())
            out[f"snn/{v}/max_logit_diff"] = float(self.max_diff[v].compute())
            counts = self.firing[v].compute().view(2, -1)
            out[f"snn/{v}/firing_rate"] = float(counts[0].sum() / counts[1].sum().clamp(min=1))
            for name, (events, n) in zip(self.site_names[v], counts.T.tolist(), strict=True):
                out[f"snn/{v}/firing_rate/{name}"] = events / max(n, 1)
            macs, acs, acs_spike = self.ops[v].compute().view(3, -1)
            for suffix, ac in (("", acs), ("_spike", acs_spike)):
                energy = energy_ratio(macs, ac, max(ann_macs_total, 1e-30)).cumsum(0)
                for t in steps:
                    out[f"energy/{v}/ratio{suffix}_t{t}"] = float(energy[t - 1])
                out[f"energy/{v}/ratio{suffix}"] = float(energy[-1])
                out[f"energy/{v}/snn_acs{suffix}"] = float(ac.sum()) / max(images, 1)
            out[f"energy/{v}/snn_macs"] = float(macs.sum()) / max(images, 1)
            out.update(self._payload(v))
            if v in self.exits:
                out.update(self._exit_figures(v, images, max(ann_macs_total, 1e-30)))
        return out

    def _exit_figures(self, v: str, images: float, ann_macs_total: float) -> dict[str, float]:
        grid = self.exits[v]
        correct, agree, steps, macs, acs = self.exit_sums[v].compute().view(5, -1)
        n = max(images, 1)
        energy = energy_ratio(macs, acs, ann_macs_total)
        curve = {"top1": correct / n, "agreement": agree / n, "mean_steps": steps / n, "energy_ratio": energy}
        out: dict[str, float] = {}
        c = grid.chosen
        for f, values in curve.items():
            out[f"exit/{v}/{f}"] = float(values[c])
        hist = self.exit_hist[v].compute() / n
        for t, share in zip(self.readout_steps[v], hist.tolist(), strict=True):
            out[f"exit/{v}/steps_t{t}"] = share
        for rule in EXIT_RULES:
            if grid.settings(rule):
                out[f"exit/{v}/{rule}/first_step"] = float(self.readout_steps[v][grid.min_rows[grid.settings(rule)[0]]])
            for i, s in enumerate(grid.settings(rule)):
                out[f"exit/{v}/{rule}/threshold_s{i}"] = float(grid.thresholds[s])
                for f, values in curve.items():
                    out[f"exit/{v}/{rule}/{f}_s{i}"] = float(values[s])
        return out

    def _payload(self, v: str) -> dict[str, float]:
        events, spikes = self.payload[v].compute().view(2, -1)
        peak = self.payload_max[v].compute().reshape(-1)
        seen = self.payload_seen[v].compute().view(len(self.site_names[v]), PAYLOAD_BINS)
        out = {f"payload/{v}/max_units": float(peak.max()) if peak.numel() else 0.0,
               f"payload/{v}/bits": float(max((bits_of_values(s) for s in seen), default=1)),
               f"payload/{v}/spikes_per_event": float(spikes.sum() / events.sum().clamp(min=1))}
        for name, k in zip(self.site_names[v], peak.tolist(), strict=True):
            out[f"payload/{v}/max_units/{name}"] = k
        return out
