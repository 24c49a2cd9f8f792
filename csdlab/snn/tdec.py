"""Temporal decomposition (TDEC) of CSDformer's nonlinear operators on spike trains (METHODS 1.3.4).

For an operator ``F`` of running sums ``S_t = sum_{i<=t} x_i`` the output at step t is
``y_t = F(S_t) - F(S_{t-1})``, so ``sum_t y_t = F(S_T)``: the operator applied to spike counts.

* :class:`TDECMaxPool2d`: ``y_t = MP(S_t) - MP(S_{t-1})`` is again binary (a spike train).
* :class:`TDECMatMul`: ``P_t = A_t B_t + A_t S^B_{t-1} + S^A_{t-1} B_t`` for two binary trains;
  binary x integer products need additions only (ACs).

Both are multi-step: they take whole ``[T, ...]`` trains and keep no state between calls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TDECMaxPool2d", "TDECMatMul", "running_sum"]


def running_sum(x_seq: Tensor) -> Tensor:
    """``S_t = sum_{i<=t} x_i`` over dim 0, with ``S_0 = 0`` prepended: ``[T, ...] -> [T+1, ...]``."""
    return torch.cat([torch.zeros_like(x_seq[:1]), x_seq.cumsum(0)])


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
        counts = running_sum(x_seq)  # [T+1, B, C, H, W], S_0 = 0
        pooled = F.max_pool2d(counts.flatten(0, 1), self.kernel_size, self.stride, self.padding)
        pooled = pooled.unflatten(0, counts.shape[:2])  # [T+1, B, C, H', W']
        return pooled[1:] - pooled[:-1]

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class TDECMatMul(nn.Module):
    """Product of two spike trains by temporal decomposition (METHODS 1.3.4).

    ``P_t = S^A_t S^B_t - S^A_{t-1} S^B_{t-1} = A_t B_t + A_t S^B_{t-1} + S^A_{t-1} B_t`` and
    ``sum_t P_t = (sum_t A_t)(sum_t B_t)``. ``P_t`` is an integer; the constant scale of the
    ANN product is absorbed into the next neuron's threshold, so none is applied here.

    The simulation evaluates the telescoped form (one product per step instead of three; exact,
    because every entry is an integer far below 2^24); :meth:`count_ops` counts the additions the
    three-term form costs on event-driven hardware.
    """

    def forward(self, a_seq: Tensor, b_seq: Tensor) -> Tensor:
        """``[T, ..., n, k]`` x ``[T, ..., k, m]`` binary trains -> ``[T, ..., n, m]`` integers."""
        prod = running_sum(a_seq) @ running_sum(b_seq)  # [T+1, ..., n, m] = S^A_t S^B_t
        return prod[1:] - prod[:-1]

    @classmethod
    def from_module(cls, mm: nn.Module) -> TDECMatMul:
        """Replaces a model's ``MatMul`` (its scale goes into a neuron threshold, not here)."""
        return cls()

    @staticmethod
    def count_ops(inputs: tuple[Any, ...], output: Tensor) -> tuple[float, float]:
        """ACs of the three-term form, summed over steps: every event of ``A_t`` is added into a
        row of ``B_t`` and of ``S^B_{t-1}`` (fan-out m each); every event of ``B_t`` adds a column
        of ``S^A_{t-1}`` (fan-out n). No multiplications."""
        a_seq, b_seq = inputs[0], inputs[1]
        n, m = a_seq.shape[-2], b_seq.shape[-1]
        events_a = float(torch.count_nonzero(a_seq))
        # S^A_0 = 0, so B's events at the first step add nothing
        events_b = float(torch.count_nonzero(b_seq[1:]))
        return 0.0, 2.0 * events_a * m + events_b * n
