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

Both counters hang on the same hook mechanism (:class:`HookCounter`) and are entered together by
:class:`SimulationCounters`, which the evaluation and the benchmarks use alike. Counts stay on the
model's device (no host synchronisation inside a simulation).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from csdlab.eval.api import EventCounting, OpCounting
from csdlab.snn.counting import counting_cache, synaptic_events

__all__ = ["E_MAC_PJ", "E_AC_PJ", "energy_ratio", "HookCounter", "FiringCounter", "OpCounter",
           "SimulationCounters", "dense_macs", "ann_macs"]

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
        # per target: [2, steps] = (MACs, ACs) per step, summed over samples (made on first use,
        # on the device of the layer's output)
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
            ops = self.layers[name] = torch.zeros(2, self.steps, dtype=torch.float64, device=device)
        if hasattr(module, "count_ops"):  # OpCounting; hasattr because this runs per call (a Protocol check is slow)
            macs, acs = module.count_ops(inputs, output)
            self._add(ops, 0, macs, step)
            self._add(ops, 1, acs, step)
        elif id(module) in self._analog:
            dense = dense_macs(module, output)
            if step is None:
                ops[0] += dense / self.steps  # the same dense call at every step
            else:
                ops[0, step] += dense
        elif step is None:
            ops[1] += synaptic_events(module, inputs[0]).view(self.steps, -1).sum(1)  # [T*B] -> [T]
        else:
            ops[1, step] += synaptic_events(module, inputs[0]).sum()

    def new_sample(self) -> None:
        """Start a new simulation (single-step mode counts calls from here)."""
        self._calls.clear()

    @property
    def per_step(self) -> Tensor:
        """``[2, steps]``: (MACs, ACs) of each step, summed over layers and samples."""
        if not self.layers:
            return torch.zeros(2, self.steps, dtype=torch.float64)
        devices = {t.device for t in self.layers.values()}
        dev = next(iter(devices))
        return torch.stack([t.to(dev) for t in self.layers.values()]).sum(0)


class SimulationCounters:
    """Both counters around the simulations of one spiking model, with one spike-count cache.

    ``with SimulationCounters(snn, device) as c: readout = snn(x)`` then ``c.firing.counts``
    (``[2, sites]``) and ``c.ops.per_step`` (``[2, T]``). A neuron's spikes are counted once for the
    firing counter and the op counter of the layer it feeds (:func:`csdlab.snn.counting.counting_cache`,
    alive while the counters are entered).
    """

    def __init__(self, snn: Any, device: torch.device | str | None = None) -> None:
        self.firing = FiringCounter(snn.sites(), device=device)
        self.ops = OpCounter(snn, analog=snn.analog_layers(), steps=int(snn.time_steps),
                             time_flattened=snn.time_flattened(), uncounted=snn.uncounted_modules())
        self._stack: ExitStack | None = None

    def __enter__(self) -> SimulationCounters:
        stack = ExitStack()
        stack.enter_context(counting_cache())
        stack.enter_context(self.firing)
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

