"""Spiking neurons built on SpikingJelly 2.0's stateful ``MemoryModule``.

* :class:`DelayedIFNode`: the delayed integrate-and-fire (DIF) neuron of CSDformer (METHODS 1.4,
  Algorithm 1). With ``delay >= T - 1`` its spike count equals the LSQ quantizer's level.
* :class:`MTNeuron`: the multi-threshold neuron of ECMT (METHODS 2.1): at most one signed spike
  per step, at one of ``n`` power-of-two levels per sign, reset by subtraction.
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import base
from torch import Tensor, nn

from csdlab.quant.lsq import ActQuantizer
from csdlab.snn.ecmt import TimeFlatModule

__all__ = ["DelayedIFNode", "MTNeuron"]

# integer view and sign+exponent mask per float dtype (clearing the mantissa gives 2^floor(log2 u))
_EXPONENT_MASKS = {torch.float32: (torch.int32, -(1 << 23)), torch.float64: (torch.int64, -(1 << 52)),
                   torch.float16: (torch.int16, -(1 << 10)), torch.bfloat16: (torch.int16, -(1 << 7))}


class DelayedIFNode(base.MemoryModule):
    """Delayed IF neuron (CSDformer Alg. 1); multi-step, inference only.

    ``v = theta/2``; for ``t = 1..T+D``: if ``t <= T``: ``v += I(t)``; if ``t > D``:
    ``s(t-D) = [v >= theta]``, ``v -= theta s(t-D)`` (reset by subtraction). A ``[T, ...]`` input
    gives a ``[T, ...]`` binary spike train; the D extra steps let late input be counted, so for
    ``D >= T-1`` the count is exactly ``clip(floor(sum I / theta + 1/2), 0, T)``.

    Args:
        v_threshold: firing threshold theta (> 0).
        delay: extra integration steps D (>= 0); 0 is the plain IF neuron.
    """

    def __init__(self, v_threshold: float | Tensor, delay: int = 3) -> None:
        super().__init__()
        theta = torch.as_tensor(v_threshold).detach().clone()
        if not theta.is_floating_point():  # keep a float64 threshold float64 (exactness tests)
            theta = theta.to(torch.get_default_dtype())
        if theta.numel() != 1 or not bool(theta > 0):
            raise ValueError(f"v_threshold must be a positive scalar, got {v_threshold!r}")
        if not isinstance(delay, int) or isinstance(delay, bool) or delay < 0:
            raise ValueError(f"delay must be an integer >= 0 (0 = plain IF), got {delay!r}")
        self.delay = delay
        # a buffer, so .double() / .to(device) follow the model and state_dict saves it
        self.register_buffer("v_threshold", theta.reshape(()))
        self.register_memory("v", None)  # materialized as v_threshold / 2 at the first step
        self.step_mode = "m"

    def supported_step_mode(self) -> tuple[str, ...]:
        return ("m",)

    @classmethod
    def from_quantizer(cls, q: ActQuantizer, delay: int = 3) -> DelayedIFNode:
        """The neuron replacing quantizer ``q`` when its input current is ``T x`` the QANN's
        pre-activation (theta = s*L = clip value; METHODS 1.3.2)."""
        return cls(q.threshold.detach(), delay)

    def materialize_states(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                           step_mode: str) -> tuple[Tensor]:
        (v,) = states
        if v is None:
            # initial membrane theta/2 turns truncation into round-half-up
            v = torch.full_like(inputs[0][0], 0.5) * self.v_threshold
        return (v,)

    def multi_step_functional_forward(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                                      **kwargs: object) -> tuple[tuple[Tensor], tuple[Tensor]]:
        x_seq, (v,) = inputs[0], states
        theta = self.v_threshold.to(x_seq.dtype)
        steps = x_seq.shape[0]
        v = v.clone()  # updated in place below; the supplied state must stay untouched
        spikes = torch.empty_like(x_seq)  # [T, ...]: slot t - D is written at step t
        for t in range(steps + self.delay):
            if t < steps:
                v.add_(x_seq[t])
            if t >= self.delay:
                s = spikes[t - self.delay]
                s.copy_(v >= theta)
                v.sub_(s * theta)  # reset by subtraction
        return (spikes,), (v,)

    def extra_repr(self) -> str:
        return f"v_threshold={float(self.v_threshold):.4g}, delay={self.delay}"


class MTNeuron(TimeFlatModule):
    """Multi-threshold neuron of ECMT (docs/methods.md §2.1; paper Eqs. 21-25); single- or multi-step.

    Levels ``th1 * 2^k`` and ``-th2 * 2^k``, ``k = 0..n-1``; membrane ``v`` from 0. Each step
    ``m = v + I``; one spike at the largest ``k`` with ``m >= th1 2^k - th1/2`` (or
    ``-m >= th2 2^k - th2/2``); output ``x = +-th 2^k`` (0 if none); ``v = m - x``. The output is the
    spike already weighted by its level, which is what the paper's parallel parameter normalization
    (Eq. 27) feeds the next layer, so spikes per neuron-step are its non-zero outputs.

    Multi-step (``[T, B, ...]``, or time-flattened ``[T*B, ...]`` with ``flat_steps = T``): only the
    membrane update loops over t, writing each step's spikes straight into the ``[T, ...]`` output.

    With ``count_levels`` on, spikes are also counted per level, from each call's whole output at
    once (one histogram of its sign and exponent bits), in ``spike_counts`` / ``neuron_steps``:
    buffers that outlive :func:`functional.reset_net`, are cleared by :meth:`clear_counts` and are
    not saved in a ``state_dict``.

    Args:
        th1: positive base threshold (> 0).
        th2: negative base threshold magnitude (> 0).
        levels: number of levels per sign n (>= 1).
        count_levels: count spikes per level (off by default: the evaluation counts non-zero
            outputs, :meth:`count_events`).
        inplace: multi-step: write the spikes over a contiguous input current (for an input that
            nothing else reads; saves a ``[T*B, ...]`` tensor), like ``nn.ReLU(inplace=True)``.
    """

    def __init__(self, th1: float = 1.0, th2: float = 1.0, levels: int = 8, count_levels: bool = False,
                 inplace: bool = False) -> None:
        super().__init__()
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
        self.levels = levels
        self.count_levels = count_levels
        self.inplace = inplace
        self.register_buffer("th1", torch.tensor(1.0))
        self.register_buffer("th2", torch.tensor(1.0))
        self.set_thresholds(th1, th2)
        # [p_0..p_{n-1}, m_0..m_{n-1}]: spikes at +th1 2^k, then at -th2 2^k
        self.register_buffer("spike_counts", torch.zeros(2 * levels, dtype=torch.long), persistent=False)
        self.register_buffer("neuron_steps", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_memory("v", None)  # materialized as zeros at the first step
        self.step_mode = "s"

    def supported_step_mode(self) -> tuple[str, ...]:
        return ("s", "m")

    def set_thresholds(self, th1: float | Tensor, th2: float | Tensor) -> None:
        """Set the base thresholds (calibration); both must be > 0."""
        for name, value in (("th1", th1), ("th2", th2)):
            t = torch.as_tensor(value, dtype=torch.float32).detach()
            if t.numel() != 1 or not bool(t > 0) or not bool(torch.isfinite(t)):
                raise ValueError(f"{name} must be a finite scalar > 0, got {value!r}")
            getattr(self, name).copy_(t.reshape(()))

    def clear_counts(self) -> None:
        self.spike_counts.zero_()
        self.neuron_steps.zero_()

    def count_events(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, int]:
        """Spikes (non-zero outputs: at most one per neuron and step) and neuron-steps of the call
        that produced ``output``; counted on the boolean view, ~7x faster than on the floats."""
        return torch.count_nonzero(output.bool()), output.numel()

    def materialize_states(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                           step_mode: str) -> tuple[Tensor]:
        (v,) = states
        if v is None:
            ref = inputs[0] if step_mode == "s" else inputs[0][0]
            v = torch.zeros_like(ref)
        return (v,)

    def _fire(self, m: Tensor, sth: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """Spikes of membrane ``m`` (signed, level-weighted), into ``out`` if given; ``sth``: a
        scratch tensor like ``m``."""
        # signed base threshold of each neuron's side, so m / sth >= 0: +-(th1+th2)/2 + (th1-th2)/2
        # is th1 or -th2 (copysign sends -0.0 to the negative side, where it stays silent);
        # torch.where with scalar operands is several times slower on a CPU
        th1, th2 = self.th1.to(m.dtype), self.th2.to(m.dtype)
        sth = torch.copysign((th1 + th2) * 0.5, m, out=sth).add_((th1 - th2) * 0.5)
        # m >= th 2^k - th/2  <=>  u = m/sth + 1/2 >= 2^k: the level is 2^floor(log2 u), i.e. u with
        # its mantissa bits cleared (exact, and ~3x cheaper than frexp + ldexp); u < 1: no spike.
        # In place on fresh tensors: on a CPU, allocating a large temporary costs as much as the
        # arithmetic
        u = torch.addcdiv(_half(m), m, sth, out=out).clamp_(max=2.0 ** (self.levels - 1))
        int_type, mask = _EXPONENT_MASKS[m.dtype]
        u.view(int_type).bitwise_and_(mask)
        level = nn.functional.threshold_(u, 0.75, 0.0)  # levels are powers of two: 1 passes, 0.5 not
        return level.mul_(sth)

    def _count(self, spikes: Tensor) -> None:
        """Per-level counts of a whole output block: the sign and exponent bits of ``+-th 2^k`` are
        those of ``th`` plus ``k``, so one histogram of them counts every level (silent: 0)."""
        dtype = spikes.dtype
        if dtype not in (torch.float32, torch.float64):
            spikes = spikes.float()  # level-weighted half-precision spikes are exact in float32
        int_type, shift, bins = (torch.int32, 23, 512) if spikes.dtype == torch.float32 else (torch.int64, 52, 4096)
        keys = torch.bitwise_right_shift(spikes.view(int_type), shift).bitwise_and_(bins - 1)  # sign|exponent
        hist = torch.bincount(keys.flatten(), minlength=bins)
        sign = bins // 2
        e1, e2 = (int(torch.bitwise_right_shift(th.to(dtype).to(spikes.dtype).view(int_type), shift))
                  for th in (self.th1, self.th2))
        n = self.levels
        self.spike_counts += torch.cat([hist[e1:e1 + n], hist[sign + e2:sign + e2 + n]]).to(self.spike_counts)
        self.neuron_steps += spikes.numel()

    def single_step_functional_forward(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                                       **kwargs: object) -> tuple[tuple[Tensor], tuple[Tensor]]:
        (v,) = states
        m = v + inputs[0]
        x = self._fire(m)
        if self.count_levels:
            self._count(x)
        return (x,), (m.sub_(x),)  # m is this step's own tensor: it becomes the new membrane

    def multi_step_functional_forward(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                                      **kwargs: object) -> tuple[tuple[Tensor], tuple[Tensor]]:
        (v,), x_seq = states, inputs[0]
        # [T, B, ...], contiguous (the next matrix product needs no copy): step t's spikes go to
        # out[t], after x_seq[t] has been added to the membrane (so out may be x_seq itself)
        if self.inplace and x_seq.is_contiguous():
            out = x_seq
        else:
            out = torch.empty(x_seq.shape, dtype=x_seq.dtype, device=x_seq.device)
        m = v + x_seq[0]  # a fresh membrane: the supplied state stays untouched
        sth = torch.empty_like(m)
        for t in range(x_seq.shape[0]):
            if t:
                m.add_(x_seq[t])
            m.sub_(self._fire(m, sth, out[t]))  # the same operations as single_step_functional_forward
        if self.count_levels:
            self._count(out)
        return (out,), (m,)

    def extra_repr(self) -> str:
        return f"th1={float(self.th1):.4g}, th2={float(self.th2):.4g}, levels={self.levels}"


def _half(m: Tensor) -> Tensor:
    return torch.full((), 0.5, dtype=m.dtype, device=m.device)
