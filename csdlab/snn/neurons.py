"""Spiking neurons built on SpikingJelly 2.0's stateful ``MemoryModule``.

* :class:`DelayedIFNode`: the delayed integrate-and-fire (DIF) neuron of CSDformer (docs/methods.md §1.4,
  Algorithm 1). With ``delay >= T - 1`` its spike count equals the LSQ quantizer's level.
* :class:`MTNeuron`: the multi-threshold neuron of ECMT (docs/methods.md §2.1): at most one signed spike
  per step, at one of ``n`` power-of-two levels per sign, reset by subtraction.
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import base
from torch import Tensor, nn

from csdlab.compiling import CompiledKernel
from csdlab.quant.lsq import ActQuantizer
from csdlab.snn.counting import bincount_below, count_spikes, nonzero_per_row, record_nonzero_rows
from csdlab.snn.timeflat import TimeFlatModule

__all__ = ["DelayedIFNode", "MTNeuron", "check_initial_membrane"]

# integer view and sign+exponent mask per float dtype (clearing the mantissa gives 2^floor(log2 u))
_EXPONENT_MASKS = {torch.float32: (torch.int32, -(1 << 23)), torch.float64: (torch.int64, -(1 << 52)),
                   torch.float16: (torch.int16, -(1 << 10)), torch.bfloat16: (torch.int16, -(1 << 7))}


def _host_scalars(x: Tensor) -> bool:
    """Whether a neuron may read a 0-d tensor on the host as a Python scalar (free on the CPU, a
    synchronisation on a GPU)."""
    return x.device.type == "cpu"


class DelayedIFNode(base.MemoryModule):
    """Delayed IF neuron (CSDformer Alg. 1, docs/methods.md §1.4); multi-step, inference only.

    ``v = theta/2``; for ``t = 1..T+D``: if ``t <= T``: ``v += I(t)``; if ``t > D``:
    ``s(t-D) = [v >= theta]``, ``v -= theta s(t-D)`` (reset by subtraction). A ``[T, ...]`` input
    gives a ``[T, ...]`` binary spike train; the D extra steps let late input be counted, so for
    ``D >= T-1`` the count is exactly ``clip(floor(sum I / theta + 1/2), 0, T)``.

    Speed: a fresh sequence on a large input (at least ``2^16`` neurons) runs as one
    ``torch.compile``-d loop over all T + D steps (:mod:`csdlab.compiling`; eager fallback, off
    with ``CSDLAB_COMPILE=0``); otherwise three in-place passes per step (add, compare into the
    output slot, subtract the spike times theta). Both perform Algorithm 1's arithmetic operation
    for operation, so every spike and the final membrane equal a literal step-by-step simulation
    bit for bit (``tests/snn/test_dif_speedpath.py`` checks it, exact ties included).

    Args:
        v_threshold: firing threshold theta (> 0).
        delay: extra integration steps D (>= 0); 0 is the plain IF neuron.
        compile_kernel: ``None`` (default): compiled loop from ``2^16`` neurons up (smaller inputs
            do not repay the first call's compile time); ``True`` / ``False``: always / never.
    """

    #: neurons per step from which ``compile_kernel=None`` uses the compiled loop
    COMPILE_MIN_NEURONS = 1 << 16

    def __init__(self, v_threshold: float | Tensor, delay: int = 3, compile_kernel: bool | None = None) -> None:
        super().__init__()
        theta = torch.as_tensor(v_threshold).detach().clone()
        if not theta.is_floating_point():  # keep a float64 threshold float64 (exactness tests)
            theta = theta.to(torch.get_default_dtype())
        if theta.numel() != 1 or not bool(theta > 0):
            raise ValueError(f"v_threshold must be a positive scalar, got {v_threshold!r}")
        if not isinstance(delay, int) or isinstance(delay, bool) or delay < 0:
            raise ValueError(f"delay must be an integer >= 0 (0 = plain IF), got {delay!r}")
        self.delay = delay
        self.compile_kernel = compile_kernel  # a speed switch, not state: never saved
        # a buffer, so .double() / .to(device) follow the model and state_dict saves it
        self.register_buffer("v_threshold", theta.reshape(()))
        self.register_memory("v", None)  # None: a fresh sequence, membrane theta/2 before step 1
        self.step_mode = "m"

    def supported_step_mode(self) -> tuple[str, ...]:
        return ("m",)

    @classmethod
    def from_quantizer(cls, q: ActQuantizer, delay: int = 3) -> DelayedIFNode:
        """The neuron replacing quantizer ``q`` when its input current is ``T x`` the QANN's
        pre-activation (theta = s*L = clip value; docs/methods.md §1.3)."""
        return cls(q.threshold.detach(), delay)

    def materialize_states(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                           step_mode: str) -> tuple[object]:
        # a fresh membrane stays None: the forward starts it as I(1) + theta/2 in one pass
        return states

    @staticmethod
    def _simulate_fresh(x_seq: Tensor, theta: Tensor, delay: int) -> tuple[Tensor, Tensor]:
        """Algorithm 1 from ``v = theta/2`` on ``[T, N]`` currents: ``(spikes [T, N], final v [N])``.
        Out of place, so ``torch.compile`` fuses it into one loop (the reference of the kernel)."""
        steps = x_seq.shape[0]
        v = x_seq[0] + theta * 0.5  # IEEE addition commutes: the literal v = theta/2; v += I(1)
        spikes = []
        for t in range(steps + delay):
            if 0 < t < steps:
                v = v + x_seq[t]
            if t >= delay:
                s = (v >= theta).to(x_seq.dtype)
                v = v - s * theta  # s * theta is theta or 0 exactly
                spikes.append(s)
        return torch.stack(spikes), v

    _kernel = CompiledKernel(_simulate_fresh.__func__)

    def _use_kernel(self, x_seq: Tensor) -> bool:
        if self.compile_kernel is None:
            return x_seq[0].numel() >= self.COMPILE_MIN_NEURONS
        return self.compile_kernel

    def multi_step_functional_forward(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                                      **kwargs: object) -> tuple[tuple[Tensor], tuple[Tensor]]:
        x_seq, (v,) = inputs[0], states
        theta_t = self.v_threshold.to(x_seq.dtype)
        steps = x_seq.shape[0]
        if v is None and self._use_kernel(x_seq) and self._kernel.usable:
            # flattened: one dynamic dimension, so every layer's size shares the compiled graph
            spikes, v = self._kernel(x_seq.reshape(steps, -1), theta_t, self.delay)
            return (spikes.view(x_seq.shape),), (v.view(x_seq.shape[1:]),)
        # a Python float holds every float32 / float64 value exactly: theta * s (s in {0, 1}) is
        # theta or 0 exactly, as in Algorithm 1's v -= theta * s. Off the CPU, reading theta on the
        # host would synchronise at every call: v -= s * theta with the device tensor (addcmul; the
        # product is exact, so the same bits)
        theta = float(theta_t) if _host_scalars(x_seq) else None
        # the membrane after step 1's input, as a new tensor (updated in place below; a supplied
        # state stays untouched). theta/2 + I(1): IEEE addition is commutative, so this is the
        # literal v = theta/2; v += I(1)
        v = x_seq[0] + theta_t * 0.5 if v is None else v + x_seq[0]  # type: ignore[operator]
        spikes = torch.empty_like(x_seq)  # [T, ...]: slot t - D is written at step t
        for t in range(steps + self.delay):
            if 0 < t < steps:
                v.add_(x_seq[t])
            if t >= self.delay:
                s = spikes[t - self.delay]
                torch.ge(v, theta_t, out=s)  # 1.0 / 0.0 straight into the output slot
                if theta is not None:
                    v.sub_(s, alpha=theta)  # reset by subtraction
                else:
                    v.addcmul_(s, theta_t, value=-1.0)
        return (spikes,), (v,)

    def count_events(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, int]:
        """Spikes and neuron-steps of one call (the evaluation's firing counter calls this): the
        output is binary, so its sum is the spike count (:func:`count_spikes`, exact, about 30x
        cheaper than ``count_nonzero`` on a CPU)."""
        return count_spikes(output), output.numel()

    def extra_repr(self) -> str:
        return f"v_threshold={float(self.v_threshold):.4g}, delay={self.delay}"


def check_initial_membrane(value: float) -> float:
    """``value`` as a float if it is a valid MT initial membrane (a fraction of ``th1`` in ``[0, 1)``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"initial_membrane is a fraction of the threshold th1 in [0, 1) (0: the paper's start, "
                         f"0.5: half a threshold), got {value!r}")
    return float(value)


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
        nearest_level: fire the level nearest to ``m`` (docs/methods.md §2.5): level ``k >= 1`` from
            ``m >= 0.75 th 2^k`` (midway between ``th 2^(k-1)`` and ``th 2^k``), level 0 from
            ``m >= th/2`` as before; False: the paper's Eq. 25 (``m >= th 2^k - th/2``), which for
            ``m >> th`` keeps the level below ``m`` and so under-reports large values at t = 1.
        initial_membrane: the membrane starts at ``initial_membrane * th1`` instead of 0 (in
            ``[0, 1)``; 0.5 is the half-threshold start of IF conversion, which the MT firing rule
            already contains as its ``-th/2`` offset: docs/methods.md §2.5).
    """

    def __init__(self, th1: float = 1.0, th2: float = 1.0, levels: int = 8, count_levels: bool = False,
                 inplace: bool = False, nearest_level: bool = False, initial_membrane: float = 0.0) -> None:
        super().__init__()
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
        self.levels = levels
        self.nearest_level = bool(nearest_level)
        self.initial_membrane = check_initial_membrane(initial_membrane)
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

    def spike_alphabet(self, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """``0``, ``th1 2^k`` and ``-th2 2^k`` (``k < levels``) as :meth:`_fire` computes them in
        ``dtype`` (the spike-driven check verifies outputs against it)."""
        half_sum, half_diff, _ = self._constants(torch.empty((), dtype=dtype, device=device))
        powers = torch.exp2(torch.arange(self.levels, dtype=dtype, device=device))
        zero = torch.zeros(1, dtype=dtype, device=device)
        return torch.cat([zero, powers * (half_sum + half_diff), powers * (-half_sum + half_diff)])

    def spike_units(self, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """Unit spikes per output entry (the payload counter, :class:`csdlab.eval.api.PayloadSource`):
        ``+-2^k`` for a spike at level k (``th 2^k`` is ``2^k`` spikes of the base threshold), 0 for
        silence."""
        th1, th2 = self.th1.to(output.dtype), self.th2.to(output.dtype)
        return torch.where(output >= 0, output / th1, output / th2).round_()

    def count_events(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, int]:
        """Spikes (non-zero outputs: at most one per neuron and step) and neuron-steps of the call
        that produced ``output``. A multi-step output is counted once, per row, for every counter
        that asks (this one and the op counter of the layer it feeds)."""
        return nonzero_per_row(output).sum(), output.numel()

    def materialize_states(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                           step_mode: str) -> tuple[Tensor | None]:
        (v,) = states
        if v is None and step_mode == "s":
            v = torch.zeros_like(inputs[0])
            if self.initial_membrane:
                v.add_(self._initial(v))
        return (v,)  # multi-step starts a fresh membrane itself (no tensor of zeros to fill)

    def _initial(self, like: Tensor) -> Tensor:
        """The initial membrane ``initial_membrane * th1`` as a 0-d tensor in ``like``'s dtype."""
        return self.th1.to(like.dtype) * self.initial_membrane

    def multi_step_forward(self, *inputs: Tensor, **kwargs: object) -> Tensor:
        out = super().multi_step_forward(*inputs, **kwargs)
        # the spikes are final: the firing counter and the next layer's op counter share one count
        record_nonzero_rows(out)
        return out

    def _constants(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``((th1+th2)/2, (th1-th2)/2, 1/2)`` as 0-d tensors in ``like``'s dtype and device, made
        once per call (per step, these small tensor operations cost as much as the update of a
        small layer)."""
        th1, th2 = self.th1.to(like.dtype), self.th2.to(like.dtype)
        return (th1 + th2) * 0.5, (th1 - th2) * 0.5, torch.full((), 0.5, dtype=like.dtype, device=like.device)

    def _fire(self, m: Tensor, sth: Tensor | None = None, out: Tensor | None = None,
              constants: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """Spikes of membrane ``m`` (signed, level-weighted), into ``out`` if given; ``sth``: a
        scratch tensor like ``m``; ``constants``: :meth:`_constants` of ``m``."""
        half_sum, half_diff, half = constants if constants is not None else self._constants(m)
        # signed base threshold of each neuron's side, so m / sth >= 0: +-(th1+th2)/2 + (th1-th2)/2
        # is th1 or -th2 (copysign sends -0.0 to the negative side, where it stays silent);
        # torch.where with scalar operands is several times slower on a CPU
        sth = torch.copysign(half_sum, m, out=sth).add_(half_diff)
        if self.nearest_level:
            # w = m/sth; level k >= 1 from w >= 0.75 2^k  <=>  4w/3 >= 2^k; level 0 from w >= 1/2:
            # u = max(4w/3, min(2w, 1)) is >= 1 exactly when w >= 1/2 and >= 2^k (k >= 1) exactly
            # when 4w/3 is, so clearing its mantissa bits gives the nearest level (as below)
            u = torch.div(m, sth, out=out)
            low = torch.mul(u, 2.0).clamp_(max=1.0)
            u = torch.maximum(u.mul_(4.0 / 3.0), low, out=u).clamp_(max=2.0 ** (self.levels - 1))
        else:
            # m >= th 2^k - th/2  <=>  u = m/sth + 1/2 >= 2^k: the level is 2^floor(log2 u), i.e. u
            # with its mantissa bits cleared (exact, and ~3x cheaper than frexp + ldexp); u < 1: no
            # spike. In place on fresh tensors: on a CPU, allocating a large temporary costs as much
            # as the arithmetic
            u = torch.addcdiv(half, m, sth, out=out).clamp_(max=2.0 ** (self.levels - 1))
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
        hist = bincount_below(keys, bins)
        sign = bins // 2
        # the bins of both thresholds' levels, found on the device (no host synchronisation per call)
        th = torch.stack([self.th1, self.th2]).to(dtype).to(spikes.dtype).view(int_type)
        e1, e2 = torch.bitwise_right_shift(th, shift).unbind()
        levels = torch.arange(self.levels, device=hist.device)
        bins_at = torch.cat([e1 + levels, sign + e2 + levels])
        self.spike_counts += hist.index_select(0, bins_at).to(self.spike_counts)
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
        # a new tensor: a supplied state stays untouched; a fresh membrane is 0 + I(1) (-0.0 becomes
        # +0.0, exactly as single-step's zeros + I(1))
        m = x_seq[0] + 0.0 if v is None else v + x_seq[0]
        if v is None and self.initial_membrane:
            m.add_(self._initial(m))  # I(1) + v(0): single-step's v(0) + I(1) (addition commutes exactly)
        sth, constants = torch.empty_like(m), self._constants(m)
        for t in range(x_seq.shape[0]):
            if t:
                m.add_(x_seq[t])
            m.sub_(self._fire(m, sth, out[t], constants))  # the same operations as single-step
        if self.count_levels:
            self._count(out)
        return (out,), (m,)

    def extra_repr(self) -> str:
        extra = (", nearest_level=True" if self.nearest_level else "") + (
            f", initial_membrane={self.initial_membrane:g}" if self.initial_membrane else "")
        return f"th1={float(self.th1):.4g}, th2={float(self.th2):.4g}, levels={self.levels}{extra}"

