"""The spike-driven check (docs/methods.md §1.4): is every synaptic operation of the SNN driven by spikes?

Checked: every Conv2d / Linear and every product of two activations (modules with
``synaptic_product = True``: TDEC, EC and MBE products). A checked layer passes when all its
tensor inputs are binary (0/1), when it is exempt (the analog image, the head's readout), or when
it declares ``encodes_inputs = True``: it turns its inputs into spike trains with its own neurons
before any synaptic operation (MBE's spiking linear inputs and products, whose dense simulation
then works on the decoded values; the layers inside such a module are not checked again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LayerCheck", "SpikeDrivenReport", "spike_driven_check", "is_binary"]

CHECKED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def _checked(m: nn.Module) -> bool:
    return isinstance(m, CHECKED_TYPES) or getattr(m, "synaptic_product", False) or _encodes(m)


def _encodes(m: nn.Module) -> bool:
    return bool(getattr(m, "encodes_inputs", False))


def is_binary(x: Tensor) -> bool:
    """True when every entry is exactly 0 or 1."""
    return bool(((x == 0) | (x == 1)).all())


@dataclass
class LayerCheck:
    """One checked layer: whether all of its inputs were binary over every call."""

    name: str
    kind: str
    binary: bool = True
    exempt: bool = False
    encoded: bool = False
    calls: int = 0


@dataclass
class SpikeDrivenReport:
    """Per-layer results; ``ok`` when every non-exempt layer saw only binary inputs."""

    layers: list[LayerCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations and all(c.calls for c in self.layers)

    @property
    def violations(self) -> list[str]:
        return [c.name for c in self.layers if not (c.binary or c.exempt or c.encoded)]


@torch.no_grad()
def spike_driven_check(model: nn.Module, run: Callable[[nn.Module], Any],
                       exempt: Iterable[nn.Module] = ()) -> SpikeDrivenReport:
    """Run ``run(model)`` with hooks on every conv / linear / TDEC product and record whether each
    one's tensor inputs were binary.

    Args:
        model: the SNN.
        run: calls the SNN once, e.g. ``lambda snn: snn(images)``.
        exempt: layers allowed analog input (the first conv's image, the head's readout).

    Returns:
        The report; ``report.ok`` is the pass/fail verdict.
    """
    exempt_ids = {id(m) for m in exempt}
    report = SpikeDrivenReport()
    handles = []

    def hook(check: LayerCheck) -> Callable[..., None]:
        def fn(mod: nn.Module, inputs: tuple[Any, ...]) -> None:
            check.calls += 1
            check.binary &= all(is_binary(x) for x in inputs if isinstance(x, Tensor))
        return fn

    inside_encoder: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_encoder):
            continue
        if _encodes(m):
            inside_encoder.append(name)
        if _checked(m):
            check = LayerCheck(name, type(m).__name__, exempt=id(m) in exempt_ids, encoded=_encodes(m))
            report.layers.append(check)
            handles.append(m.register_forward_pre_hook(hook(check)))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    return report
