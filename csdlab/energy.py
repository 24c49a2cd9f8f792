"""Energy estimate of an SNN against its ANN (docs/methods.md §3), the field's 45 nm convention.

``E_SNN / E_ANN = (MACs_SNN * E_MAC + ACs_SNN * E_AC) / (MACs_ANN * E_MAC)``.

* A Conv2d / Linear fed by analog values (the image, the head's readout) costs its dense MACs.
* A Conv2d / Linear fed by events costs one AC per (non-zero input event) x (its actual fan-out):
  for a Linear every event reaches ``out_features`` outputs; for a convolution an event reaches
  only the output positions whose window covers it, which near the border is fewer than
  ``kh * kw`` (padding). The count is exact (:func:`csdlab.snn.counting.synaptic_events`: events
  per input position times the number of output windows covering it; SpikingJelly 2.0's
  ``op_counter`` counts spiking convolutions the same way, and a test checks the two agree).
* Any other module counts itself by defining ``count_ops(inputs, output) -> (macs, acs)``
  (the TDEC spike products, the ECMT matrix-product EC, the MBE products, ...); the counter does
  not descend into such a module.

Counts are kept per time step, so the evaluation can report the energy spent up to every ``t``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from csdlab.snn.counting import synaptic_events

__all__ = ["E_MAC_PJ", "E_AC_PJ", "LayerOps", "OpCounter", "dense_macs", "synaptic_events", "ann_macs",
           "energy_ratio"]

E_MAC_PJ = 4.6  # pJ per 32-bit multiply-accumulate (45 nm)
E_AC_PJ = 0.9  # pJ per 32-bit accumulate (45 nm)


@dataclass
class LayerOps:
    """Operations summed over samples (and over steps, unless per-step tensors are kept)."""

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


def _per_step(values: Tensor | float, steps: int, step: int | None,
              device: torch.device | str = "cpu") -> Tensor:
    """Spread a count onto a ``[steps]`` vector on ``device``: a per-step tensor stays, a scalar goes
    to ``step`` (the current call in single-step mode) or, in multi-step mode, to the last step.
    A tensor count is never read on the host (no synchronisation with a GPU)."""
    if isinstance(values, Tensor) and values.numel() == steps and values.dim() == 1:
        return values.detach().to(device, torch.float64)
    out = torch.zeros(steps, dtype=torch.float64, device=device)
    out[steps - 1 if step is None else step] = values.detach() if isinstance(values, Tensor) else values
    return out


class OpCounter:
    """Counts MACs and ACs per layer and per time step with forward hooks while it is entered.

    Args:
        model: the network to watch.
        analog: the Conv2d / Linear modules whose input is analog (they cost dense MACs).
        steps: time steps T of one simulation (the length of the per-step counts).
        time_flattened: layers run once on a ``[T*B, ...]`` batch (multi-step); False: each call
            of a layer is the next step (single-step), restarted by :meth:`new_sample`.
    """

    def __init__(self, model: nn.Module, analog: Iterable[nn.Module] = (), steps: int = 1,
                 time_flattened: bool = False) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model = model
        self.steps = steps
        self.time_flattened = time_flattened
        self._analog = {id(m) for m in analog}
        # per layer: [2, steps] = (MACs, ACs) per step, summed over samples
        self.layers: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[Any] = []

    def _step_of(self, name: str) -> int | None:
        if self.time_flattened:
            return None
        k = self._calls.get(name, 0)
        if k >= self.steps:
            raise RuntimeError(f"layer {name} was called {k + 1} times in a {self.steps}-step simulation; "
                               "call OpCounter.new_sample() before each simulation")
        self._calls[name] = k + 1
        return k

    def _split(self, per_row: Tensor) -> Tensor:
        # [T*B] per-row counts -> [T] per-step counts
        return per_row.view(self.steps, -1).sum(1)

    def _hook(self, name: str):
        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            step = self._step_of(name)
            ops = self.layers.get(name)
            if ops is None:  # on the layer's device: counts are added there, never read per layer
                like = output if isinstance(output, Tensor) else inputs[0]
                ops = self.layers[name] = torch.zeros(2, self.steps, dtype=torch.float64, device=like.device)
            if hasattr(mod, "count_ops"):
                macs, acs = mod.count_ops(inputs, output)
                ops[0] += _per_step(macs, self.steps, step, ops.device)
                ops[1] += _per_step(acs, self.steps, step, ops.device)
                return
            x = inputs[0]
            if id(mod) in self._analog:
                dense = dense_macs(mod, output)
                if step is None:
                    ops[0] += dense / self.steps  # the same dense call at every step
                else:
                    ops[0, step] += dense
            elif step is None:
                ops[1] += self._split(synaptic_events(mod, x))
            else:
                ops[1, step] += synaptic_events(mod, x).sum()

        return hook

    def __enter__(self) -> OpCounter:
        self._watch(self.model, "")
        return self

    def _watch(self, module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qual = prefix + name
            if hasattr(child, "count_ops") or isinstance(child, (nn.Conv2d, nn.Linear)):
                self._handles.append(child.register_forward_hook(self._hook(qual)))
                if hasattr(child, "count_ops"):
                    continue  # it counts its own inner layers
            self._watch(child, qual + ".")

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def new_sample(self) -> None:
        """Start a new simulation (single-step mode counts calls from here)."""
        self._calls.clear()

    def reset(self) -> None:
        self.layers.clear()
        self._calls.clear()

    @property
    def per_step(self) -> Tensor:
        """``[2, steps]``: (MACs, ACs) of each step, summed over layers and samples."""
        if not self.layers:
            return torch.zeros(2, self.steps, dtype=torch.float64)
        return torch.stack(list(self.layers.values())).sum(0)

    @property
    def total(self) -> LayerOps:
        macs, acs = self.per_step.sum(1).tolist()
        return LayerOps(macs, acs)


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


def energy_ratio(snn: LayerOps, ann_mac_count: float) -> float:
    """``(MACs_SNN E_MAC + ACs_SNN E_AC) / (MACs_ANN E_MAC)`` for the same number of samples."""
    if ann_mac_count <= 0:
        raise ValueError(f"ANN MAC count must be > 0, got {ann_mac_count}")
    return snn.energy_pj / (ann_mac_count * E_MAC_PJ)
