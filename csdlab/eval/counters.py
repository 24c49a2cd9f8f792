"""What a simulation is counted by: spikes per neuron site and operations per step, and the one
energy formula (docs/methods.md §3), the field's 45 nm convention:

``E_SNN / E_ANN = (MACs_SNN * E_MAC + ACs_SNN * E_AC) / (MACs_ANN * E_MAC)``.

* A Conv2d / Linear fed by analog values (the image, the head's readout) costs its dense MACs.
* A Conv2d / Linear fed by events costs one AC per (non-zero input event) x (its actual fan-out):
  for a Linear every event reaches ``out_features`` outputs; for a convolution an event reaches
  only the output positions whose window covers it (:func:`csdlab.snn.counting.synaptic_events`;
  SpikingJelly 2.0's ``op_counter`` counts spiking convolutions the same way, a test checks it).
* Any other module counts itself by defining ``count_ops(inputs, output) -> (macs, acs)`` (the
  TDEC spike products, the ECMT matrix-product EC, the MBE products, ...); the counter does not
  descend into it.
* A module with parameters of its own that is none of these must be declared by the spiking model
  (:meth:`csdlab.eval.api.SpikingModel.uncounted_modules`, with the reason): the counter raises,
  naming it, instead of leaving its work out silently.

Two counting rules for events that carry more than one spike (a graded spike, a burst): per
event (one AC per event and target, whatever it carries: ``per_step``) and per unit spike (an event
of ``k`` unit spikes costs ``k`` ACs per target: ``per_step_spike``). Both come out of the same
simulation: the payload counter (:class:`PayloadCounter`) records each graded site's unit spikes
per row (:func:`csdlab.snn.counting.record_units_rows`) and the op counter charges the layers it
feeds from that record; a module counting itself may define ``count_spike_acs(inputs, output)``,
its ACs per unit spike (otherwise its ACs count under both rules: binary operands). For binary spikes the rules agree.

The counters hang on the same hook mechanism (:class:`HookCounter`) and are entered together by
:class:`SimulationCounters`, which the evaluation and the benchmarks use alike. Counts stay on the
model's device (no host synchronisation inside a simulation).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from csdlab.eval.api import EventCounting, OpCounting, PayloadSource, SpikeTrainSource
from csdlab.snn.counting import bincount_below, counting_cache, record_units_rows, synaptic_events, units_per_row

__all__ = ["E_MAC_PJ", "E_AC_PJ", "energy_ratio", "HookCounter", "FiringCounter", "OpCounter", "PayloadCounter",
           "SimulationCounters", "dense_macs", "ann_macs", "PAYLOAD_EXACT", "PAYLOAD_BINS", "value_bins",
           "bits_of_values"]

E_MAC_PJ = 4.6  # pJ per 32-bit multiply-accumulate (45 nm)
E_AC_PJ = 0.9  # pJ per 32-bit accumulate (45 nm)


def energy_ratio(macs: Tensor | float, acs: Tensor | float, ann_mac_count: float) -> Tensor | float:
    """``(MACs_SNN E_MAC + ACs_SNN E_AC) / (MACs_ANN E_MAC)`` for the same images (element-wise on
    per-step tensors)."""
    if not ann_mac_count > 0:
        raise ValueError(f"the ANN's MAC count must be > 0, got {ann_mac_count}")
    return (macs * E_MAC_PJ + acs * E_AC_PJ) / (ann_mac_count * E_MAC_PJ)


def dense_macs(module: nn.Module, output: Tensor) -> float:
    """MACs of one dense call of a Conv2d or Linear that produced ``output``."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return float(output.numel() * (module.in_channels // module.groups) * kh * kw)
    if isinstance(module, nn.Linear):
        return float(output.numel() * module.in_features)
    raise TypeError(f"dense_macs takes nn.Conv2d or nn.Linear, got {type(module).__name__}")


class HookCounter:
    """Forward hooks on a fixed list of modules while entered; subclasses say what one call adds."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def targets(self) -> list[tuple[str, nn.Module]]:
        """The watched ``(name, module)`` pairs, in a fixed order."""
        raise NotImplementedError

    def count(self, index: int, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        """Add one call of target ``index``."""
        raise NotImplementedError

    def __enter__(self) -> HookCounter:
        for i, (name, mod) in enumerate(self.targets()):
            self._handles.append(mod.register_forward_hook(
                lambda m, inp, out, i=i, name=name: self.count(i, name, m, inp, out)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class FiringCounter(HookCounter):
    """Events and neuron-steps of each neuron site: ``counts[0]`` events, ``counts[1]`` neuron-steps.

    Every site counts itself (``count_events(inputs, output) -> (events, neuron_steps)``): binary,
    graded and multi-basis neurons define what one event is; a site that does not raises.
    """

    def __init__(self, sites: Mapping[str, nn.Module], device: torch.device | str | None = None) -> None:
        super().__init__()
        missing = [n for n, m in sites.items() if not isinstance(m, EventCounting)]
        if missing:
            raise TypeError(f"neuron sites without count_events(inputs, output): {missing[:5]}; a site must say "
                            "what one event is (see csdlab.eval.api.SpikingModel.sites)")
        self.sites = dict(sites)
        if device is None:  # the sites' own device (their first parameter or buffer), else the CPU
            tensors = (t for m in self.sites.values() for t in itertools.chain(m.parameters(), m.buffers()))
            device = next((t.device for t in tensors), torch.device("cpu"))
        self.counts = torch.zeros(2, len(self.sites), dtype=torch.float64, device=device)

    def targets(self) -> list[tuple[str, nn.Module]]:
        return list(self.sites.items())

    def count(self, index: int, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        events, steps = module.count_events(inputs, output)
        self.counts[0, index] += events
        self.counts[1, index] += steps


#: unit-spike values ``-PAYLOAD_EXACT .. PAYLOAD_EXACT`` are told apart one by one; larger ones by
#: their octave ``floor(log2 |u|)`` and sign (exact for ECMT's power-of-two levels; a burst above
#: 1023 spikes would undercount its distinct values)
PAYLOAD_EXACT = 1023
_OCTAVES = 128
PAYLOAD_BINS = 2 * PAYLOAD_EXACT + 1 + 2 * _OCTAVES


def value_bins(units: Tensor) -> Tensor:
    """``[PAYLOAD_BINS]`` float64: 1 where a value of the integer-valued ``units`` occurs, else 0
    (bin ``u + PAYLOAD_EXACT`` for ``|u| <= PAYLOAD_EXACT``; beyond, one bin per octave and sign)."""
    u = units.detach().flatten()
    if u.numel() == 0:
        return torch.zeros(PAYLOAD_BINS, dtype=torch.float64, device=u.device)
    if u.device.type == "cpu" and u.numel() <= 1 << 16:
        # small CPU inputs (MBE's train values) are per-call overhead: one bin per value when all
        # lie in the exact range (the same bins), a third of the operations
        low, high = torch.aminmax(u)
        if -PAYLOAD_EXACT <= float(low) and float(high) <= PAYLOAD_EXACT:
            return (torch.bincount((u + PAYLOAD_EXACT).long(), minlength=PAYLOAD_BINS) > 0).to(torch.float64)
    mag = u.abs()
    octave = torch.log2(mag.clamp(min=1)).floor_().clamp_(max=_OCTAVES - 1)
    idx = torch.where(mag <= PAYLOAD_EXACT, u + PAYLOAD_EXACT, 2 * PAYLOAD_EXACT + 1 + 2 * octave + (u < 0).to(u.dtype))
    return (bincount_below(idx.long(), PAYLOAD_BINS) > 0).to(torch.float64)


def bits_of_values(seen: Tensor) -> int:
    """Bits one event needs to tell apart the values marked in ``seen`` (:func:`value_bins`,
    silence counted as a value even if never seen): ``ceil(log2(distinct))``, at least 1."""
    distinct = int((seen > 0).sum()) + int(not bool(seen[PAYLOAD_EXACT] > 0))
    return max(1, math.ceil(math.log2(max(distinct, 2))))


class PayloadCounter(HookCounter):
    """The payload each neuron site actually sent: its events, its unit spikes, the largest value one
    neuron sent in one step (in unit spikes) and which values occurred (:func:`value_bins`).

    Measured from the sites' outputs, not from any declaration:

    * a :class:`~csdlab.eval.api.PayloadSource` says how many unit spikes each output entry is
      (``spike_units``): every entry is read, the events are its non-zero entries, the spikes their
      absolute sum, and the unit spikes per row are recorded for the op counter's unit-spike rule;
    * a :class:`~csdlab.eval.api.SpikeTrainSource` (MBE) is read through its trains, on the first
      row of each call (re-running the trains of every input would cost a second simulation): the
      largest entry and the values; its events and spikes are its ``count_events`` (binary trains).
      A site with ``train_values(x)`` (MBE's table neurons: the smallest and largest train entry of
      each element, recorded per interval when the table enumerated the trains) is read through
      those instead of rerunning its ``T`` steps;
      On the CPU only: off it the trains are taken as binary (the spike-driven check reruns them);
    * any other site must output unit counts itself (0 / 1): its largest |entry| is measured (a
      value above 1 shows up as a larger payload), its events are its ``count_events``.

    ``counts``: ``[3, sites]`` float64 (events, unit spikes, largest value); ``seen``:
    ``[sites, PAYLOAD_BINS]``.
    """

    def __init__(self, sites: Mapping[str, nn.Module], device: torch.device | str | None = None) -> None:
        super().__init__()
        self.sites = dict(sites)
        if device is None:
            tensors = (t for m in self.sites.values() for t in itertools.chain(m.parameters(), m.buffers()))
            device = next((t.device for t in tensors), torch.device("cpu"))
        self.counts = torch.zeros(3, len(self.sites), dtype=torch.float64, device=device)
        self.seen = torch.zeros(len(self.sites), PAYLOAD_BINS, dtype=torch.float64, device=device)
        self._kinds: dict[int, str] = {}  # id(site) -> how it is read (its classes do not change)

    def targets(self) -> list[tuple[str, nn.Module]]:
        return list(self.sites.items())

    def count(self, index: int, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not isinstance(output, Tensor):
            return
        kind = self._kinds.get(id(module))
        if kind is None:  # a runtime Protocol check costs tens of microseconds: once per site
            kind = self._kinds[id(module)] = ("units" if isinstance(module, PayloadSource) else
                                              "trains" if isinstance(module, SpikeTrainSource) else "output")
        if kind == "units":
            units = module.spike_units(inputs, output).detach()
            if units.shape != output.shape:
                raise ValueError(f"site {name}: spike_units returned shape {tuple(units.shape)} for an output of "
                                 f"shape {tuple(output.shape)}; return one unit count per output entry")
            mag = units.abs()
            rows = mag.reshape(mag.shape[0], -1).sum(1, dtype=torch.float64) if mag.dim() else mag.double().view(1)
            record_units_rows(output, rows)
            events = torch.count_nonzero(units).to(torch.float64)
            spikes, largest = rows.sum(), mag.max().to(torch.float64)
            seen = value_bins(units)
        elif kind == "trains":
            x = inputs[0]
            events = spikes = torch.as_tensor(module.count_events(inputs, output)[0], dtype=torch.float64)
            if x.device.type == "cpu":
                # the values its trains hold (a neuron with an exact table reads them from it)
                reader = getattr(module, "train_values", None)
                if reader is None:
                    trains = module.spike_trains(x[:1]) if x.dim() else module.spike_trains(x)
                else:
                    trains = reader(x, rows=1)
            else:
                # re-running trains reads values on the host (a synchronisation per call on a GPU):
                # off the CPU the trains are taken as binary, which the spike-driven check verifies
                trains = (spikes > 0).to(x.dtype).reshape(1)
            largest = trains.detach().abs().max().to(torch.float64)
            seen = value_bins(trains)
        else:
            lo, hi = torch.aminmax(output.detach())
            events = spikes = torch.as_tensor(module.count_events(inputs, output)[0], dtype=torch.float64)
            largest = torch.maximum(hi.abs(), lo.abs()).to(torch.float64)
            seen = value_bins(torch.stack([lo, hi]).round())
        device = self.counts.device
        self.counts[0, index] += events.to(device)
        self.counts[1, index] += spikes.to(device)
        self.counts[2, index] = torch.maximum(self.counts[2, index], largest.to(device))
        self.seen[index] = torch.maximum(self.seen[index], seen.to(device))


class OpCounter(HookCounter):
    """MACs and ACs per layer and per time step.

    Args:
        model: the network to watch.
        analog: the Conv2d / Linear modules whose input is analog (they cost dense MACs).
        steps: time steps T of one simulation (the length of the per-step counts).
        time_flattened: layers run once on a ``[T*B, ...]`` batch (multi-step); False: each call
            of a layer is the next step (single-step), restarted by :meth:`new_sample`.
        uncounted: modules with parameters that do no counted work, with the reason (the model's
            :meth:`~csdlab.eval.api.SpikingModel.uncounted_modules`).

    Raises:
        ValueError: ``steps < 1``; a module with parameters of its own that is neither counted nor
            declared (named, with the fix).
    """

    def __init__(self, model: nn.Module, analog: Iterable[nn.Module] = (), steps: int = 1,
                 time_flattened: bool = False, uncounted: Mapping[nn.Module, str] | None = None) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps
        self.time_flattened = time_flattened
        self._analog = {id(m) for m in analog}
        self._uncounted = {id(m) for m in (uncounted or {})}
        self._targets: list[tuple[str, nn.Module]] = []
        undeclared: list[str] = []
        self._walk(model, "", undeclared)
        if undeclared:
            raise ValueError(f"modules with parameters that the op counter neither counts nor was told to skip: "
                             f"{undeclared[:6]}; give them count_ops(inputs, output), or list them with the reason "
                             f"in the spiking model's uncounted_modules()")
        # per target: [3, steps] = (MACs, ACs per event, ACs per unit spike) per step, summed over
        # samples (made on first use, on the device of the layer's output)
        self.layers: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}

    @staticmethod
    def _counted(m: nn.Module) -> bool:
        return isinstance(m, (OpCounting, nn.Conv2d, nn.Linear))

    def _walk(self, module: nn.Module, prefix: str, undeclared: list[str]) -> None:
        if any(True for _ in module.parameters(recurse=False)) and not self._counted(module) \
                and id(module) not in self._uncounted:
            undeclared.append(f"{prefix.rstrip('.') or '<root>'} ({type(module).__name__})")
        for name, child in module.named_children():
            qual = prefix + name
            if self._counted(child):
                self._targets.append((qual, child))
                if isinstance(child, OpCounting):
                    continue  # it counts its own inner layers
            self._walk(child, qual + ".", undeclared)

    def targets(self) -> list[tuple[str, nn.Module]]:
        return self._targets

    def _step_of(self, name: str) -> int | None:
        if self.time_flattened:
            return None
        k = self._calls.get(name, 0)
        if k >= self.steps:
            raise RuntimeError(f"layer {name} was called {k + 1} times in a {self.steps}-step simulation; "
                               "call OpCounter.new_sample() before each simulation")
        self._calls[name] = k + 1
        return k

    def _add(self, ops: Tensor, row: int, values: Tensor | float, step: int | None) -> None:
        """Add a count: a per-step ``[steps]`` tensor as it is; a scalar to ``step`` (single-step)
        or, in multi-step mode, to the last step."""
        if isinstance(values, Tensor) and values.dim() == 1 and values.numel() == self.steps:
            ops[row] += values.detach().to(ops)
        else:
            ops[row, self.steps - 1 if step is None else step] += values

    def count(self, index: int, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        step = self._step_of(name)
        ops = self.layers.get(name)
        if ops is None:
            device = output.device if isinstance(output, Tensor) else "cpu"
            ops = self.layers[name] = torch.zeros(3, self.steps, dtype=torch.float64, device=device)
        if hasattr(module, "count_ops"):  # OpCounting; hasattr because this runs per call (a Protocol check is slow)
            macs, acs = module.count_ops(inputs, output)
            self._add(ops, 0, macs, step)
            self._add(ops, 1, acs, step)
            spike = getattr(module, "count_spike_acs", None)  # graded operands: ACs per unit spike
            self._add(ops, 2, acs if spike is None else spike(inputs, output), step)
        elif id(module) in self._analog:
            dense = dense_macs(module, output)
            if step is None:
                ops[0] += dense / self.steps  # the same dense call at every step
            else:
                ops[0, step] += dense
        else:
            x = inputs[0]
            events = synaptic_events(module, x)  # [rows]
            units = units_per_row(x)  # graded spikes: unit spikes per row (None: binary, spikes = events)
            if units is not None and not isinstance(module, nn.Linear):
                raise ValueError(f"layer {name}: graded spikes into a {type(module).__name__} are not counted per "
                                 "unit spike (only a Linear's fan-out is); give it count_ops")
            spikes = events if units is None else units.to(events) * module.out_features
            if step is None:
                ops[1] += events.view(self.steps, -1).sum(1)  # [T*B] -> [T]
                ops[2] += spikes.view(self.steps, -1).sum(1)
            else:
                ops[1, step] += events.sum()
                ops[2, step] += spikes.sum()

    def new_sample(self) -> None:
        """Start a new simulation (single-step mode counts calls from here)."""
        self._calls.clear()

    def _total(self) -> Tensor:
        if not self.layers:
            return torch.zeros(3, self.steps, dtype=torch.float64)
        dev = next(iter(self.layers.values())).device
        return torch.stack([t.to(dev) for t in self.layers.values()]).sum(0)

    @property
    def per_step(self) -> Tensor:
        """``[2, steps]``: (MACs, ACs) of each step, summed over layers and samples; an event
        costs one AC per target whatever it carries (the per-event rule)."""
        return self._total()[:2]

    @property
    def per_step_spike(self) -> Tensor:
        """``[steps]``: ACs of each step under the unit-spike rule (an event of ``k`` unit spikes
        costs ``k`` ACs per target); the MACs are ``per_step[0]`` under both rules."""
        return self._total()[2]


class SimulationCounters:
    """Both counters around the simulations of one spiking model, with one spike-count cache.

    ``with SimulationCounters(snn, device) as c: readout = snn(x)`` then ``c.firing.counts``
    (``[2, sites]``), ``c.payload.counts`` (``[3, sites]``), ``c.ops.per_step`` (``[2, T]``) and
    ``c.ops.per_step_spike`` (``[T]``). A neuron's spikes are counted once for the
    firing counter and the op counter of the layer it feeds (:func:`csdlab.snn.counting.counting_cache`,
    alive while the counters are entered).
    """

    def __init__(self, snn: Any, device: torch.device | str | None = None) -> None:
        self.firing = FiringCounter(snn.sites(), device=device)
        self.payload = PayloadCounter(snn.sites(), device=device)
        self.ops = OpCounter(snn, analog=snn.analog_layers(), steps=int(snn.time_steps),
                             time_flattened=snn.time_flattened(), uncounted=snn.uncounted_modules())
        self._stack: ExitStack | None = None

    def __enter__(self) -> SimulationCounters:
        stack = ExitStack()
        stack.enter_context(counting_cache())
        stack.enter_context(self.firing)
        stack.enter_context(self.payload)  # before the ops: its records serve the layers the sites feed
        stack.enter_context(self.ops)
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


def _cpu_sdpa_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    # torch's FLOP counter knows the CUDA attention kernels but not the CPU one timm's fused
    # attention dispatches to: without this the two attention products count as 0
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


@torch.no_grad()
def ann_macs(model: nn.Module, x: Tensor) -> float:
    """Dense MACs of one ANN forward on ``x``: every conv, matmul and linear, the attention
    products included (also when timm runs them as one fused attention kernel)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as fc:
        model(x)
    return fc.get_total_flops() / 2

