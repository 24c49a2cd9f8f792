"""The contract between a converter and the one evaluation path (``csdlab.eval``).

A method (CSDformer, ECMT, MBE, ...) supplies two things and nothing else:

* a :class:`Converter`: configured by its ``__init__`` arguments (YAML / command line), it checks
  the model it is given, optionally calibrates on training images, and builds one or more
  :class:`SpikingModel` *variants* (one per delay D, per T, ...);
* each :class:`SpikingModel`: ``forward(images)`` simulates its time steps and returns the readout
  after every step listed in ``readout_steps``.

Everything measured (accuracy per t, agreement and logit error vs the reference network, firing
rates per site, energy, tables, JSON, plots, W&B, DDP) is done by :mod:`csdlab.eval` from these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["SpikingModel", "Converter", "CONVERTERS", "AllReduce", "EventCounting", "OpCounting",
           "GradedSpikeSource", "SpikeTrainSource"]

# sums a tensor over every process (identity in a single process)
AllReduce = Callable[[Tensor], Tensor]


@runtime_checkable
class EventCounting(Protocol):
    """A neuron site (one of :meth:`SpikingModel.sites`): it says how many events it sent. The firing
    counter (:class:`csdlab.eval.counters.FiringCounter`) calls it from a forward hook and raises,
    naming the site, for a site without it."""

    def count_events(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``(events, neuron_steps)`` of this call: spikes (binary), graded spikes or bursts (each
        counted once), and neurons x steps simulated; tensors stay on the device."""


@runtime_checkable
class OpCounting(Protocol):
    """A module that counts its own synaptic work (a product of two spiking operands, a
    multi-step layer, an expectation-compensation product). The operation counter
    (:class:`csdlab.eval.counters.OpCounter`) calls it from a forward hook and does not descend
    into its children; a parameterised module that neither counts itself, is a Conv2d / Linear nor
    is declared in :meth:`SpikingModel.uncounted_modules` makes the counter raise, naming it."""

    def count_ops(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``(macs, acs)`` of this call: floats, or 1-D tensors with one entry per time step."""


@runtime_checkable
class GradedSpikeSource(Protocol):
    """A neuron layer whose output is a graded spike: per neuron and step, one value of a finite
    alphabet (ECMT's MT neuron: ``0``, ``th1 2^k``, ``-th2 2^k``). The spike-driven check
    (:mod:`csdlab.eval.checks`) verifies every output entry against the alphabet."""

    def spike_alphabet(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The values one neuron may send in one step (``0`` included), 1-D."""


@runtime_checkable
class SpikeTrainSource(Protocol):
    """A neuron layer that emits binary trains over its own steps and passes on their linear
    readout (MBE: ``T`` steps of ``N`` bases). The spike-driven check reruns the trains on the
    layer's input and verifies the passed-on output equals their readout."""

    def spike_trains(self, x: Tensor) -> Tensor:
        """The binary spikes emitted for input ``x`` (``[T, N, *x.shape]``)."""

    def decode(self, trains: Tensor, x: Tensor) -> Tensor:
        """The value the receiver reconstructs from ``trains`` (shape and dtype of ``x``)."""


class SpikingModel(nn.Module, ABC):
    """A converted network, ready to simulate.

    Subclasses set ``time_steps`` (T as the method defines it, see ``docs/methods.md``) and
    ``readout_steps`` (the t of each readout row: ``1..T`` for an anytime readout, ``[T]`` when
    only the end is meaningful).
    """

    time_steps: int
    readout_steps: list[int]

    def __init__(self, time_steps: int, readout_steps: Sequence[int] | None = None) -> None:
        """``readout_steps`` defaults to every step ``1..time_steps`` (an anytime readout)."""
        super().__init__()
        if isinstance(time_steps, bool) or not isinstance(time_steps, int) or time_steps < 1:
            raise ValueError(f"T (time steps) must be an integer >= 1, got {time_steps!r}")
        steps = list(range(1, time_steps + 1)) if readout_steps is None else [int(t) for t in readout_steps]
        if not steps or steps != sorted(set(steps)) or steps[0] < 1 or steps[-1] > time_steps:
            raise ValueError(f"readout_steps must be increasing steps within 1..{time_steps}, got {readout_steps!r}")
        self.time_steps = time_steps
        self.readout_steps = steps

    @abstractmethod
    def forward(self, images: Tensor) -> Tensor:
        """Reset, simulate, and return the readout ``[len(readout_steps), B, classes]``."""

    @abstractmethod
    def sites(self) -> dict[str, nn.Module]:
        """The neuron layers by readable name, for firing rates (spikes per neuron per step).

        A forward hook on each counts: a module with ``count_events(inputs, output) ->
        (events, neuron_steps)`` counts itself (multi-basis or multi-level neurons); for any
        other, events = non-zero entries of its output and neuron-steps = its ``numel``."""

    @abstractmethod
    def analog_layers(self) -> list[nn.Module]:
        """Conv2d / Linear layers whose input is analog (they cost MACs, not ACs).

        Energy (``csdlab.eval.counters.OpCounter``): every other Conv2d / Linear costs one AC per non-zero
        input event x its actual fan-out; a module that defines ``count_ops(inputs, output) ->
        (macs, acs)`` (floats, or 1-D tensors with one entry per time step) counts itself and the
        counter does not descend into its children."""

    def uncounted_modules(self) -> dict[nn.Module, str]:
        """Modules with parameters of their own that do no counted work, each with the reason (the
        class and position embeddings: additions; LayerNorm affines that both sides leave out).
        The op counter raises for any other parameterised module it cannot count."""
        return {}

    @property
    def latency(self) -> int:
        """Steps from the first input to the last readout (CSDformer: T + D)."""
        return int(self.time_steps)

    def time_flattened(self) -> bool:
        """True when layers run once on a ``[T*B, ...]`` batch (multi-step), False when they are
        called once per step on ``[B, ...]``; the op counter splits counts per step accordingly."""
        return False


#: every concrete converter class by its ``name`` (filled as csdlab.convert's modules are imported)
CONVERTERS: dict[str, type[Converter]] = {}


class Converter(ABC):
    """Builds spiking variants of a trained network.

    Args are the method's own options (T, D, levels, ...): LightningCLI builds the converter from
    ``model.converter`` in ``configs/convert/*.yaml``.
    """

    #: short method name used in keys, file names and logs (``csdformer``, ``ecmt``, ``mbe``)
    name: str = "snn"
    #: what the SNN is compared with (agreement, logit error): the converted network itself
    reference_name: str = "ANN"
    #: what it converts: ``vit`` (a float timm VisionTransformer) or ``csdformer`` (a quantized
    #: CSDformer); the contract test builds one of each kind for every registered converter
    accepts: str = "vit"
    #: whether :meth:`calibrate` must run on training images before :meth:`convert`
    needs_calibration: bool = False
    #: whether its SNNs are fully spike-driven (every synaptic operand binary, a graded spike of a
    #: finite alphabet or a spike-train readout); the contract test holds the spike-driven check's
    #: verdict to this claim
    spike_driven: bool = True
    #: whether calibrating on N processes (sums through ``all_reduce``) gives the constants of one
    #: process calibrating on all the images; every process must end with the same constants either way
    calibration_is_exact_across_processes: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None):
            CONVERTERS[cls.name] = cls

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` (naming the problem and the fix) if ``model`` cannot be converted.
        Called before any data is read."""

    def calibrate(self, model: nn.Module, batches: Iterable[Tensor], all_reduce: AllReduce) -> dict[str, Any]:
        """Observe ``model`` (float / quantized, never the SNN) on this process's share of the
        calibration images and fix the conversion's data-dependent constants. Per-process sums
        must go through ``all_reduce`` so every process ends with the same constants. Returns a
        JSON-able summary (thresholds, ranges). Default: nothing to calibrate."""
        return {}

    @abstractmethod
    def convert(self, model: nn.Module) -> dict[str, SpikingModel]:
        """The spiking variants by label (``D3``, ``T16``, ...), each on ``model``'s device/dtype.
        ``model`` is not modified."""
