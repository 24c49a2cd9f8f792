"""Time-flattened simulation: a network that carries ``[T*B, ...]`` around multi-step modules.

A converted network can run all ``T`` steps of a layer in one call by stacking the steps along the
batch dimension, step-major (``[T*B, ...]``): Linear / conv layers, reshapes and residual adds
act on every step alike and need no change. Only the stateful modules (neurons, EC and TDEC
operators) must see the time axis, ``[T, B, ...]``. :func:`call_flat` is that one reshape, used in
two forms:

* :class:`TimeFlattened` wraps any SpikingJelly multi-step module (CSDformer's DIF neurons and TDEC
  operators);
* :class:`TimeFlatModule` is a ``MemoryModule`` base whose multi-step input may arrive flattened,
  for modules that also run single-step (ECMT's MT neurons and EC modules switch between the two
  modes, and keep their own names for thresholds and reports).

MBE needs neither: an MBE neuron runs all ``T`` steps of one presented value inside a single call,
so no tensor in an MBE network carries a time axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spikingjelly.activation_based import base
from torch import Tensor, nn

__all__ = ["call_flat", "repeat_steps", "unflatten_steps", "TimeFlattened", "TimeFlatModule"]


def unflatten_steps(x: Tensor, steps: int) -> Tensor:
    """``[T*B, ...]`` (step-major) -> ``[T, B, ...]`` (a view)."""
    return x.unflatten(0, (steps, -1))


def repeat_steps(x: Tensor, steps: int) -> Tensor:
    """The same ``[B, ...]`` input at every one of ``steps`` steps, as ``[T*B, ...]`` (step-major)."""
    return x.repeat(steps, *[1] * (x.dim() - 1))


def call_flat(fn: Callable[..., Tensor], steps: int, *xs: Tensor, **kwargs: Any) -> Tensor:
    """``fn`` (multi-step: ``[T, B, ...]`` in and out) on time-flattened ``[T*B, ...]`` inputs; the
    output is flattened back to ``[T*B, ...]``."""
    return fn(*(unflatten_steps(x, steps) for x in xs), **kwargs).flatten(0, 1)


class TimeFlattened(nn.Module):
    """Runs a multi-step module (``[T, B, ...]``) inside a network that carries ``[T*B, ...]``.

    Args:
        module: the multi-step module (a neuron or a TDEC operator).
        time_steps: T, to split the flattened batch.
    """

    def __init__(self, module: nn.Module, time_steps: int) -> None:
        super().__init__()
        self.module = module
        self.time_steps = time_steps

    def forward(self, *xs: Tensor) -> Tensor:
        return call_flat(self.module, self.time_steps, *xs)

    def extra_repr(self) -> str:
        return f"time_steps={self.time_steps}"


class TimeFlatModule(base.MemoryModule):
    """A ``MemoryModule`` whose multi-step input may arrive time-flattened.

    In multi-step mode with ``flat_steps = T`` set, every input is ``[T*B, ...]`` (step-major, as
    the Linear layers of a layer-by-layer simulation see it); it is viewed as ``[T, B, ...]`` for
    :meth:`multi_step_functional_forward` and the output is flattened back (:func:`call_flat`).
    With ``flat_steps = None`` multi-step inputs are SpikingJelly's ``[T, B, ...]``.

    ``keep_state = False`` (set by a simulator that runs all T steps in one call and resets
    afterwards) drops the states after a multi-step call instead of copying them out of the
    ``[T, ...]`` tensors; a further call before a reset then raises.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flat_steps: int | None = None
        self.keep_state = True

    def multi_step_forward(self, *inputs: Tensor, **kwargs: Any) -> Tensor:
        steps = self.flat_steps
        if steps is None:
            return super().multi_step_forward(*inputs, **kwargs)
        return call_flat(super().multi_step_forward, steps, *inputs, **kwargs)

    def steps_per_call(self, x: Tensor) -> int:
        """Time steps held by the input ``x`` of the last call (1 in single-step mode)."""
        if self.step_mode == "s":
            return 1
        return self.flat_steps if self.flat_steps is not None else x.shape[0]
