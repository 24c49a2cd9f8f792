"""Temporal decomposition (TDEC) of CSDformer's nonlinear operators on spike trains (docs/methods.md §1.3).

For an operator ``F`` of running sums ``S_t = sum_{i<=t} x_i`` the output at step t is
``y_t = F(S_t) - F(S_{t-1})``, so ``sum_t y_t = F(S_T)``: the operator applied to spike counts.

* :class:`TDECMaxPool2d`: ``y_t = MP(S_t) - MP(S_{t-1})`` is again binary (a spike train).
* :class:`TDECMatMul`: ``P_t = A_t B_t + A_t S^B_{t-1} + S^A_{t-1} B_t`` for two binary trains;
  binary x integer products need additions only (ACs).

Both are multi-step: they take whole ``[T, ...]`` trains and keep no state between calls. Both
evaluate ``F`` on ``S_1..S_T`` only (``F(S_0) = F(0) = 0``) and take differences step by step: no
concatenated zero step, one pass per running sum (``torch.cumsum`` over dim 0 costs several on a
CPU). Every value is a small integer, so the order of the arithmetic cannot change a result.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csdlab.snn.counting import count_spikes

__all__ = ["TDECMaxPool2d", "TDECMatMul", "cumsum_steps", "difference_steps", "difference_steps_"]


def cumsum_steps(x_seq: Tensor, out: Tensor | None = None, start: Tensor | None = None) -> Tensor:
    """``S_t = start + sum_{i<=t} x_i`` over dim 0, ``[T, ...] -> [T, ...]``: one add per step into
    ``out`` (a new contiguous tensor by default; ``out`` may be ``x_seq`` itself). The same
    additions, in the same order, as a single-step module adding one input per step, so the result
    is bit-identical to it (``torch.cumsum`` accumulates float32 in float64 on a CPU)."""
    if out is None:
        out = torch.empty_like(x_seq, memory_format=torch.contiguous_format)
    if start is not None:
        torch.add(start, x_seq[0], out=out[0])
    elif out is not x_seq:
        out[0].copy_(x_seq[0])
    for t in range(1, x_seq.shape[0]):
        torch.add(out[t - 1], x_seq[t], out=out[t])
    return out


def difference_steps(y: Tensor) -> Tensor:
    """``y_1, y_2 - y_1, ..., y_T - y_{T-1}`` over dim 0 into a new contiguous tensor."""
    out = torch.empty_like(y, memory_format=torch.contiguous_format)
    out[0].copy_(y[0])
    for t in range(1, y.shape[0]):
        torch.sub(y[t], y[t - 1], out=out[t])
    return out


def difference_steps_(y: Tensor) -> Tensor:
    """``y_t -= y_{t-1}`` for ``t = T..2`` over dim 0, in place (``y_1`` stays): running values back to
    per-step increments. Returns ``y``."""
    for t in range(y.shape[0] - 1, 0, -1):  # backwards: y_{t-1} is still the running value
        y[t].sub_(y[t - 1])
    return y


class TDECMaxPool2d(nn.Module):
    """Max-pool of a spike train by temporal decomposition: ``y_t = MP(S_t) - MP(S_{t-1})``.

    Counts only grow and max-pool is monotone, so each ``y_t`` is 0 or 1 and
    ``sum_t y_t = MP(sum_t x_t)``.

    Args:
        kernel_size: pooling window.
        stride: pooling stride.
        padding: implicit padding (never wins the max: counts are >= 0).
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding

    @classmethod
    def from_module(cls, mp: nn.MaxPool2d) -> TDECMaxPool2d:
        """Same window as ``mp``; dilation, ceil_mode and indices have no TDEC form here."""
        if mp.dilation not in (1, (1, 1)) or mp.ceil_mode or mp.return_indices:
            raise ValueError(f"TDEC max-pool supports dilation=1, ceil_mode=False, no indices; got {mp}")
        return cls(mp.kernel_size, mp.stride, mp.padding)

    def forward(self, x_seq: Tensor) -> Tensor:
        """``[T, B, C, H, W]`` spikes -> ``[T, B, C, H', W']`` spikes."""
        steps = x_seq.shape[0]
        # S_1..S_T written straight into channels-last memory on a CPU, where max-pool runs about
        # 3x faster on it than on NCHW (measured, torch 2.14); the output is NCHW again
        layout = torch.channels_last if x_seq.device.type == "cpu" else torch.contiguous_format
        counts = torch.empty(x_seq.flatten(0, 1).shape, dtype=x_seq.dtype, device=x_seq.device,
                             memory_format=layout).unflatten(0, (steps, -1))  # [T, B, C, H, W]
        cumsum_steps(x_seq, out=counts)
        pooled = F.max_pool2d(counts.flatten(0, 1), self.kernel_size, self.stride, self.padding)
        # MP(S_0) = 0 (padding never wins against counts >= 0), so y_1 = MP(S_1)
        return difference_steps(pooled.unflatten(0, (steps, -1)))  # [T, B, C, H', W']

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class TDECMatMul(nn.Module):
    """Product of two spike trains by temporal decomposition (docs/methods.md §1.3.4).

    ``P_t = S^A_t S^B_t - S^A_{t-1} S^B_{t-1} = A_t B_t + A_t S^B_{t-1} + S^A_{t-1} B_t`` and
    ``sum_t P_t = (sum_t A_t)(sum_t B_t)``. ``P_t`` is an integer; the constant scale of the
    ANN product is absorbed into the next neuron's threshold, so none is applied here.

    The simulation evaluates the telescoped form (one product per step instead of three; exact,
    because every entry is an integer far below 2^24); :meth:`count_ops` counts the additions the
    three-term form costs on event-driven hardware.
    """

    synaptic_product = True  # a product of two activations (the spike-driven check)

    def forward(self, a_seq: Tensor, b_seq: Tensor) -> Tensor:
        """``[T, ..., n, k]`` x ``[T, ..., k, m]`` binary trains -> ``[T, ..., n, m]`` integers."""
        prod = cumsum_steps(a_seq) @ cumsum_steps(b_seq)  # [T, ..., n, m] = S^A_t S^B_t, t = 1..T
        return difference_steps_(prod)  # S^A_0 S^B_0 = 0, so P_1 = S^A_1 S^B_1

    @classmethod
    def from_module(cls, mm: nn.Module) -> TDECMatMul:
        """Replaces a model's ``MatMul`` (its scale goes into a neuron threshold, not here)."""
        return cls()

    @staticmethod
    def count_ops(inputs: tuple[Any, ...], output: Tensor) -> tuple[float, Tensor]:
        """ACs of the three-term form, summed over steps: every event of ``A_t`` is added into a
        row of ``B_t`` and of ``S^B_{t-1}`` (fan-out m each); every event of ``B_t`` adds a column
        of ``S^A_{t-1}`` (fan-out n). No multiplications."""
        a_seq, b_seq = inputs[0], inputs[1]
        n, m = a_seq.shape[-2], b_seq.shape[-1]
        # binary trains: the sum is the event count (count_spikes: exact, far cheaper than count_nonzero);
        # a float64 tensor on the trains' device (no host synchronisation per layer)
        events_a = count_spikes(a_seq)
        # S^A_0 = 0, so B's events at the first step add nothing
        events_b = count_spikes(b_seq[1:])
        return 0.0, events_a * (2.0 * m) + events_b * n
