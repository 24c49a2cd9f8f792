"""The spike-driven check (docs/methods.md §1.4): is every synaptic operation of the SNN driven by spikes?

It watches one simulation and certifies what it saw, not what modules declare:

* **synaptic sites**: every ``Conv2d`` / ``Linear`` and every product of two activations (a module
  with ``synaptic_product = True``: TDEC, ECMT's EC product, MBE's AND product). Each tensor operand
  a site receives must be
  - binary (0/1), looked at entry by entry; or
  - the output of a **verified spike source** of this run, found by its storage (a view such as
    ``k.transpose(-2, -1)`` shares it) and unmodified since (its version counter); or
  - the site is exempt (the analog image into the first layer, the head's readout).
* **spike sources** (:mod:`csdlab.eval.api`): a neuron layer is verified on each call, from its
  input and the output it passed on:
  - a :class:`~csdlab.eval.api.GradedSpikeSource` (ECMT's MT neuron) sends one value of a finite
    alphabet per neuron and step: every output entry must be in its alphabet;
  - a :class:`~csdlab.eval.api.SpikeTrainSource` (MBE's neuron) sends binary trains over its own
    steps and passes on their linear readout: the check runs the neuron's trains on the input,
    requires them binary, and requires the passed-on output to equal their readout (to a few
    float ulps). A neuron replaced by its exact function fails here.

An operand that is none of these is analog: the verdict fails and names the site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from csdlab.eval.api import GradedSpikeSource, SpikeTrainSource

__all__ = ["LayerCheck", "SourceCheck", "SpikeDrivenReport", "spike_driven_check", "is_binary"]

CHECKED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
#: operand kinds a site may see, worst last
KINDS = ("binary", "graded", "readout", "analog")


def is_binary(x: Tensor) -> bool:
    """True when every entry is exactly 0 or 1."""
    return bool(((x == 0) | (x == 1)).all())


def _is_site(m: nn.Module) -> bool:
    return isinstance(m, CHECKED_TYPES) or bool(getattr(m, "synaptic_product", False))


@dataclass
class LayerCheck:
    """One synaptic site: the kinds of operand it received over every call."""

    name: str
    kind: str
    exempt: bool = False
    calls: int = 0
    operands: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.exempt or (self.calls > 0 and "analog" not in self.operands)


@dataclass
class SourceCheck:
    """One spike source: whether every call's output was a valid spike payload."""

    name: str
    kind: str
    calls: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class SpikeDrivenReport:
    """Per-site and per-source results; ``ok`` when every non-exempt site ran and saw no analog operand."""

    layers: list[LayerCheck] = field(default_factory=list)
    sources: list[SourceCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations and all(c.calls for c in self.layers)

    @property
    def violations(self) -> list[str]:
        return [c.name for c in self.layers if not c.ok]

    @property
    def failed_sources(self) -> list[str]:
        return [s.name for s in self.sources if s.failures]

    def operand_kinds(self) -> dict[str, int]:
        """How many non-exempt sites saw each operand kind."""
        out = {k: 0 for k in KINDS}
        for c in self.layers:
            if not c.exempt:
                for k in c.operands:
                    out[k] += 1
        return {k: n for k, n in out.items() if n}

    def summary(self) -> str:
        """One line: the verdict and what it certifies."""
        sites = sum(not c.exempt for c in self.layers)
        kinds = ", ".join(f"{k} {n}" for k, n in self.operand_kinds().items())
        head = (f"{'PASS' if self.ok else 'FAIL'}: {sites} synaptic sites watched ({kinds}; "
                f"{len(self.layers) - sites} exempt), {len(self.sources)} spike sources")
        if self.ok:
            return head + "; every operand was binary, a graded spike of its neuron's alphabet, or the readout of binary trains"
        bad = self.violations
        why = f"; analog operands at {len(bad)} sites, e.g. {bad[:3]}"
        if self.failed_sources:
            why += f"; {len(self.failed_sources)} neuron layers did not pass on spikes, e.g. {self.failed_sources[:2]}"
        return head + why


def _storage_key(x: Tensor) -> tuple[int, str]:
    return x.untyped_storage().data_ptr(), str(x.device)


def _version(x: Tensor) -> int:
    # tensors made under inference mode have no version counter: nothing can modify them in place
    # unnoticed there either, as inference mode is not left inside one simulation
    try:
        return x._version
    except RuntimeError:
        return -1


def _readout_matches(out: Tensor, decoded: Tensor) -> bool:
    # the readout is recomputed step by step; the fast path is bit-identical to it by construction,
    # a few ulps leave room for a summation order another kernel might choose
    if out.shape != decoded.shape:
        return False
    tol = 8 * torch.finfo(out.dtype).eps * (out.abs() + decoded.abs().amax().clamp(min=1e-30))
    return bool(((out - decoded.to(out.dtype)).abs() <= tol).all())


@torch.no_grad()
def spike_driven_check(model: nn.Module, run: Callable[[nn.Module], Any],
                       exempt: Iterable[nn.Module] = ()) -> SpikeDrivenReport:
    """Run ``run(model)`` once while watching every synaptic site and spike source.

    Args:
        model: the SNN.
        run: calls the SNN once, e.g. ``lambda snn: snn(images)``.
        exempt: sites allowed analog operands (the first layer's image, the head's readout).

    Returns:
        The report; ``report.ok`` is the verdict, ``report.summary()`` says what it certifies.
    """
    exempt_ids = {id(m) for m in exempt}
    report = SpikeDrivenReport()
    verified: dict[tuple[int, str], tuple[Tensor, int, str]] = {}  # storage -> (tensor kept alive, version, kind)
    handles = []

    def source_hook(check: SourceCheck) -> Callable[..., None]:
        def fn(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, Tensor):
                return
            check.calls += 1
            if isinstance(mod, SpikeTrainSource):
                x = inputs[0]
                trains = mod.spike_trains(x)
                if not is_binary(trains):
                    check.failures.append("non-binary trains")
                    return
                if not _readout_matches(output, mod.decode(trains, x)):
                    check.failures.append("output is not the readout of its spike trains")
                    return
                kind = "readout"
            else:
                alphabet = mod.spike_alphabet(output.dtype, output.device)
                if not bool(torch.isin(output, alphabet).all()):
                    check.failures.append("output outside the neuron's spike alphabet")
                    return
                kind = "graded"
            # keeping the tensor alive keeps its storage from being reused by an analog tensor
            verified[_storage_key(output)] = (output, _version(output), kind)
        return fn

    def site_hook(check: LayerCheck) -> Callable[..., None]:
        def fn(mod: nn.Module, inputs: tuple[Any, ...]) -> None:
            check.calls += 1
            for x in inputs:
                if not isinstance(x, Tensor):
                    continue
                known = verified.get(_storage_key(x))
                if known is not None and known[1] == _version(x):
                    check.operands.add(known[2])
                elif is_binary(x):
                    check.operands.add("binary")
                else:
                    check.operands.add("analog")
        return fn

    for name, m in model.named_modules():
        if isinstance(m, (SpikeTrainSource, GradedSpikeSource)):
            src = SourceCheck(name, type(m).__name__)
            report.sources.append(src)
            handles.append(m.register_forward_hook(source_hook(src)))
        if _is_site(m):
            check = LayerCheck(name, type(m).__name__, exempt=id(m) in exempt_ids)
            report.layers.append(check)
            handles.append(m.register_forward_pre_hook(site_hook(check)))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
        verified.clear()
    return report
