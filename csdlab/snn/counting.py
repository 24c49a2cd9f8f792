"""Exact and cheap event counts for the evaluation's firing and operation counters.

The evaluation counts, at every batch, the spikes of every neuron layer and the synaptic events
(non-zero input x fan-out) of every spike-fed Conv2d / Linear. On a CPU the obvious reductions are
slow: measured with torch 2.14 on one thread over a 4 M-element float tensor, ``count_nonzero``
takes ~30 ms, ``(x != 0).sum(dtype=float64)`` ~48 ms, while ``x.sum()`` takes 0.7 ms and
``torch.ne(x, 0, out=<float tensor>)`` 1.2 ms; a ``conv2d`` of the event mask with a ones kernel
(the conv's occupancy) costs as much as a small convolution. The functions here give the same
integers from the fast operations:

* a binary tensor's event count is its sum; a general one's is the sum of ``x != 0`` written as
  floats. Float32 sums are exact while every partial sum stays below 2^24, so rows are summed in
  chunks of at most 2^24 entries;
* a convolution's synaptic events are ``sum_{c,h,w} [x != 0] * cover(h, w) * C_out / groups``,
  where ``cover(h, w)`` counts the output windows that contain input position ``(h, w)`` (fewer
  than ``kh * kw`` near the border). ``cover`` is separable and depends only on the geometry.

A spike tensor is usually counted twice (the firing counter at the neuron, the op counter at the
layer it feeds). :func:`record_nonzero_rows` lets the producer of a tensor mark it as final;
:func:`nonzero_per_row` then counts that tensor object once and answers every later request from
the record. A record is the producer's promise that the tensor is not modified afterwards; it
disappears with the tensor, and every record with the counting (:func:`counting_cache`, entered by
the evaluation's counters): nothing is kept in module state between evaluations.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["count_spikes", "nonzero_per_row", "record_nonzero_rows", "counting_cache", "counting_active", "CountCache",
           "record_units_rows", "units_per_row",
           "conv_cover",
           "synaptic_events", "bincount_below"]

_CHUNK = 1 << 24  # float32 represents every integer up to 2^24 exactly


def _exact_row_sums(values: Tensor) -> Tensor:
    """Row sums of a ``[N, M]`` tensor of small non-negative integers (as floats), float64, exact."""
    if values.dtype == torch.float64 or values.shape[1] <= _CHUNK:
        return values.sum(1, dtype=values.dtype).to(torch.float64)
    return torch.stack([c.sum(1) for c in values.split(_CHUNK, dim=1)], 1).to(torch.float64).sum(1)


def count_spikes(x: Tensor) -> Tensor:
    """Number of ones in the binary (0/1) tensor ``x``: its sum, exact.

    Returns a 0-d float64 tensor on ``x``'s device (no host synchronisation).
    """
    x = x.detach()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # half precision: summed in float32
    if x.numel() <= _CHUNK:  # any strides: no copy of a transposed train
        return x.sum(dtype=acc).to(torch.float64)
    return _exact_row_sums(x.reshape(1, -1).to(acc))[0]


class CountCache:
    """The non-zero counts of recorded tensors and a reused 0/1 scratch buffer, for as long as one
    set of counters is counting (:func:`counting_cache`)."""

    #: elements of the scratch buffer: a fresh large buffer per count costs more in page faults
    #: (the allocator returns it to the system) than the comparison itself
    SCRATCH_ELEMS = 1 << 20

    def __init__(self) -> None:
        # id(tensor) -> [weak reference to it, its per-row counts once first asked for (None before)]
        self.records: dict[int, list[Any]] = {}
        self.scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # storage of a graded spike tensor -> [weak reference to it, its unit spikes per row]: found
        # again from a view of it (ECMT's k^T), as the spike-driven check finds its spike sources
        self.units: dict[tuple[int, str], list[Any]] = {}

    def record(self, x: Tensor) -> None:
        key = id(x)
        self.records[key] = [weakref.ref(x, lambda _ref, key=key: self.records.pop(key, None)), None]

    def lookup(self, x: Tensor) -> list[Any] | None:
        record = self.records.get(id(x))
        return record if record is not None and record[0]() is x else None

    def buffer(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        buf = self.scratch.get((device, dtype))
        if buf is None:
            # a normal tensor, even when first asked for under inference mode: an inference tensor
            # could not be written outside inference mode (the training-time conversion callback)
            with torch.inference_mode(False):
                buf = self.scratch[(device, dtype)] = torch.empty(self.SCRATCH_ELEMS, dtype=dtype, device=device)
        return buf


def bincount_below(x: Tensor, bins: int) -> Tensor:
    """``torch.bincount(x, minlength=bins)`` for integers ``x`` known to lie in ``[0, bins)``:
    ``[bins]`` int64 on ``x``'s device. Off the CPU without ``bincount``, which reads ``x.max()``
    on the host to size its output (a synchronisation per call)."""
    x = x.flatten()
    if x.device.type == "cpu":
        return torch.bincount(x, minlength=bins)
    ones = torch.ones((), dtype=torch.int64, device=x.device).expand(x.numel())
    return torch.zeros(bins, dtype=torch.int64, device=x.device).index_add_(0, x, ones)


_ACTIVE: ContextVar[CountCache | None] = ContextVar("csdlab_count_cache", default=None)


@contextmanager
def counting_cache() -> Iterator[CountCache]:
    """Counts made inside are shared through one :class:`CountCache`, dropped on exit (the
    evaluation's counters enter it around every simulation)."""
    cache = CountCache()
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)
        cache.records.clear()
        cache.scratch.clear()
        cache.units.clear()


def counting_active() -> bool:
    """Whether the evaluation's counters are counting now (inside :func:`counting_cache`): producers
    keep what the counters will ask for only then."""
    return _ACTIVE.get() is not None


def record_nonzero_rows(x: Tensor) -> None:
    """Mark the tensor object ``x`` as final while counters are counting: its non-zero counts per row
    (dim 0) are computed on the first :func:`nonzero_per_row` of ``x`` and kept (no-op otherwise).

    The caller (the producer of ``x``) promises that ``x`` is not modified in place afterwards. The
    record goes when ``x`` is garbage-collected or the counting ends (no version counter is needed,
    so it works under ``torch.inference_mode``).
    """
    cache = _ACTIVE.get()
    if cache is not None:
        cache.record(x)


def _storage_key(x: Tensor) -> tuple[int, str]:
    return x.untyped_storage().data_ptr(), str(x.device)


def record_units_rows(x: Tensor, units: Tensor) -> None:
    """Record, while counters are counting, that the graded spike tensor ``x`` carries ``units``
    unit spikes per row (dim 0, ``[x.shape[0]]``): the op counter then charges a layer fed by ``x``
    (or by a view of it with the same rows) per unit spike under the unit-spike rule. The payload
    counter records every graded site; a binary tensor needs no record (its spikes are its events).
    The producer promises ``x`` is not modified afterwards; the record goes with ``x``."""
    cache = _ACTIVE.get()
    if cache is None:
        return
    key = _storage_key(x)
    cache.units[key] = [weakref.ref(x, lambda _ref, key=key: cache.units.pop(key, None)), units, x.shape[0],
                        x.numel()]


def units_per_row(x: Tensor) -> Tensor | None:
    """Unit spikes per row of ``x`` (``[x.shape[0]]`` float64) if ``x`` or a same-size view of it
    was recorded by :func:`record_units_rows`, else None (the caller counts non-zero entries)."""
    cache = _ACTIVE.get()
    if cache is None or not cache.units:
        return None
    record = cache.units.get(_storage_key(x))
    if record is None or record[0]() is None or record[2] != x.shape[0] or record[3] != x.numel():
        return None
    return record[1]


def nonzero_per_row(x: Tensor) -> Tensor:
    """Non-zero entries of ``x`` per row (dim 0; NaN counts as non-zero, as ``x != 0`` does).

    A tensor with a record (:func:`record_nonzero_rows`) is counted at most once.

    Returns ``[x.shape[0]]`` float64 on ``x``'s device.
    """
    cache = _ACTIVE.get()
    record = cache.lookup(x) if cache is not None else None
    if record is None:
        return _count_rows(x, cache)
    if record[1] is None:
        record[1] = _count_rows(x, cache)
    return record[1]


def _count_rows(x: Tensor, cache: CountCache | None) -> Tensor:
    x = x.detach()
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.shape[0]
    if x.numel() == 0:
        return torch.zeros(rows, dtype=torch.float64, device=x.device)
    flat = x.reshape(rows, -1)
    width = flat.shape[1]
    if cache is None or width > CountCache.SCRATCH_ELEMS or x.device.type != "cpu":
        mask = torch.ne(flat, 0, out=torch.empty(flat.shape, dtype=dtype, device=x.device))  # 1.0 / 0.0
        return _exact_row_sums(mask)
    buf = cache.buffer(x.device, dtype)
    step = CountCache.SCRATCH_ELEMS // width
    counts = []
    for i in range(0, rows, step):  # blocks of whole rows through the scratch buffer
        part = flat[i:i + step]
        mask = torch.ne(part, 0, out=buf[:part.numel()].view(part.shape))
        counts.append(mask.sum(1, dtype=dtype))  # width <= 2^20: exact in float32
    return torch.cat(counts).to(torch.float64)


def _cover_1d(size: int, out_size: int, kernel: int, stride: int, padding: int, dilation: int) -> list[int]:
    cover = [0] * size
    for o in range(out_size):
        for j in range(kernel):
            i = o * stride - padding + j * dilation
            if 0 <= i < size:
                cover[i] += 1
    return cover


@functools.lru_cache(maxsize=256)
def _cover_cached(hw: tuple[int, int], out_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                  padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    rows = _cover_1d(hw[0], out_hw[0], kernel[0], stride[0], padding[0], dilation[0])
    cols = _cover_1d(hw[1], out_hw[1], kernel[1], stride[1], padding[1], dilation[1])
    return torch.tensor(rows, dtype=torch.float32)[:, None] * torch.tensor(cols, dtype=torch.float32)[None, :]


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _cover_by_gradient(conv: nn.Conv2d, hw: tuple[int, int]) -> Tensor:
    """Any padding mode / ``padding="same"``: the cover is the gradient of the number of (output
    position, input position) pairs, i.e. of a ones-kernel convolution of a ones image (reflect /
    replicate / circular padding repeat border inputs, which then reach more outputs)."""
    import torch.nn.functional as F

    # autograd on a tiny image, also inside Trainer.test's inference mode
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.ones(1, 1, *hw, requires_grad=True)
        padded, padding = x, conv.padding
        if conv.padding_mode != "zeros":
            padded, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
        ones = torch.ones(1, 1, *conv.kernel_size)
        F.conv2d(padded, ones, None, conv.stride, padding, conv.dilation).sum().backward()
    return x.grad[0, 0].detach()


def conv_cover(conv: nn.Conv2d, hw: tuple[int, int]) -> Tensor:
    """``[H, W]``: for each input position of ``conv`` (input size ``hw``), the number of output
    positions whose window contains it (float32, on the CPU)."""
    if conv.padding_mode != "zeros" or not isinstance(conv.padding, (tuple, list)):
        return _cover_by_gradient(conv, hw)
    k, s, p, d = (_pair(v) for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
    out_hw = tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))
    return _cover_cached(tuple(hw), out_hw, k, s, p, d)


#: conv_cover copied to a device once per geometry: a copy per call would be a host-to-device
#: transfer, i.e. a synchronisation, per layer and batch
_DEVICE_COVERS: dict[tuple[Any, ...], Tensor] = {}


def _cover_on(conv: nn.Conv2d, hw: tuple[int, int], device: torch.device) -> Tensor:
    """:func:`conv_cover` on ``device`` (float64 there; the CPU tensor itself on the CPU)."""
    if device.type == "cpu":
        return conv_cover(conv, hw)
    key = (device, hw, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode)
    cover = _DEVICE_COVERS.get(key)
    if cover is None:
        cover = _DEVICE_COVERS[key] = conv_cover(conv, hw).to(device, torch.float64)
    return cover


def synaptic_events(module: nn.Module, x: Tensor) -> Tensor:
    """Synaptic operations of an event-driven Conv2d / Linear: for every row (dim 0) of ``x``, the
    sum over non-zero input entries of the number of outputs each one reaches. ``[N]``, float64.

    The same integers as an occupancy convolution of the event mask with a ones kernel (what
    SpikingJelly's op counter does), from one comparison pass and one reduction.

    Args:
        module: the ``nn.Conv2d`` or ``nn.Linear`` layer.
        x: its input, ``[N, ...]`` (a leading batch-like dimension, e.g. ``T*B`` or ``B``).
    """
    if isinstance(module, nn.Linear):
        return nonzero_per_row(x) * module.out_features
    if isinstance(module, nn.Conv2d):
        x = x.detach()
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mask = torch.ne(x, 0, out=torch.empty(x.shape, dtype=dtype, device=x.device))
        # [N, H, W]: events over channels (<= C_in, exact); C_in times smaller than x, so the
        # weighted sum runs in float64, exact however large the window counts get
        per_position = mask.sum(1).to(torch.float64)
        cover = _cover_on(module, tuple(x.shape[-2:]), x.device).to(per_position)  # [H, W]
        return per_position.mul_(cover).flatten(1).sum(1) * (module.out_channels // module.groups)
    raise TypeError(f"synaptic_events takes nn.Conv2d or nn.Linear, got {type(module).__name__}")
