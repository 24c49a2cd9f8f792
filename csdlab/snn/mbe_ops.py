"""Transformer operations built from MBE neurons (docs/methods.md §4.3).

* :class:`MBEProduct`: product of two activations (element-wise or matrix), each operand encoded by
  an MBE neuron (identity neurons for ``q k^T``, ``attn v``): ``x1 x2 ~ sum_ij D_ij s(i) s'(j)`` with
  ``D = d d'^T``, an AND of binary trains weighted by a constant matrix. ``D`` is separable, so the
  dense simulator computes it as the product of the two reconstructions; :meth:`count_ops` counts
  the AND events (one AC each).
* :class:`MBESoftmax`: row max subtracted, ``e^x = 2^floor(y) 2^frac(y)`` with ``y = x log2 e``; the
  integer power is an exponent add, ``2^frac`` comes from the ``exp2`` neuron; the row sum is an
  accumulation; ``1/sum`` from ``sum = M 2^E`` (``torch.frexp``, ``M`` in ``[0.5, 1)``) as
  ``recip(M) 2^-E``; the numerator times ``1/sum`` is a spiking product of the two neurons' trains.
* :class:`MBELayerNorm`: mean by accumulation; ``x - mu`` encoded by an identity neuron; variance =
  mean of its square (a spiking product of the train with itself); ``var + eps = M 2^E`` with ``E``
  made even (``M`` in ``[0.5, 2)``), ``1/sqrt`` as ``rsqrt(M) 2^(-E/2)``; ``(x - mu)`` times it by a
  spiking product; then the ANN's affine ``gamma, beta``.
* :class:`MBELinear`: a ``Linear`` fed by an MBE neuron's spikes (identity, or the GELU neuron):
  energy = spike events x fan-out.
* GELU is one :class:`~csdlab.snn.mbe.MBENeuron` (``gelu`` code).

Energy conventions (docs/methods.md §3, §4.4): each spike costs one AC in its own neuron
(``T N eta E_AC``); a product adds one AC per AND event; a linear layer one AC per event and output;
exponent adds (integer additions on the exponent field), the row max and the ``gamma, beta``
affine are not counted (the ANN side counts no element-wise work either).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from csdlab.snn.counting import counting_active
from csdlab.snn.mbe import MBECode, MBENeuron

__all__ = ["MBEProduct", "MBESoftmax", "MBELayerNorm", "MBELinear", "ANDProduct", "and_events"]

LOG2E = 1.0 / math.log(2.0)


def _exp2_is_exact() -> bool:
    # torch.ldexp(x, e) is x * pow(2, e), and pow with a scalar base runs one element at a time on
    # the CPU (5x the vectorised exp2). exp2 of an integer is exactly pow(2, e) on the builds
    # checked (every integer of float32's exponent range and beyond, +-inf, in the vectorised and
    # the scalar tail loops); checked once per process, else ldexp stays
    e = torch.arange(-1100, 1100, dtype=torch.float64)  # beyond float64's exponent range
    e = torch.cat([e, e.flip(0)[:13], torch.tensor([math.inf, -math.inf], dtype=torch.float64)])
    return all(torch.equal(torch.exp2(v), torch.pow(2.0, v)) for v in (e.float(), e))


_EXP2_EXACT = _exp2_is_exact()


def ldexp(x: Tensor, e: Tensor) -> Tensor:
    """``torch.ldexp(x, e)`` bit for bit for integer-valued ``e`` (an exponent add), as
    ``x * exp2(e)`` on the CPU where that is exact (see :func:`_exp2_is_exact`; other devices
    keep torch.ldexp, whose exp2 was not checked). An integer ``e`` (LayerNorm's, one per row)
    is taken as a float of ``x``'s dtype where every ``2^e`` is a normal float32: torch.ldexp
    then gives the same correctly rounded product (beyond, its double power does not overflow)."""
    if not (_EXP2_EXACT and x.device.type == "cpu" and e.device.type == "cpu" and x.is_floating_point()):
        return torch.ldexp(x, e)
    if not e.is_floating_point():
        if e.numel() and not bool((e.abs() <= 126).all()):
            return torch.ldexp(x, e)
        e = e.to(x.dtype)
    return x * torch.exp2(e)


def and_events(count_a: Tensor, count_b: Tensor, matmul: bool) -> Tensor:
    """AND events of a spiking product with per-element spike counts of both operands (a 0-d
    float64 tensor on their device).

    Element-wise: ``sum count_a count_b``. Matrix ``[.., n, p] @ [.., p, m]``: every pair
    ``(a_ik, b_kj)`` meets, so ``sum_ikj ca_ik cb_kj = sum_k (sum_i ca_ik)(sum_j cb_kj)``.
    """
    return float(_and_events(count_a, count_b, matmul))


def _and_events(count_a: Tensor, count_b: Tensor, matmul: bool) -> Tensor:
    """:func:`and_events` as a 0-d float64 tensor on the counts' device (no host synchronisation)."""
    # integer arithmetic (exact; counts <= N T, so products of two fit int32), float64 at the end
    if matmul:
        return (count_a.sum(-2, dtype=torch.int64) * count_b.sum(-1, dtype=torch.int64)).sum().double()
    return (count_a * count_b).sum(dtype=torch.int64).double()


class _Seen:
    """The neuron inputs a module made from its input ``x`` in its last forward, kept only while the
    evaluation's counters count (:func:`~csdlab.snn.counting.counting_cache`) and handed once to its
    ``count_ops``: the neurons then answer from the counts they kept (:class:`~csdlab.snn.mbe.MBENeuron`)
    instead of a second lookup."""

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.tensors: tuple[Tensor, ...] = ()

    def keep(self, x: Tensor, *tensors: Tensor) -> None:
        if counting_active():
            self.ref, self.tensors = weakref.ref(x), tensors

    def __getstate__(self) -> dict[str, Any]:
        return {"ref": None, "tensors": ()}  # a weak reference does not pickle; nothing here is state

    def take(self, x: Tensor) -> tuple[Tensor, ...] | None:
        ref, tensors = self.ref, self.tensors
        self.ref, self.tensors = None, ()
        return tensors if ref is not None and ref() is x else None


class ANDProduct(nn.Module):
    """The synaptic product of two decoded spike trains, element-wise or ``@``.

    A module of its own so that the spike-driven check sees its operands: each must be the readout
    of an MBE neuron's binary trains (``sum_ij D_ij s(i) s'(j)`` with ``D`` separable is the product
    of the two readouts). Its owner counts the AND events.
    """

    synaptic_product = True

    def __init__(self, matmul: bool) -> None:
        super().__init__()
        self.matmul = matmul

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b if self.matmul else a * b

    def extra_repr(self) -> str:
        return "matmul" if self.matmul else "element-wise"


class MBEProduct(nn.Module):
    """``scale * (enc_a(a) op enc_b(b))`` with ``op`` element-wise or ``@`` (docs/methods.md §4.3).

    Args:
        enc_a: neuron encoding the first operand (identity, scaled to its site's range).
        enc_b: neuron encoding the second operand.
        matmul: matrix product (else element-wise, broadcasting).
        scale: constant factor (the attention scale; folded into ``D``).
    """

    def __init__(self, enc_a: MBENeuron, enc_b: MBENeuron, matmul: bool = True, scale: float = 1.0) -> None:
        super().__init__()
        self.enc_a, self.enc_b = enc_a, enc_b
        self.matmul, self.scale = matmul, float(scale)
        self.product = ANDProduct(matmul)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        out = self.product(self.enc_a(a), self.enc_b(b))
        return out if self.scale == 1.0 else out * self.scale

    def count_ops(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[float, Tensor]:
        """``(0, AND events + spikes of both encoders)`` (a tensor on the inputs' device)."""
        a, b = inputs[0], inputs[1]
        ca, cb = self.enc_a.spike_counts(a), self.enc_b.spike_counts(b)
        return 0.0, _and_events(ca, cb, self.matmul) + self.enc_a.spike_total(a) + self.enc_b.spike_total(b)

    def extra_repr(self) -> str:
        return f"matmul={self.matmul}, scale={self.scale:.4g}"


class MBESoftmax(nn.Module):
    """Softmax over ``dim`` from an ``exp2`` and a ``recip`` MBE neuron (docs/methods.md §4.3).

    Args:
        exp2: neuron for ``2^f`` on ``[0, 1)``.
        recip: neuron for ``1/M`` on ``[0.5, 1]``.
        dim: softmax dimension.
    """

    def __init__(self, exp2: MBENeuron, recip: MBENeuron, dim: int = -1) -> None:
        super().__init__()
        self.exp2, self.recip, self.dim = exp2, recip, dim
        self.product = ANDProduct(matmul=False)
        self._seen = _Seen()

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # the row max makes every exponent <= 0, so the row sum lies in [1, n]
        y = (x - x.amax(self.dim, keepdim=True)) * LOG2E
        whole = torch.floor(y)
        return whole, y - whole  # frac in [0, 1)

    def forward(self, x: Tensor) -> Tensor:
        whole, frac = self._split(x)
        p = self.exp2(frac)  # ~ 2^frac in [1, 2)
        e = ldexp(p, whole)  # exponent add
        mant, expo = torch.frexp(e.sum(self.dim, keepdim=True))  # accumulation; sum = M 2^E
        r = self.recip(mant)  # ~ 1/M in (1, 2]
        self._seen.keep(x, frac, mant)
        # numerator x 1/sum: AND of the exp2 and recip trains, then one exponent add
        return ldexp(self.product(p, r), whole - expo)

    def count_ops(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[float, Tensor]:
        """``(0, exp2 spikes (neuron + one AC each into the row sum) + recip spikes + AND events)``."""
        x = inputs[0]
        seen = self._seen.take(x)
        if seen is None:
            whole, frac = self._split(x)
            mant, _ = torch.frexp(ldexp(self.exp2(frac), whole).sum(self.dim, keepdim=True))
        else:
            frac, mant = seen
        cp, cr = self.exp2.spike_counts(frac), self.recip.spike_counts(mant)
        return 0.0, 2.0 * self.exp2.spike_total(frac) + self.recip.spike_total(mant) + _and_events(cp, cr, matmul=False)


class MBELayerNorm(nn.Module):
    """LayerNorm over the last dimension from an identity and an ``rsqrt`` MBE neuron
    (docs/methods.md §4.3); reuses the ANN module's ``weight``, ``bias`` and ``eps``.

    Args:
        ln: the ANN ``nn.LayerNorm`` (one normalised dimension).
        centred: identity neuron for ``x - mu`` (range: its site's calibration).
        rsqrt: neuron for ``1/sqrt(M)`` on ``[0.5, 2]``.
    """

    def __init__(self, ln: nn.LayerNorm, centred: MBENeuron, rsqrt: MBENeuron) -> None:
        super().__init__()
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"MBE LayerNorm normalises one dimension, got normalized_shape={ln.normalized_shape}")
        self.weight, self.bias, self.eps = ln.weight, ln.bias, float(ln.eps)
        self.centred, self.rsqrt = centred, rsqrt
        self.square, self.product = ANDProduct(matmul=False), ANDProduct(matmul=False)
        self._seen = _Seen()

    def _var(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xc_in = x - x.mean(-1, keepdim=True)  # accumulation
        xc = self.centred(xc_in)  # the identity train
        return xc_in, xc, self.square(xc, xc).mean(-1, keepdim=True)  # AND of the train with itself

    @staticmethod
    def _even(v: Tensor) -> tuple[Tensor, Tensor]:
        mant, expo = torch.frexp(v)  # v = M 2^E, M in [0.5, 1)
        odd = (expo % 2).bool()
        return torch.where(odd, mant * 2, mant), torch.where(odd, expo - 1, expo)  # M in [0.5, 2), E even

    def forward(self, x: Tensor) -> Tensor:
        xc_in, xc, var = self._var(x)
        mant, expo = self._even(var + self.eps)
        r = self.rsqrt(mant)  # ~ 1/sqrt(M)
        self._seen.keep(x, xc_in, mant)
        # exponent add (through exp2 on the CPU: 30x faster than torch.ldexp's double pow)
        y = ldexp(self.product(xc, r), torch.div(-expo, 2, rounding_mode="floor"))
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def count_ops(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[float, Tensor]:
        """``(0, centred spikes + rsqrt spikes + AND events of the square and of the product)``."""
        x = inputs[0]
        seen = self._seen.take(x)
        if seen is None:
            xc_in, _, var = self._var(x)
            mant, _ = self._even(var + self.eps)
        else:
            xc_in, mant = seen
        cc, cr = self.centred.spike_counts(xc_in), self.rsqrt.spike_counts(mant)
        ands = _and_events(cc, cc, matmul=False) + _and_events(cc, cr, matmul=False)
        return 0.0, self.centred.spike_total(xc_in) + self.rsqrt.spike_total(mant) + ands


class MBELinear(nn.Module):
    """The ANN's ``Linear`` (reused, not copied) fed by an MBE neuron: ``linear(encoder(x))``.

    Args:
        linear: the ANN layer.
        encoder: the neuron whose spikes drive it (identity, or the GELU neuron).
    """

    def __init__(self, linear: nn.Linear, encoder: MBENeuron) -> None:
        super().__init__()
        self.linear, self.encoder = linear, encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.encoder(x))

    def count_ops(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[float, Tensor]:
        """``(0, spikes x (fan-out + 1))``: one AC per event and output, one in the neuron."""
        events = self.encoder.spike_total(inputs[0])
        return 0.0, events * (self.linear.out_features + 1)


def identity_neuron(code: MBECode, scale: float = 1.0, fast: bool = True, exact: bool = False) -> MBENeuron:
    """An identity neuron on ``[-scale, scale]``."""
    if code.primitive != "identity":
        raise ValueError(f"identity_neuron needs the identity code, got {code.primitive!r}")
    return MBENeuron(code, scale, scale, fast=fast, exact=exact)
