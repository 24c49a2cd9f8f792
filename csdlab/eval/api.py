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

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["SpikingModel", "Converter", "CONVERTERS", "AllReduce", "EventCounting", "OpCounting",
           "GradedSpikeSource", "SpikeTrainSource", "PayloadSource", "Payload", "PAYLOAD_KINDS"]

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


@runtime_checkable
class PayloadSource(Protocol):
    """A neuron layer that says how many unit spikes each of its outputs is (the payload counter,
    :class:`csdlab.eval.counters.PayloadCounter`, measures the payload from it). A site without
    this method must output unit counts itself (0 / 1 for a binary neuron); a
    :class:`SpikeTrainSource` is read through its trains."""

    def spike_units(self, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """The signed number of unit spikes (integer-valued) each neuron sent in each step of the
        call that produced ``output``, shape of ``output`` (ECMT's ``th 2^k`` spike: ``2^k``; an STA
        burst of ``k`` spikes: ``k``)."""


#: the payload kinds a converter may declare
PAYLOAD_KINDS = ("binary", "levels", "burst")


@dataclass(frozen=True)
class Payload:
    """What one neuron may send in one step, as a converter *declares* it (the evaluation measures
    what it actually sends, :class:`csdlab.eval.counters.PayloadCounter`; the contract test holds
    the measurement to this declaration).

    Attributes:
        kind: ``binary`` (0 or 1), ``levels`` (a graded spike of a finite alphabet, e.g. ECMT's
            ``+-th 2^k``) or ``burst`` (a signed count of unit spikes sent at once, e.g. STA's).
        max_units: the largest value one neuron may send in one step, in unit spikes (None: no bound).
        values: distinct values one neuron may send in one step, silence included (None: no bound).
    """

    kind: str
    max_units: int | None
    values: int | None

    def __post_init__(self) -> None:
        if self.kind not in PAYLOAD_KINDS:
            raise ValueError(f"payload kind must be one of {PAYLOAD_KINDS}, got {self.kind!r}")

    @property
    def bits(self) -> int | None:
        """Bits one event must carry to tell the values apart: ``ceil(log2(values))`` (None: no bound)."""
        return None if self.values is None else max(1, math.ceil(math.log2(self.values)))

    @classmethod
    def binary(cls) -> Payload:
        return cls("binary", 1, 2)

    @classmethod
    def power_levels(cls, levels: int) -> Payload:
        """``+-th 2^k``, ``k < levels`` (ECMT's multi-threshold neuron): up to ``2^(levels-1)`` unit
        spikes, ``2 levels + 1`` values."""
        return cls("levels", 2 ** (levels - 1), 2 * levels + 1)

    @classmethod
    def burst(cls, max_units: int | None = None, signed: bool = True) -> Payload:
        """A count of up to ``max_units`` unit spikes (None: unbounded), signed or not."""
        values = None if max_units is None else (2 * max_units + 1 if signed else max_units + 1)
        return cls("burst", max_units, values)

    def describe(self) -> str:
        """One phrase for tables: ``binary``, ``17 levels (5 bits)``, ``burst <= 112 (8 bits)``,
        ``burst, unbounded``."""
        if self.kind == "binary":
            return "binary"
        if self.kind == "levels":
            return f"{self.values} values, <= {self.max_units} spikes ({self.bits} bits)"
        return "burst, unbounded" if self.max_units is None else f"burst <= {self.max_units} ({self.bits} bits)"


class SpikingModel(nn.Module, ABC):
    """A converted network, ready to simulate.

    Subclasses set ``time_steps`` (T as the method defines it, see ``docs/methods.md``) and
    ``readout_steps`` (the t of each readout row: ``1..T`` for an anytime readout, ``[T]`` when
    only the end is meaningful).
    """

    time_steps: int
    readout_steps: list[int]

    def __init__(self, time_steps: int | None = None, readout_steps: Sequence[int] | None = None) -> None:
        """``readout_steps`` defaults to every step ``1..time_steps`` (an anytime readout); either may
        come from class attributes of the subclass instead."""
        super().__init__()
        if time_steps is None:
            time_steps = getattr(type(self), "time_steps", None)
        if readout_steps is None:
            readout_steps = getattr(type(self), "readout_steps", None)
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
    #: where the method comes from: ``"csdlab"``, or the library whose recipe a peer converter wraps
    #: (``convert.py compare`` states, for every peer row, the csdlab row that meets it)
    origin: str = "csdlab"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None):
            CONVERTERS[cls.name] = cls

    def payload(self) -> Payload:
        """The spike payload this converter's SNNs send, as it declares it (default: binary). The
        evaluation measures the real one; the contract test checks the measurement stays within."""
        return Payload.binary()

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
