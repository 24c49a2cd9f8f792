"""Exact nearest-rank percentiles of large tensors, for calibration (docs/methods.md §2.2).

``torch.quantile`` refuses tensors above 16M elements and sorts; a calibration site holds up to
hundreds of millions of activations and needs only the two tails. :func:`percentile_pair` finds
both ``p``-th and ``(100-p)``-th values exactly (the same numbers as ``kthvalue`` on the whole
tensor) in a few cheap passes: bounds from a small random sample cut out the tails, and
``kthvalue`` ranks each answer within them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["percentile", "percentile_pair"]

_EXACT_BELOW = 1 << 16  # kthvalue directly on tensors this small


def _kth_smallest(flat: Tensor, k: int) -> Tensor:
    """Exactly ``flat.kthvalue(k)`` (1-based), in about three cheap passes on a large tensor: a
    bound from a small random sample keeps only the tail holding the answer (a bit more than the
    rank from the nearer end), and ``kthvalue`` runs on that tail; the full ``kthvalue`` (a copy
    and an int64 index of the whole tensor) is the fallback when the bound was too tight."""
    n = flat.numel()
    if n <= _EXACT_BELOW:
        return flat.kthvalue(k).values
    from_top = k > n // 2
    r = n - k + 1 if from_top else k  # rank counted from the nearer end
    bound = _tail_bound(flat, _sample(flat), r, from_top)
    tail = flat[flat >= bound] if from_top else flat[flat <= bound]
    c = tail.numel()
    if c < r:
        return flat.kthvalue(k).values
    return tail.kthvalue(c - r + 1 if from_top else r).values


def _tail_bound(flat: Tensor, sample: Tensor, rank: int, from_top: bool) -> Tensor:
    """A bound with (almost always) at least ``rank`` elements of ``flat`` beyond it, from ``sample``."""
    m, n = sample.numel(), flat.numel()
    expected = rank / n * m  # sample elements expected beyond the answer; pass 1.5x that + 4 sigma
    j = min(m, int(1.5 * expected + 4 * math.sqrt(expected) + 16))
    return sample.kthvalue(m - j + 1 if from_top else j).values


def _sample(flat: Tensor) -> Tensor:
    g = torch.Generator(device=flat.device).manual_seed(0)
    return flat[torch.randint(flat.numel(), (4096,), generator=g, device=flat.device)]


def _rank(q: float, n: int) -> int:
    # nearest rank, computed in float32 as this code always has (thresholds stay bit-identical)
    return min(max(int(torch.tensor(q / 100 * n).ceil()), 1), n)


_SLABS = 8  # the prefilter of _beyond views a tensor as [8, n / 8]


def _beyond(flat: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """Every element of ``flat`` that is ``>= hi`` or ``<= lo`` (in some order; selection does not
    care). Boolean selection on a CPU costs several times a reduction, so it runs on a fraction:
    ``flat`` viewed as ``[8, n/8]``, a column is kept when its max or min reaches a bound (two
    vectorised reductions; ~20 % of the columns at the 1.5 % tails of calibration) and only the
    kept columns are filtered element by element."""
    if flat.numel() % _SLABS == 0:
        view = flat.view(_SLABS, -1)
        keep = torch.ge(view.amax(0), hi).logical_or_(torch.le(view.amin(0), lo))
        flat = view.index_select(1, keep.nonzero().squeeze(1)).flatten()
    return flat[torch.ge(flat, hi).logical_or_(torch.le(flat, lo))]


def percentile_pair(x: Tensor, p: float) -> Tensor:
    """``[p-th, (100-p)-th]`` nearest-rank percentiles of all of ``x`` (float32, exact), p > 50:
    bounds from a small sample, both tails cut out together (:func:`_beyond`), then ``kthvalue``
    ranks each answer within them."""
    flat = x.detach().flatten().float()
    n = flat.numel()
    k_hi, k_lo = _rank(p, n), _rank(100 - p, n)
    if n <= _EXACT_BELOW:
        return torch.stack([flat.kthvalue(k_hi).values, flat.kthvalue(k_lo).values])
    if flat.device.type != "cpu":
        return _topk_pair(flat, n - k_hi + 1, k_lo)
    sample = _sample(flat)
    r_hi, r_lo = n - k_hi + 1, k_lo  # ranks from the top / from the bottom
    hi_bound, lo_bound = _tail_bound(flat, sample, r_hi, True), _tail_bound(flat, sample, r_lo, False)
    if bool(lo_bound < hi_bound):
        tails = _beyond(flat, hi_bound, lo_bound)  # ~1.5x both tails: all that can hold the two answers
        # each answer is ranked within the tails (both sides: counting beats another selection)
        # once its side holds enough elements, i.e. the answer lies beyond its bound
        c = tails.numel()
        if int(torch.ge(tails, hi_bound).sum()) >= r_hi and int(torch.le(tails, lo_bound).sum()) >= r_lo:
            return torch.stack([tails.kthvalue(c - r_hi + 1).values, tails.kthvalue(r_lo).values])
    return torch.stack([_kth_smallest(flat, k_hi), _kth_smallest(flat, k_lo)])  # the bounds missed (rare)


def _topk_pair(flat: Tensor, r_hi: int, r_lo: int) -> Tensor:
    """``[r_hi-th largest, r_lo-th smallest]`` of ``flat`` by ``topk`` of each tail: the path off
    the CPU, where boolean selection reads its size on the host (a synchronisation per site) and
    ``kthvalue`` runs one thread block per slice. The same values as :func:`percentile_pair`'s."""
    hi = flat.topk(r_hi, largest=True, sorted=False).values.amin()
    lo = flat.topk(r_lo, largest=False, sorted=False).values.amax()
    return torch.stack([hi, lo])


def percentile(x: Tensor, q: float) -> Tensor:
    """Nearest-rank ``q``-th percentile of all of ``x`` in float32 (exact; no 16M-element limit)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    flat = x.detach().flatten().float()
    return _kth_smallest(flat, _rank(q, flat.numel()))
