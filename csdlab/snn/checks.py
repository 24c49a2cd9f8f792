"""The spike-driven check (docs/methods.md §1.4): is every layer input of the SNN a binary spike tensor?"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LayerCheck", "SpikeDrivenReport", "spike_driven_check", "is_binary"]

# layers whose inputs must be spikes: weight layers, and every operator that counts its own
# operations (the products of two spike trains: TDEC, EC, MBE)
CHECKED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def _checked(m: nn.Module) -> bool:
    return isinstance(m, CHECKED_TYPES) or hasattr(m, "count_ops")


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
    calls: int = 0


@dataclass
class SpikeDrivenReport:
    """Per-layer results; ``ok`` when every non-exempt layer saw only binary inputs."""

    layers: list[LayerCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.binary or c.exempt for c in self.layers) and all(c.calls for c in self.layers)

    @property
    def violations(self) -> list[str]:
        return [c.name for c in self.layers if not (c.binary or c.exempt)]


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

    for name, m in model.named_modules():
        if _checked(m):
            check = LayerCheck(name, type(m).__name__, exempt=id(m) in exempt_ids)
            report.layers.append(check)
            handles.append(m.register_forward_pre_hook(hook(check)))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    return report
