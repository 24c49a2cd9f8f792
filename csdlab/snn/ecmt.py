"""Expectation compensation (EC) modules of ECMT (METHODS 2.3; paper Sec. 4.2, Eqs. 15-18).

Both are single-step stateful modules (SpikingJelly 2.0 ``MemoryModule``), reset by
``functional.reset_net``. Their defining property is *anytime correctness*: the running mean of
their outputs over steps ``1..t`` equals the ANN function of the running mean of their inputs, at
every ``t``.

Energy (METHODS 3): the matrix-product EC counts itself (:meth:`ECMatMul.count_ops`). The general
EC defines no count: the ANN side (``ann_macs``, a FLOP counter of matmuls and convolutions) does
not count LayerNorm, GELU or softmax either, so both sides leave these element-wise functions out.
"""

from __future__ import annotations

from typing import Any

import torch
from spikingjelly.activation_based import base
from torch import Tensor, nn

__all__ = ["ECFunction", "ECMatMul"]


class ECFunction(base.MemoryModule):
    """General EC around any function module F (LayerNorm, GELU, softmax, ...), paper Eq. 15.

    ``S(t) = S(t-1) + x(t)``; ``O(t) = t F(S(t)/t) - (t-1) F(S(t-1)/(t-1))``. The second term is the
    first term of the previous step, kept as a memory, so a step costs one add, one scaling in,
    one F, one scaling out and one subtraction.

    Args:
        fn: the ANN module F (kept as ``self.fn``; its parameters are reused, not copied).
    """

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.register_memory("s", None)  # S(t-1), running sum of inputs
        self.register_memory("prev", None)  # (t-1) F(S(t-1)/(t-1))
        self.register_memory("t", 0)
        self.step_mode = "s"

    def supported_step_mode(self) -> tuple[str, ...]:
        return ("s",)

    def single_step_functional_forward(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                                       **kwargs: object) -> tuple[tuple[Tensor], tuple[Any, ...]]:
        x, (s, prev, t) = inputs[0], states
        t = t + 1
        s = x if s is None else s + x
        cur = self.fn(s) if t == 1 else self.fn(s / t).mul_(t)  # fn's output is a fresh tensor
        out = cur if prev is None else cur - prev
        return (out,), (s, cur, t)


class ECMatMul(base.MemoryModule):
    """Matrix-product EC for ``A @ B`` with spike inputs (paper Eqs. 16-18, METHODS 2.3).

    ``S_K(t) = S_K(t-1) + A(t) B(t) + A(t) S_B(t-1) + S_A(t-1) B(t)`` and
    ``O(t) = c S_K(t)/t - c S_K(t-1)/(t-1)``, with an optional constant ``c`` (the attention
    ``scale``) folded into the ``1/t`` factor, so it costs nothing. The recursion telescopes to
    ``S_K(t) = S_A(t) S_B(t)``, which a dense simulator evaluates as one product per step (the ANN
    has one too); on event-driven hardware the recursion's products with spike matrices are
    additions: :meth:`count_ops` counts them as ACs (Eq. 43) and the level / ``1/t`` scalings as
    MACs (Eq. 44).

    Args:
        scale: constant ``c`` multiplying the product (``head_dim ** -0.5`` for ``q k^T``).
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.register_memory("sa", None)  # S_A(t-1)
        self.register_memory("sb", None)  # S_B(t-1)
        # c S_K(t-1) / (t-1); S_K itself need not be kept, it is S_A S_B
        self.register_memory("prev", None)
        self.register_memory("t", 0)
        self.step_mode = "s"

    def supported_step_mode(self) -> tuple[str, ...]:
        return ("s",)

    def single_step_functional_forward(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                                       **kwargs: object) -> tuple[tuple[Tensor], tuple[Any, ...]]:
        (a, b), (sa, sb, prev, t) = inputs[:2], states
        t = t + 1
        if t == 1:
            cur = (a @ b) * self.scale
            return (cur,), (a, b, cur, t)
        sa, sb = sa + a, sb + b
        # S_K(t) = S_K(t-1) + A B + A S_B(t-1) + S_A(t-1) B (Eq. 17-18) telescopes to S_A(t) S_B(t):
        # one dense product per step here; count_ops charges the event-driven form of Eq. 18
        cur = (sa @ sb) * (self.scale / t)
        return (cur - prev,), (sa, sb, cur, t)

    def count_ops(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[float, float]:
        """Operations of the step just run: ``(MACs, ACs)`` by paper Eqs. 43-44.

        For ``[.., n, p] @ [.., p, m]`` with event fractions ``eta_a``, ``eta_b``: ACs
        ``(eta_a eta_b + eta_a + eta_b) n p m + 3 n m`` (the ``S`` terms vanish at t = 1, leaving
        ``eta_a eta_b n p m + n m``); MACs ``(min(eta_a, eta_b) + eta_a + eta_b) n m`` for the level
        scalings plus ``n m`` for the ``1/t`` scaling.
        """
        a, b = inputs[:2]
        n, p, m = a.shape[-2], a.shape[-1], b.shape[-1]
        batch = output.numel() / (n * m)  # leading (batch, head) dimensions
        eta_a = float(torch.count_nonzero(a)) / a.numel()
        eta_b = float(torch.count_nonzero(b)) / b.numel()
        if self.t <= 1:
            acs = eta_a * eta_b * n * p * m + n * m
            macs = min(eta_a, eta_b) * n * m + n * m
        else:
            acs = (eta_a * eta_b + eta_a + eta_b) * n * p * m + 3 * n * m
            macs = (min(eta_a, eta_b) + eta_a + eta_b) * n * m + n * m
        return macs * batch, acs * batch

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"
