"""Expectation compensation (EC) modules of ECMT (docs/methods.md §2.3; paper Sec. 4.2, Eqs. 15-18).

Both are stateful SpikingJelly 2.0 ``MemoryModule``s, reset by ``functional.reset_net``. Their
defining property is *anytime correctness*: the running mean of their outputs over steps ``1..t``
equals the ANN function of the running mean of their inputs, at every ``t``.

Two step modes, giving the same numbers:

* single-step (``step_mode="s"``): one call per time step on ``[B, ...]`` (streaming input);
* multi-step (``step_mode="m"``): one call for ``T`` steps on ``[T, B, ...]``, or on the
  time-flattened ``[T*B, ...]`` that the Linear layers around them see when ``flat_steps = T``
  (:class:`~csdlab.snn.timeflat.TimeFlatModule`). The running sums are ``T`` additions, then F
  (or the product) runs once on all ``T`` running means. States carry over between calls, so a
  long simulation can be run in chunks of steps.

Energy (docs/methods.md §3): the matrix-product EC counts itself (:meth:`ECMatMul.count_ops`). The
general EC defines no count: the ANN side (a FLOP counter of matmuls and convolutions) does not
count LayerNorm, GELU or softmax either, so both sides leave these element-wise functions out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from csdlab.snn.counting import nonzero_per_row, units_per_row
from csdlab.snn.tdec import cumsum_steps
from csdlab.snn.timeflat import TimeFlatModule

__all__ = ["ECFunction", "ECMatMul", "running_sum", "nonzero_per_step"]


def running_sum(x: Tensor, start: Tensor | None = None, inplace: bool = False) -> Tensor:
    """``S[i] = start + x[0] + ... + x[i]`` along dim 0 (:func:`csdlab.snn.tdec.cumsum_steps`), as a
    new tensor with ``x``'s layout, or in ``x`` itself with ``inplace``."""
    return cumsum_steps(x, out=x if inplace else torch.empty_like(x), start=start)


def nonzero_per_step(x: Tensor, steps: int) -> Tensor:
    """Non-zero entries in each of the ``steps`` equal parts of ``x`` along dim 0 (float64 ``[steps]``):
    :func:`csdlab.snn.counting.nonzero_per_row` of ``x`` itself (counted once per neuron output,
    however many counters ask), summed per step."""
    if x.shape[0] % steps:
        return nonzero_per_row(x.reshape(steps, -1))
    return nonzero_per_row(x).view(steps, -1).sum(1)


def units_per_step(x: Tensor, steps: int) -> Tensor:
    """Unit spikes in each of the ``steps`` equal parts of ``x`` along dim 0 (float64 ``[steps]``):
    the payload counter's record of ``x`` (:func:`csdlab.snn.counting.units_per_row`), or its
    non-zero entries when there is none (binary spikes: one unit each)."""
    units = units_per_row(x)
    if units is None:
        return nonzero_per_step(x, steps)
    return units.view(steps, -1).sum(1) if x.shape[0] % steps == 0 else units.sum().expand(1)


def _check_state(module: TimeFlatModule, t0: int, kept: object) -> None:
    if t0 > 0 and kept is None:
        raise RuntimeError(f"{type(module).__name__} ran with keep_state=False: reset it (functional.reset_net) "
                           f"before simulating more steps")


def _step_column(t0: int, steps: int, like: Tensor, scale: float | None = None) -> Tensor:
    """``[steps, 1, ..., 1]`` tensor of ``t0+1 .. t0+steps`` (or of ``scale / t``) in ``like``'s dtype.

    Made on ``like``'s device (a list copied from the host would synchronise with a GPU at every
    call). Float64 values cast to the tensor dtype: the same rounding as a python scalar operand;
    ``scale / t`` is a true float64 division, as python's (``scale / tensor`` would multiply by
    the reciprocal)."""
    t = torch.arange(t0 + 1, t0 + steps + 1, dtype=torch.float64, device=like.device)
    if scale is not None:
        t = torch.full_like(t, scale).div_(t)
    return t.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


def _differences_(cur: Tensor, prev: Tensor | None) -> Tensor:
    """In place: ``cur[i] -= cur[i-1]`` (backwards), ``cur[0] -= prev``; returns ``cur``."""
    for i in range(cur.shape[0] - 1, 0, -1):
        cur[i].sub_(cur[i - 1])
    if prev is not None:
        cur[0].sub_(prev)
    return cur


class ECFunction(TimeFlatModule):
    """General EC around any function module F (LayerNorm, GELU, softmax, ...), paper Eq. 15.

    ``S(t) = S(t-1) + x(t)``; ``O(t) = t F(S(t)/t) - (t-1) F(S(t-1)/(t-1))``. The second term is the
    first term of the previous step, kept as a memory. Multi-step: all ``S(t)`` by ``T`` additions,
    F once on the ``[T*B, ...]`` running means, and the differences in place.

    Args:
        fn: the ANN module F (kept as ``self.fn``; its parameters are reused, not copied).
        inplace: multi-step: accumulate the running sums in the input tensor (for an input that
            nothing else reads, e.g. the ``fc1`` output before the GELU: saves a ``[T*B, ...]``
            tensor).
    """

    def __init__(self, fn: nn.Module, inplace: bool = False) -> None:
        super().__init__()
        self.fn = fn
        self.inplace = inplace
        self.register_memory("s", None)  # S(t-1), running sum of inputs
        self.register_memory("prev", None)  # (t-1) F(S(t-1)/(t-1))
        self.register_memory("t", 0)
        self.step_mode = "s"

    def supported_step_mode(self) -> tuple[str, ...]:
        return ("s", "m")

    def single_step_functional_forward(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                                       **kwargs: object) -> tuple[tuple[Tensor], tuple[Any, ...]]:
        x, (s, prev, t) = inputs[0], states
        t = t + 1
        s = x if s is None else s + x
        cur = self.fn(s) if t == 1 else self.fn(s / t).mul_(t)  # fn's output is a fresh tensor
        out = cur if prev is None else cur - prev
        return (out,), (s, cur, t)

    def multi_step_functional_forward(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                                      **kwargs: object) -> tuple[tuple[Tensor], tuple[Any, ...]]:
        x, (s, prev, t0) = inputs[0], states
        _check_state(self, t0, s)
        steps = x.shape[0]
        if t0 == 0 and steps == 1:  # the first step alone is F itself (T = 1: the float network)
            cur = self.fn(x.flatten(0, 1)).unflatten(0, (1, -1))
            return (cur,), ((x[0], cur[0]) if self.keep_state else (None, None)) + (1,)
        total = running_sum(x, s, self.inplace)  # [T, B, ...]
        # the state must not keep the whole [T, ...] sum alive
        s_last = total[-1].clone() if self.keep_state else None
        t = _step_column(t0, steps, total)
        # F once on all T running means (F sees [T*B, ...]: any F working on a batch works here)
        means = total.div_(t)
        cur = self.fn(means.flatten(0, 1)).unflatten(0, (steps, -1)).mul_(t)  # t F(S(t)/t)
        last = cur[-1].clone() if self.keep_state else None
        return (_differences_(cur, prev),), (s_last, last, t0 + steps)


class ECMatMul(TimeFlatModule):
    """Matrix-product EC for ``A @ B`` with spike inputs (paper Eqs. 16-18, docs/methods.md §2.3).

    ``S_K(t) = S_K(t-1) + A(t) B(t) + A(t) S_B(t-1) + S_A(t-1) B(t)`` and
    ``O(t) = c S_K(t)/t - c S_K(t-1)/(t-1)``, with an optional constant ``c`` (the attention
    ``scale``) folded into the ``1/t`` factor, so it costs nothing. The recursion telescopes to
    ``S_K(t) = S_A(t) S_B(t)``, which a dense simulator evaluates as one product per step (the ANN
    has one too); multi-step, one batched product of the ``T`` running sums. On event-driven
    hardware the recursion's products with spike matrices are additions: :meth:`count_ops` counts
    them as ACs (Eq. 43) and the level / ``1/t`` scalings as MACs (Eq. 44).

    Args:
        scale: constant ``c`` multiplying the product (``head_dim ** -0.5`` for ``q k^T``).
    """

    synaptic_product = True  # a product of two activations (the spike-driven check)

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
        return ("s", "m")

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

    def multi_step_functional_forward(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                                      **kwargs: object) -> tuple[tuple[Tensor], tuple[Any, ...]]:
        (a, b), (sa, sb, prev, t0) = inputs[:2], states
        _check_state(self, t0, sa)
        steps = a.shape[0]
        if t0 == 0 and steps == 1:  # the first step alone is the product itself
            cur = torch.matmul(a, b) * self.scale
            return (cur,), ((a[0], b[0], cur[0]) if self.keep_state else (None, None, None)) + (1,)
        sum_a, sum_b = running_sum(a, sa), running_sum(b, sb)  # [T, B, ..., n, p], [T, B, ..., p, m]
        cur = torch.matmul(sum_a, sum_b)  # one batched product for all T steps
        cur.mul_(_step_column(t0, steps, cur, self.scale))  # c / t, as single-step
        if self.keep_state:
            states = (sum_a[-1].clone(), sum_b[-1].clone(), cur[-1].clone(), t0 + steps)
        else:
            states = (None, None, None, t0 + steps)
        return (_differences_(cur, prev),), states

    def count_ops(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, Tensor]:
        """Operations of the call just run: ``(MACs, ACs)`` by paper Eqs. 43-44.

        For ``[.., n, p] @ [.., p, m]`` with event fractions ``eta_a``, ``eta_b``: ACs
        ``(eta_a eta_b + eta_a + eta_b) n p m + 3 n m`` (the ``S`` terms vanish at t = 1, leaving
        ``eta_a eta_b n p m + n m``); MACs ``(min(eta_a, eta_b) + eta_a + eta_b) n m`` for the level
        scalings plus ``n m`` for the ``1/t`` scaling.

        Returns:
            0-d float64 tensors after a single-step call; after a multi-step call of ``T`` steps,
            float64 tensors ``[T]`` (one entry per step, event fractions measured per step).
        """
        a, b = inputs[:2]
        n, p, m = a.shape[-2], a.shape[-1], b.shape[-1]
        if self.step_mode == "s":
            batch = output.numel() / (n * m)  # leading (batch, head) dimensions
            # float64 tensors on the device (one call per step: no host synchronisation there)
            eta_a = torch.count_nonzero(a).double() / a.numel()
            eta_b = torch.count_nonzero(b).double() / b.numel()
            first = self.t <= 1
            acs = self._acs(eta_a, eta_b, n, p, m, first)
            macs = (torch.minimum(eta_a, eta_b) * n * m + n * m if first
                    else (torch.minimum(eta_a, eta_b) + eta_a + eta_b) * n * m + n * m)
            return macs * batch, acs * batch
        steps = self.steps_per_call(a)
        batch = output.numel() / (steps * n * m)
        eta_a = nonzero_per_step(a, steps) / (a.numel() / steps)
        eta_b = nonzero_per_step(b, steps) / (b.numel() / steps)
        first = torch.arange(self.t - steps + 1, self.t + 1, device=eta_a.device) <= 1
        low = torch.minimum(eta_a, eta_b)
        macs = torch.where(first, low * n * m + n * m, (low + eta_a + eta_b) * n * m + n * m)
        return macs * batch, self._acs(eta_a, eta_b, n, p, m, first) * batch

    def count_spike_acs(self, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """The ACs of :meth:`count_ops` under the unit-spike rule: the event fractions replaced by
        unit spikes per entry (a spike at level ``2^k`` is ``2^k`` additions, :func:`units_per_step`)."""
        a, b = inputs[:2]
        n, p, m = a.shape[-2], a.shape[-1], b.shape[-1]
        if self.step_mode == "s":
            u_a, u_b = (units_per_step(v, 1)[0] / v.numel() for v in (a, b))
            return self._acs(u_a, u_b, n, p, m, self.t <= 1) * (output.numel() / (n * m))
        steps = self.steps_per_call(a)
        u_a = units_per_step(a, steps) / (a.numel() / steps)
        u_b = units_per_step(b, steps) / (b.numel() / steps)
        first = torch.arange(self.t - steps + 1, self.t + 1, device=u_a.device) <= 1
        return self._acs(u_a, u_b, n, p, m, first) * (output.numel() / (steps * n * m))

    @staticmethod
    def _acs(da: Tensor, db: Tensor, n: int, p: int, m: int, first: Tensor | bool) -> Tensor:
        """Eq. 43's ACs for operand densities ``da``, ``db`` (events per entry: the per-event rule;
        unit spikes per entry: the unit-spike rule, a spike of level ``2^k`` being ``2^k`` additions)."""
        later = (da * db + da + db) * n * p * m + 3 * n * m
        if isinstance(first, bool):
            return da * db * n * p * m + n * m if first else later
        return torch.where(first, da * db * n * p * m + n * m, later)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"
