"""Energy estimate of an SNN against its ANN (METHODS 3), the field's 45 nm convention.

``E_SNN / E_ANN = (MACs_SNN * E_MAC + ACs_SNN * E_AC) / (MACs_ANN * E_MAC)``.

* A Conv2d / Linear fed by analog values (the image, the head's readout) costs its dense MACs.
* A Conv2d / Linear fed by events costs one AC per (non-zero input) x (fan-out), i.e. its dense
  MAC count times the non-zero fraction of its input, summed over every time step it runs.
* Any other module counts itself by defining ``count_ops(inputs, output) -> (macs, acs)``
  (the TDEC spike products, the ECMT matrix-product EC, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["E_MAC_PJ", "E_AC_PJ", "LayerOps", "OpCounter", "dense_macs", "ann_macs", "energy_ratio"]

E_MAC_PJ = 4.6  # pJ per 32-bit multiply-accumulate (45 nm)
E_AC_PJ = 0.9  # pJ per 32-bit accumulate (45 nm)


@dataclass
class LayerOps:
    """Operations one layer performed, summed over every call (time step) and sample."""

    macs: float = 0.0
    acs: float = 0.0

    @property
    def energy_pj(self) -> float:
        return self.macs * E_MAC_PJ + self.acs * E_AC_PJ


def dense_macs(module: nn.Module, output: Tensor) -> float:
    """MACs of one dense call of a Conv2d or Linear that produced ``output``."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return float(output.numel() * (module.in_channels // module.groups) * kh * kw)
    if isinstance(module, nn.Linear):
        return float(output.numel() * module.in_features)
    raise TypeError(f"dense_macs takes nn.Conv2d or nn.Linear, got {type(module).__name__}")


class OpCounter:
    """Counts MACs and ACs per layer with forward hooks while it is entered.

    Args:
        model: the network to watch.
        analog: the Conv2d / Linear modules whose input is analog (they cost MACs); every other
            Conv2d / Linear is taken to be fed by events (spikes) and costs ACs.
    """

    def __init__(self, model: nn.Module, analog: Iterable[nn.Module] = ()) -> None:
        self.model = model
        self._analog = {id(m) for m in analog}
        self.layers: dict[str, LayerOps] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str, module: nn.Module):
        ops = self.layers.setdefault(name, LayerOps())

        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if hasattr(mod, "count_ops"):
                macs, acs = mod.count_ops(inputs, output)
                ops.macs += float(macs)
                ops.acs += float(acs)
                return
            dense = dense_macs(mod, output)
            if id(mod) in self._analog:
                ops.macs += dense
            else:
                x = inputs[0]
                ops.acs += dense * float(torch.count_nonzero(x)) / max(x.numel(), 1)

        return hook

    def __enter__(self) -> "OpCounter":
        for name, m in self.model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) or hasattr(m, "count_ops"):
                self._handles.append(m.register_forward_hook(self._hook(name, m)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        for ops in self.layers.values():
            ops.macs = ops.acs = 0.0

    @property
    def total(self) -> LayerOps:
        return LayerOps(sum(o.macs for o in self.layers.values()), sum(o.acs for o in self.layers.values()))


@torch.no_grad()
def ann_macs(model: nn.Module, x: Tensor) -> float:
    """Dense MACs of one ANN forward on ``x`` (all matmuls and convs, attention products included)."""
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2


def energy_ratio(snn: LayerOps, ann_mac_count: float) -> float:
    """``(MACs_SNN E_MAC + ACs_SNN E_AC) / (MACs_ANN E_MAC)`` for the same number of samples."""
    if ann_mac_count <= 0:
        raise ValueError(f"ANN MAC count must be > 0, got {ann_mac_count}")
    return snn.energy_pj / (ann_mac_count * E_MAC_PJ)
