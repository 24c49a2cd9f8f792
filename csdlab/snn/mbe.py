"""Multi-basis exponential-decay (MBE) neuron (docs/methods.md §4.1; paper Eqs. 4-8).

A value ``x`` is presented once. Each of ``N`` bases starts from the membrane
``u_n(0) = sigma_n z + delta_n`` with ``z = x / in_scale - x0`` and gets no further input. Over
``t = 0..T-1`` each basis has three exponentially decaying schedules

    theta_n(t) = a_n exp(-k_th,n t)   (threshold)
    r_n(t)     = a_n exp(-k_r,n t)    (reset)
    d_n(t)     = a_n exp(-k_d,n t)    (intensity)

(the paper's ``alpha exp(-t dt_n / tau_n)`` with ``k = dt_n / tau_n``: ``dt`` and ``tau`` only enter
as this ratio). Each step ``s_n(t) = H(u_n(t) - theta_n(t))`` and ``u_n(t+1) = u_n(t) - s_n(t) r_n(t)``;
the output is

    f_hat(x) = out_scale * (c + sum_n w_n sum_t d_n(t) s_n(t)).

Decisions the paper leaves open (``docs/mbe.md``):

* **per-basis start value** ``a_n`` (the paper shares one ``alpha``), so bases cover different
  ranges instead of collapsing onto the same code;
* **signed bases** ``sigma_n = +-1`` for inputs of both signs (identity, GELU): a basis of sign -1
  codes ``-z``, so a value near 0 fires nothing on either side; primitives on a positive domain use
  the **shift** ``x0`` (the domain's lower end) and positive bases only;
* a per-basis **initial membrane offset** ``delta_n`` (dithering: bases of the same start value code
  on grids shifted by a fraction of the last step, which refines the code ``N``-fold);
* an output constant ``c`` (a value the receiver adds; it carries no spikes) and per-site scales
  ``in_scale`` / ``out_scale`` (identity neurons: the calibrated range of their site).

With ``k_th = k_r = k_d = ln 2`` a basis halves each step: the binary code of ``z`` on
``[0, 2 a_n)`` (:meth:`MBECode.halving`).

Exact fast path. Once fitted, the response of a basis is a fixed staircase of ``z``: every spike
pattern is an interval of ``z`` (each step splits each interval at most once), so
:meth:`MBECode.table` enumerates the intervals once and a forward pass is an interval lookup
(:class:`MBETable`: a uniform grid over the breakpoints, one comparison in a cell of at most one
breakpoint, a short binary search in denser ones) and one gather of the output and spike count.
The step-by-step simulation evaluates the firing condition
``u_n(t) >= theta_n(t)`` as ``sigma_n z >= (theta_n(t) + R_n(t)) - delta_n`` with
``R_n(t) = sum_{t'<t} s_n(t') r_n(t')`` the accumulated resets (the same inequality), which is what
the table stores, so both paths give bit-identical outputs and spike counts.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from spikingjelly.activation_based import base
from torch import Tensor
from torch.nn import functional as F

from csdlab.compiling import CompiledKernel
from csdlab.snn.counting import counting_active

__all__ = ["MBECode", "MBETable", "MBENeuron", "PRIMITIVES", "Primitive", "run_steps", "decay", "load_codes",
           "load_code", "table_path", "FIT_COMMAND"]

FIT_COMMAND = "python convert.py mbe-fit"
TABLE_DIR = "mbe_tables"  # package data folder of csdlab.snn
MAX_TABLE_INTERVALS = 1 << 22
LN2 = math.log(2.0)  # beyond this (T > ~20) the step-by-step path is used instead


@dataclass(frozen=True)
class Primitive:
    """A function an MBE neuron approximates, on the domain it is fitted on (docs/methods.md §4.2).

    Args:
        name: key in the parameter files.
        fn: the exact function (torch, element-wise).
        lo: lower end of the fitting domain.
        hi: upper end of the fitting domain.
        signed: bases of both signs (inputs of both signs); else positive bases and the shift ``x0 = lo``.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    lo: float
    hi: float
    signed: bool


def _exp2(x: Tensor) -> Tensor:
    return torch.exp2(x)


def _identity(x: Tensor) -> Tensor:
    return x


PRIMITIVES: dict[str, Primitive] = {
    "gelu": Primitive("gelu", F.gelu, -120.0, 10.0, True),
    "exp2": Primitive("exp2", _exp2, 0.0, 1.0, False),
    "recip": Primitive("recip", torch.reciprocal, 0.5, 1.0, False),
    "rsqrt": Primitive("rsqrt", torch.rsqrt, 0.5, 2.0, False),
    # fitted on [-1, 1], scaled per site by the calibrated range (in_scale = out_scale = range)
    "identity": Primitive("identity", _identity, -1.0, 1.0, True),
}


def decay(start: Tensor, k: Tensor, T: int) -> Tensor:
    """``start_n exp(-k_n t)`` for ``t = 0..T-1`` ``[N, T]``, evaluated as ``start_n 2^(-t k_n / ln 2)``
    so the halving rate ``k = ln 2`` gives exact powers of two (the binary code has exact levels)."""
    t = torch.arange(T, dtype=start.dtype, device=start.device)
    return start[:, None] * torch.exp2(-(k / LN2)[:, None] * t)


def run_steps(z: Tensor, theta: Tensor, reset: Tensor, intensity: Tensor, weight: Tensor, delta: Tensor,
              sign: Tensor, bias: Tensor, spike_fn: Callable[[Tensor, int], Tensor] | None = None,
              record: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Step-by-step MBE simulation, vectorised over bases and elements (paper Eqs. 4-8).

    Shared by the neuron's reference path and the fitting (which passes a surrogate ``spike_fn``).

    Args:
        z: normalised inputs ``x / in_scale - x0``, any shape ``[*S]``.
        theta: thresholds ``[N, T]``.
        reset: resets ``[N, T]``.
        intensity: intensities ``[N, T]``.
        weight: output weights ``[N]``.
        delta: initial membrane offsets ``[N]``.
        sign: input sign of each basis ``[N]`` (+1 / -1).
        bias: output constant ``c`` (0-d).
        spike_fn: ``H(v, t)`` with ``H(0, t) = 1`` for step ``t``; default the exact Heaviside ``v >= 0``.
        record: if given, the spike tensor ``[N, *S]`` of every step is appended.

    Returns:
        ``(c + sum_n w_n o_n, spike count per element)``, both ``[*S]``.
    """
    n_bases, steps = theta.shape
    shape = (n_bases,) + (1,) * z.dim()
    zs = sign.view(shape) * z.unsqueeze(0)  # [N, *S]; multiplying by +-1 is exact
    acc_reset = torch.zeros_like(zs)  # R_n(t)
    out = torch.zeros_like(zs)  # o_n(t)
    count = torch.zeros_like(zs)
    for t in range(steps):
        # u_n(t) >= theta_n(t)  <=>  sigma z >= (theta_n(t) + R_n(t)) - delta_n  (see module docstring)
        level = (theta[:, t].view(shape) + acc_reset) - delta.view(shape)
        s = (zs >= level).to(zs.dtype) if spike_fn is None else spike_fn(zs - level, t)
        acc_reset = acc_reset + s * reset[:, t].view(shape)
        out = out + s * intensity[:, t].view(shape)
        count = count + s
        if record is not None:
            record.append(s)
    value = _sum_groups(out, weight, sign)
    return value + bias, count.sum(0)


def _sum_groups(out: Tensor, weight: Tensor, sign: Tensor) -> Tensor:
    # positive bases in index order, then negative ones: the order the exact table sums them in
    groups = []
    for sgn in (1.0, -1.0):
        acc = None
        for n in range(out.shape[0]):
            if float(sign[n]) == sgn:
                term = weight[n] * out[n]
                acc = term if acc is None else acc + term
        if acc is not None:
            groups.append(acc)
    return groups[0] if len(groups) == 1 else groups[0] + groups[1]


@dataclass
class MBETable:
    """The exact staircase of a neuron: ``z`` in ``[bounds[j-1], bounds[j])`` gives ``values[j]``
    (before the constant ``c``) and ``spikes[j]`` spikes (all bases and steps)."""

    bounds: Tensor  # [K] sorted, strictly increasing
    values: Tensor  # [K + 1]
    spikes: Tensor  # [K + 1] int32
    biased: Tensor  # [K + 1]: values + c, rounded once as run_steps adds c (what the neuron outputs)
    # uniform-grid index: cell(z) = clamp((z - origin) * inv_width, 0, G - 1), truncated, is monotone in
    # z, so the interval index of z is start[cell] + (the number of the cell's bounds <= z), and a
    # cell holds at most ``probes`` bounds. That count is a branchless binary search over the
    # window padded[start .. start + 2^steps - 1) (later bounds are > z, the NaN padding never <= z):
    # ``steps`` = bit length of ``probes`` comparisons replace torch.bucketize's binary search.
    origin: float = 0.0
    inv_width: float = 0.0
    start: Tensor | None = None  # [G] int64: bounds whose cell is < c
    padded: Tensor | None = None  # [K + 2^steps] bounds then NaN
    probes: int = 0
    steps: int = 0
    # float32 on the CPU, two cache-missing gathers per element: ``grid`` [G] int64 packs (start[c]
    # as int32, its sign bit set where the cell holds more than one bound; the bound padded[start[c]]
    # as float32), so one comparison places z in a cell of at most one bound; the few elements in
    # denser cells (3-7 % of the fmnist ViT's inputs) are found by one nonzero and get the binary search
    # (a host synchronisation: other devices take the binary search for every element).
    # ``packed`` [K + 1] int64 packs (biased[j] as float32, spikes[j] as int32)
    grid: Tensor | None = None
    packed: Tensor | None = None
    # float32 on the CPU, the whole response in one compiled pass (:meth:`respond`), for grids with
    # sub-grids (below: the 8-byte records of the others): ``cells``
    # [4 (G + 1)] int32 holds one 16-byte record per cell of a grid of G cells (a cell of at most one
    # bound): (the bound's float32 bits or NaN, biased value below it, biased value at or above it,
    # spikes below | spikes above << 16), or meta -1 for a cell of more bounds; record G is the NaN
    # sentinel (flagged). ``geom`` [3] float32: (origin, inv_width, G - 1) of :func:`_cell_of`
    # A grid without cells of several bounds (the identity codes: nearly uniform breakpoints) takes
    # 8-byte records instead, half the memory its one gather per element misses in the caches
    # (1.5x faster on the T = 16 identity code's 4.3 MiB): ``pairs`` [2 (G + 2)] float32 holds per
    # cell (its bound or NaN, the biased value at its left end), the value at or above the bound
    # being the next record's (the neighbour, usually in the same cache line); record G carries
    # the value after the last cell, record G + 1 is the NaN sentinel. ``lefts`` [G + 2] uint8
    # (int16 where a count exceeds 254) holds the spikes at each cell's left end, its largest value
    # flagging the sentinel and cells of more bounds (then ``cells`` is None)
    cells: Tensor | None = None
    geom: Tensor | None = None
    sub_grids: bool = False
    pairs: Tensor | None = None
    lefts: Tensor | None = None
    # [K + 1, 2]: the smallest and the largest entry s_n(t) of the trains of each interval (all
    # bases and steps), recorded while enumerating them: what the payload counter measures
    extremes: Tensor | None = None
    # [N T + 1, 2]: the same by the interval's spike count, where every interval of a count has the
    # same extremes (binary trains: silent entries unless all fire, firing ones unless none do)
    count_extremes: Tensor | None = None

    def index(self, z: Tensor) -> Tensor:
        """Interval index of every ``z`` (``torch.bucketize(z, bounds, right=True)``)."""
        if self.start is None:
            return torch.bucketize(z.contiguous(), self.bounds, right=True)
        flat, h = z.reshape(-1), 1 << self.steps >> 1
        j = _take(self.start, _cell(flat, self.origin, self.inv_width, len(self.start)))
        return self._search(flat, j, h, _take(self.padded, j + (h - 1))).view(z.shape)

    def _search(self, z: Tensor, j: Tensor, h: int, first: Tensor) -> Tensor:
        # the binary search from its first step (of width h, against the bound ``first``); j is
        # owned here. Same-dtype in-place adds: an int64 + bool add takes a slow casting path on the CPU
        while True:
            step = (z >= first).long()
            j += step.mul_(h) if h > 1 else step
            h >>= 1
            if not h:
                return j
            first = _take(self.padded, j + (h - 1))

    def lookup(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(biased[j], spikes[j])`` for the interval index ``j`` of every ``z`` (shape of ``z``)."""
        if self.grid is None or z.dtype != torch.float32:
            j = self.index(z).reshape(-1)
            return _take(self.biased, j).view(z.shape), _take(self.spikes, j).view(z.shape)
        flat = z.reshape(-1)
        if flat.device.type == "cpu":
            rec = _take(self.grid, _cell(flat, self.origin, self.inv_width, len(self.grid))).view(torch.int32)
            rec = rec.view(-1, 2)
            j = self._search(flat, rec[:, 0].long(), 1, rec[:, 1].view(torch.float32))  # < 0: a denser cell
            if self.steps > 1:
                dense = (j < 0).nonzero().squeeze(1)
                if len(dense):
                    zd, start = flat[dense], rec[dense, 0].long() & 0x7FFFFFFF
                    h = 1 << self.steps >> 1
                    j[dense] = self._search(zd, start, h, _take(self.padded, start + (h - 1)))
        else:
            j = self.index(flat)
        out = _take(self.packed, j).view(torch.int32).view(-1, 2)
        return out[:, 0].view(torch.float32).view(z.shape), out[:, 1].view(z.shape)


    def respond(self, x: Tensor, in_scale: Tensor, x0: float, out_scale: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(lookup(x / in_scale - x0)[0] * out_scale, spikes, total spikes)`` in one compiled pass
        over ``x`` (bit-identical to normalising, :meth:`lookup` and scaling one after the other);
        ``None`` where that pass does not apply (no cell records, not a float32 CPU tensor, no
        compiler), and the caller takes those three steps.

        Elements in a cell of more than one bound (and NaN) come back flagged (spikes -1, counted
        by the same pass) and get :meth:`lookup` (a NaN raises there, as it always has).
        """
        if self.pairs is not None:
            kernel, records = _RESPOND, (self.pairs, self.lefts)
        else:
            kernel, records = _RESPOND_SUB, (None if self.cells is None else self.cells.view(torch.int64),)
        if records[0] is None or x.dtype != torch.float32 or x.device.type != "cpu" or not kernel.usable:
            return None
        flat = x.reshape(-1)
        scales = torch.stack([in_scale.to(x.dtype), torch.tensor(x0, dtype=x.dtype), out_scale.to(x.dtype)])
        y, spikes, total, flagged = kernel(flat, scales, self.geom, *records)
        if int(flagged):  # on the CPU: a read of a finished 0-d tensor, no synchronisation
            idx = (spikes < 0).nonzero().squeeze(1)
            z = flat[idx] / scales[0] - scales[1]  # the kernel's z: the same IEEE operations
            value, spk = self.lookup(z)
            y[idx] = value * scales[2]
            spikes[idx] = spk
            total = total + spk.sum(dtype=torch.int64)
        return y.view(x.shape), spikes.view(x.shape), total


def _cell_of(z: Tensor, origin: Tensor, inv_width: Tensor, last: Tensor, nan_offset: int = 1) -> Tensor:
    """Cell ``min(trunc(max((z - origin) * inv_width, 0)), last)`` of every ``z`` (float32 like
    ``z``; per grid or per element), monotone in ``z``; NaN (``z`` or the grid) goes to cell
    ``last + nan_offset``. The records are built and read through this one expression (IEEE subtraction
    and product, no contraction: eager and compiled give the same cells)."""
    c = torch.minimum(((z - origin) * inv_width).clamp(min=0.0), last)
    # c != c is isnan (inductor vectorises the comparison, not isnan)
    return torch.where(c != c, last + nan_offset, c).long()  # noqa: PLR0124


def _low(r: Tensor) -> Tensor:
    return (r & 0xFFFFFFFF).to(torch.int32)  # the record's first int32 word (little-endian)


def _high(r: Tensor) -> Tensor:
    return (r >> 32).to(torch.int32)


def _respond_in(z: Tensor, scales: Tensor, cells: Tensor, at: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # the record (bound, below, at or above, meta) at int64 position ``at`` of ``cells``, one comparison
    r0, r1 = cells[at], cells[at + 1]
    up = z >= _low(r0).view(torch.float32)  # z >= NaN (no bound in the cell) is false
    value = torch.where(up, _low(r1), _high(r0)).view(torch.float32)
    meta = _high(r1)
    flagged = meta < 0
    spikes = torch.where(flagged, -1, torch.where(up, meta >> 16, meta & 0xFFFF))
    total = torch.where(flagged, 0, spikes).sum(dtype=torch.int64)
    return value * scales[2], spikes, total, flagged.sum(dtype=torch.int64)


def _respond(x: Tensor, scales: Tensor, geom: Tensor, pairs: Tensor, lefts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass of :meth:`MBETable.respond` over flat ``x`` with the 8-byte records (``pairs``,
    ``lefts``): ``z = x / in_scale - x0`` (as :meth:`MBENeuron.normalise`; subtracting 0 leaves
    every float as it is), its cell's bound, one comparison, then the value and the spikes at the
    left end of that cell or (at or above its bound) of the next. ``(y, spikes, total spikes,
    flagged elements)``, flagged spikes -1."""
    flag = 0xFF if lefts.dtype == torch.uint8 else 0x7FFF
    z = x / scales[0] - scales[1]
    cell = _cell_of(z, geom[0], geom[1], geom[2], nan_offset=2)
    at = cell + (z >= pairs[cell * 2]).long()  # z >= NaN (no bound in the cell) is false
    count = lefts[at].int()
    flagged = count == flag
    total = torch.where(flagged, 0, count).sum(dtype=torch.int64)
    return pairs[at * 2 + 1] * scales[2], torch.where(flagged, -1, count), total, flagged.sum(dtype=torch.int64)


def _respond_sub(x: Tensor, scales: Tensor, geom: Tensor, cells: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_respond` for records with sub-grids: a cell of more bounds holds (sub-grid origin,
    inv_width, first record, -2 - last sub-cell), and the element takes that sub-grid cell's
    record; elsewhere the same record again (in the cache: the second gather is dependent only
    for elements of such cells)."""
    z = x / scales[0] - scales[1]
    cell = _cell_of(z, geom[0], geom[1], geom[2])
    r0, r1 = cells[cell * 2], cells[cell * 2 + 1]
    meta = _high(r1)
    sub = meta < -1
    sub_cell = _cell_of(z, _low(r0).view(torch.float32), _high(r0).view(torch.float32), (-2 - meta).to(torch.float32))
    return _respond_in(z, scales, cells, torch.where(sub, _low(r1) + sub_cell, cell) * 2)


# every index is in range by construction (cells clamped to the grid, NaN to the sentinel record,
# sub-cells clamped to their sub-grid), so inductor's per-gather bounds checks (a third of the
# pass) are left out
_RESPOND = CompiledKernel(_respond, {"assert_indirect_indexing": False})
_RESPOND_SUB = CompiledKernel(_respond_sub, {"assert_indirect_indexing": False})


def _take(table: Tensor, j: Tensor) -> Tensor:
    # index_select on a 1-D table: ~10x faster than Tensor.take on the CPU for large tables (measured)
    return table.index_select(0, j)


def _to(v: Any, device: torch.device | str) -> Any:
    return v.to(device) if isinstance(v, Tensor) else v


def _cell(z: Tensor, origin: float, inv_width: float, cells: int) -> Tensor:
    # truncation after clamping to >= 0 is floor; NaN stays NaN and becomes an out-of-range index
    return (z - origin).mul_(inv_width).clamp_(0, cells - 1).long()


def _with_grid(tab: MBETable, max_cells: int = 1 << 20) -> MBETable:
    k = len(tab.bounds)
    if k < 2:
        return tab
    lo, hi = float(tab.bounds[0]), float(tab.bounds[-1])
    cells = 1 << max(1, (k - 1).bit_length())  # a power of two >= K
    while True:
        inv_width = cells / (hi - lo)
        if not math.isfinite(inv_width):
            return tab
        c = _cell(tab.bounds.clone(), lo, inv_width, cells)  # the same expression as at run time
        per_cell = torch.bincount(c, minlength=cells)
        probes = int(per_cell.max())
        if probes <= 1 or cells * 2 > max_cells:  # finer grids for clustered breakpoints
            break
        cells *= 2
    steps = probes.bit_length()  # a window of 2^steps - 1 >= probes bounds
    start = torch.cumsum(per_cell, 0) - per_cell
    # NaN, not +inf: z >= NaN is false for every z, z = +inf included (which +inf padding overcounted)
    padded = torch.cat([tab.bounds, tab.bounds.new_full((1 << steps,), math.nan)])
    grid = packed = None
    if tab.bounds.dtype == torch.float32 and k < 2**31:
        flagged = start.int() | torch.where(per_cell > 1, -(1 << 31), 0).int()
        grid = torch.stack([flagged, padded[start].view(torch.int32)], 1).view(torch.int64).reshape(-1)
        packed = torch.stack([tab.biased.view(torch.int32), tab.spikes], 1).view(torch.int64).reshape(-1)
    return MBETable(tab.bounds, tab.values, tab.spikes, tab.biased, lo, inv_width, start, padded, probes, steps, grid,
                    packed)


#: cells of the first grid of the cell records (16 bytes each: 16 MiB)
MAX_RECORD_CELLS = 1 << 20
#: a sub-grid has at most this many cells per bound of its cell
SUB_CELLS_PER_BOUND = 64
_GRID_FACTORS = (1.0, 1.0625, 1.125, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)


def _grid_of(bounds: Tensor, cells: int) -> tuple[Tensor, Tensor] | None:
    """``cells`` cells of equal width, the first and last bound mid-cell: ``(geom = (origin,
    inv_width, G - 1) float32, bounds per cell [G + 1])``; ``None`` if the width is no finite float32."""
    lo, hi = float(bounds[0]), float(bounds[-1])
    width = (hi - lo) / (cells - 1)
    geom = torch.tensor([lo - width / 2, 1.0 / width, cells - 1], dtype=torch.float32)
    if not bool(torch.isfinite(geom).all()) or not float(geom[1]) > 0:
        return None
    return geom, torch.bincount(_cell_of(bounds, *geom), minlength=cells + 1)


def _grid(bounds: Tensor, max_cells: int, max_dense: float) -> tuple[Tensor, Tensor] | None:
    """The grid of the cell records (:func:`_grid_of`), G from len(bounds) up to ``max_cells``: the
    first that leaves no cell more than one bound, up to twice the bounds; else the first that
    leaves at most a ``max_dense`` share of the bounds in denser cells (0: none)."""
    k = len(bounds)
    sizes = [(f, min(max_cells, math.ceil(k * f) + 1)) for f in _GRID_FACTORS]
    for share, top in ((0.0, 2.0), (max_dense, math.inf)):
        for factor, cells in sizes:
            if factor > top:
                break
            found = _grid_of(bounds, cells)
            if found is None:
                return None
            per_cell = found[1]
            if float(per_cell[per_cell > 1].sum()) <= share * k:
                return found
            if cells == max_cells:
                break
    return found


def _records(tab: MBETable, start: Tensor, per_cell: Tensor) -> Tensor:
    """``[G, 4]`` int32 records of grid cells holding ``per_cell`` bounds from ``bounds[start]`` on
    (``start``: the interval at each cell's left end): (first bound or NaN, biased value below it,
    at or above it, spikes below | above << 16), meta -1 where a cell holds more than one bound."""
    k = len(tab.bounds)
    nxt = (start + 1).clamp(max=k)
    bound = torch.where(per_cell > 0, tab.bounds[start.clamp(max=k - 1)], math.nan)
    meta = torch.where(per_cell > 1, -1, tab.spikes[start] | (tab.spikes[nxt] << 16)).int()
    return torch.stack([bound.view(torch.int32), tab.biased[start].view(torch.int32),
                        tab.biased[nxt].view(torch.int32), meta], 1)


def _sub_grids(bounds: Tensor, first: Tensor, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A grid for each run ``bounds[first_i : first_i + n_i]`` (the bounds of one dense cell), the
    fewest cells (``n_i`` times a factor, up to :data:`SUB_CELLS_PER_BOUND`) that leave no cell
    more than one bound: ``(geoms [D, 3] float32, sub-cell of each run's bounds, runs' owners)``."""
    d = len(first)
    owner = torch.repeat_interleave(torch.arange(d), n)  # [bounds of the runs]
    idx = first[owner] + torch.arange(len(owner)) - (torch.cumsum(n, 0) - n)[owner]
    b = bounds[idx]
    lo, hi = bounds[first].double(), bounds[first + n - 1].double()
    geoms = torch.zeros(d, 3, dtype=torch.float32)
    pending = torch.ones(d, dtype=torch.bool)
    for factor in _GRID_FACTORS:
        last = min(factor, SUB_CELLS_PER_BOUND) * n
        cells = torch.ceil(last.double()) + 1
        width = (hi - lo) / (cells - 1)
        g = torch.stack([lo - width / 2, 1.0 / width, cells - 1], 1).float()
        geoms = torch.where(pending[:, None], g, geoms)
        sc = _cell_of(b, geoms[owner, 0], geoms[owner, 1], geoms[owner, 2])
        # sorted bounds: a cell holds two iff two neighbours of one run share it
        clash = (sc[1:] == sc[:-1]) & (owner[1:] == owner[:-1])
        bad = torch.zeros(d, dtype=torch.bool)
        bad[owner[1:][clash]] = True
        pending &= bad
        if not bool(pending.any()) or factor >= SUB_CELLS_PER_BOUND:
            break
    return geoms, sc, owner


def _with_cells(tab: MBETable, max_cells: int = MAX_RECORD_CELLS) -> MBETable:
    """Add the cell records of :meth:`MBETable.respond` to a float32 table: a grid over the bounds
    with at most one bound in most cells (:func:`_grid`), each denser cell pointing to a grid of
    its own bounds (its record: the sub-grid's origin, inv_width, first record, -2 - last cell).
    Elements whose sub-grid cell still holds more than one bound (bounds closer than the
    sub-grid resolves) and NaN are flagged and take :meth:`MBETable.lookup`."""
    k = len(tab.bounds)
    if tab.bounds.dtype != torch.float32 or k < 2 or int(tab.spikes.max()) >= 0x7FFF:  # 0x7FFF: a flag
        return tab
    found = _grid(tab.bounds, max_cells, max_dense=0.05)
    if found is None:
        return tab
    geom, per_cell = found
    cells = int(geom[2]) + 1
    per_cell = per_cell[:cells]
    starts = torch.cumsum(per_cell, 0) - per_cell
    rec = _records(tab, starts, per_cell)
    nan = torch.tensor([[0x7FC00000, 0x7FC00000, 0x7FC00000, -1]], dtype=torch.int32)  # cell G: NaN, flagged
    dense = (per_cell > 1).nonzero().squeeze(1)
    if len(dense) == 0 or not bool(torch.isfinite(tab.bounds[[0, -1]]).all()):
        return replace(tab, geom=geom, **_pairs(rec))
    first, n = starts[dense], per_cell[dense]
    geoms, sc, owner = _sub_grids(tab.bounds, first, n)
    sizes = geoms[:, 2].long() + 1
    base = cells + 1 + torch.cumsum(sizes, 0) - sizes  # each sub-grid's first record
    sub_per = torch.bincount(base[owner] - (cells + 1) + sc, minlength=int(sizes.sum()))
    sub_owner = torch.repeat_interleave(torch.arange(len(dense)), sizes)
    # the interval at a sub-cell's left end: its run's first, plus the run's bounds in earlier sub-cells
    before = torch.cumsum(sub_per, 0) - sub_per
    sub_start = first[sub_owner] + before - before[(base - (cells + 1))[sub_owner]]
    rec[dense] = torch.stack([geoms[:, 0].view(torch.int32), geoms[:, 1].view(torch.int32), base.int(),
                              (-2 - geoms[:, 2].long()).int()], 1)
    parts = [rec, nan, _records(tab, sub_start, sub_per)]
    return replace(tab, cells=torch.cat(parts).reshape(-1).contiguous(), geom=geom, sub_grids=True)


def _pairs(rec: Tensor) -> dict[str, Tensor]:
    """The 8-byte records of :func:`_respond` from the ``[G, 4]`` records of :func:`_records`:
    ``pairs`` (bound or NaN, value at the cell's left end) for the G cells, the value after the
    last cell and the NaN sentinel; ``lefts``, the spikes at each left end, the flag (the dtype's
    largest value) for a cell of more bounds and the sentinel."""
    bound, below, above, meta = rec.unbind(1)
    nan = torch.tensor([0x7FC00000], dtype=torch.int32)
    bound = torch.where(meta < 0, nan, bound)  # a cell of more bounds: no comparison, flagged at its left end
    has = ~torch.isnan(bound.view(torch.float32))
    after = torch.where(has[-1:], above[-1:], below[-1:])  # the value after the last cell
    pairs = torch.stack([torch.cat([bound, nan, nan]), torch.cat([below, after, nan])], 1)
    spikes = torch.where(meta < 0, -1, meta & 0xFFFF)
    after_spikes = torch.where(has[-1:], meta[-1:] >> 16, spikes[-1:])
    lefts = torch.cat([spikes, after_spikes, torch.tensor([-1], dtype=torch.int32)])
    top = 0xFF if int(lefts.max()) < 0xFF else 0x7FFF
    lefts = torch.where(lefts < 0, top, lefts).to(torch.uint8 if top == 0xFF else torch.int16)
    # a cell's value and spikes at or above its bound are the next cell's at its left end
    ok = has[:-1] & (meta[:-1] >= 0)
    both = ok & (meta[1:] >= 0)
    if not (torch.equal(above[:-1][ok], below[1:][ok]) and torch.equal(meta[:-1][both] >> 16, meta[1:][both] & 0xFFFF)):
        raise AssertionError("MBE cell records: a bound's upper interval is not the next cell's first")
    return {"pairs": pairs.reshape(-1).view(torch.float32).contiguous(), "lefts": lefts.contiguous()}


def _by_count(extremes: Tensor, spikes: Tensor, most: int) -> Tensor | None:
    """``[most + 1, 2]``: the extremes of the intervals of each spike count (NaN for a count no
    interval has), or None where two intervals of one count differ."""
    idx = spikes.long()[:, None].expand(-1, 2)
    low = extremes.new_full((most + 1, 2), math.inf).scatter_reduce(0, idx, extremes, "amin")
    high = extremes.new_full((most + 1, 2), -math.inf).scatter_reduce(0, idx, extremes, "amax")
    if not torch.equal(low.gather(0, idx), high.gather(0, idx)):
        return None
    return torch.where(torch.isinf(low), math.nan, low)


def _basis_intervals(theta: Tensor, reset: Tensor, intensity: Tensor, delta: Tensor) -> tuple[Tensor, ...]:
    """Enumerate the spike-pattern intervals of one basis: ``(left ends, o, spike counts, [smallest,
    largest] train entry)``."""
    dt = theta.dtype
    lo = torch.full((1,), -math.inf, dtype=dt)
    hi = torch.full((1,), math.inf, dtype=dt)
    acc = torch.zeros(1, dtype=dt)
    out = torch.zeros(1, dtype=dt)
    cnt = torch.zeros(1, dtype=torch.int32)
    low = torch.full((1,), math.inf, dtype=dt)  # smallest / largest train entry s(t) of the interval
    high = torch.full((1,), -math.inf, dtype=dt)
    for t in range(theta.shape[0]):
        level = (theta[t] + acc) - delta  # same expression as run_steps
        all_fire = level <= lo
        split = (level > lo) & (level < hi)
        reps = 1 + split.long()
        idx = torch.repeat_interleave(torch.arange(len(lo)), reps)
        second = torch.zeros(len(idx), dtype=torch.bool)
        starts = torch.cumsum(reps, 0) - reps  # first child of each parent
        second[(starts + 1)[split]] = True
        first_of_split = torch.zeros(len(idx), dtype=torch.bool)
        first_of_split[starts[split]] = True
        c = level[idx]
        lo, hi = torch.where(second, c, lo[idx]), torch.where(first_of_split, c, hi[idx])
        fire = all_fire[idx] | second
        s = fire.to(dt)
        acc = acc[idx] + s * reset[t]  # same expressions as run_steps (adding 0 is exact)
        out = out[idx] + s * intensity[t]
        cnt = cnt[idx] + fire.int()
        low, high = torch.minimum(low[idx], s), torch.maximum(high[idx], s)
        if len(lo) > MAX_TABLE_INTERVALS:
            raise OverflowError(f"MBE table exceeds {MAX_TABLE_INTERVALS} intervals")
    return lo, out, cnt, torch.stack([low, high], 1)


class MBECode:
    """The parameters of one fitted MBE neuron (one primitive at one ``(T, N)``), frozen, float64.

    Args:
        primitive: key of :data:`PRIMITIVES`.
        start: start values ``a_n`` ``[N]`` (> 0).
        k_th: threshold decay per step ``[N]``.
        k_r: reset decay per step ``[N]``.
        k_d: intensity decay per step ``[N]``.
        weight: output weights ``w_n`` ``[N]``.
        delta: initial membrane offsets ``[N]``.
        sign: input signs ``[N]`` (+1 / -1).
        x0: input shift.
        bias: output constant ``c``.
        T: time steps.
    """

    FIELDS = ("start", "k_th", "k_r", "k_d", "weight", "delta", "sign")

    def __init__(self, primitive: str, start: Any, k_th: Any, k_r: Any, k_d: Any, weight: Any, delta: Any,
                 sign: Any, x0: float, bias: float, T: int) -> None:
        if primitive not in PRIMITIVES:
            raise ValueError(f"unknown MBE primitive {primitive!r}; choose one of {sorted(PRIMITIVES)}")
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be an integer >= 1, got {T!r}")
        vals = {k: torch.as_tensor(v, dtype=torch.float64).detach().clone().reshape(-1)
                for k, v in zip(self.FIELDS, (start, k_th, k_r, k_d, weight, delta, sign))}
        n = len(vals["start"])
        if n < 1 or any(len(v) != n for v in vals.values()):
            raise ValueError(f"MBE parameters need N >= 1 entries each, got {[len(v) for v in vals.values()]}")
        if not bool((vals["start"] > 0).all()):
            raise ValueError(f"start values must be > 0, got {vals['start'].tolist()}")
        if not bool(((vals["sign"] == 1) | (vals["sign"] == -1)).all()):
            raise ValueError(f"signs must be +1 or -1, got {vals['sign'].tolist()}")
        self.primitive, self.T, self.N = primitive, T, n
        self.start, self.k_th, self.k_r, self.k_d = vals["start"], vals["k_th"], vals["k_r"], vals["k_d"]
        self.weight, self.delta, self.sign = vals["weight"], vals["delta"], vals["sign"]
        self.x0, self.bias = float(x0), float(bias)
        self._tables: dict[tuple[torch.dtype, str], MBETable] = {}
        self._consts: dict[tuple[torch.dtype, str], tuple[Tensor, ...]] = {}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def halving(cls, T: int, N: int, lo: float = 0.0, hi: float = 1.0, primitive: str = "identity",
                signed: bool = False, dither: bool = False) -> MBECode:
        """The halving code (``k = ln 2``): each basis is the ``T``-bit binary code of ``z = x - lo``
        on ``[0, hi - lo)``, ``a = (hi - lo) / 2``; ``w = 1 / (bases per sign)``.

        Args:
            T: time steps.
            N: bases (even when ``signed``: half code ``+z``, half ``-z``; then ``lo = 0`` is
                forced and the range is ``[-hi, hi]``).
            lo: lower end of the range (the shift ``x0``; 0 when signed).
            hi: upper end of the range.
            primitive: label of the code.
            signed: bases of both signs.
            dither: offset the bases' grids by ``(j + 1/2) / K`` of the last step (``K`` bases per
                sign), which makes their mean a ``K``-fold finer code; else all bases are equal.
        """
        if N < 1 or (signed and N % 2):
            raise ValueError(f"N must be >= 1 (even when signed), got {N}")
        x0 = 0.0 if signed else lo
        a = (hi - x0) / 2
        per_sign = N // 2 if signed else N
        last = a * 2.0 ** -(T - 1)
        j = torch.arange(N, dtype=torch.float64) % per_sign
        delta = (j + 0.5) / per_sign * last if dither else torch.zeros(N, dtype=torch.float64)
        sign = torch.where(torch.arange(N) < per_sign, 1.0, -1.0) if signed else torch.ones(N)
        ln2 = torch.full((N,), math.log(2.0), dtype=torch.float64)
        w = torch.where(sign > 0, 1.0, -1.0).double() / per_sign
        return cls(primitive, torch.full((N,), a), ln2, ln2, ln2, w, delta, sign, x0, 0.0, T)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able parameters (floats round-trip exactly through ``repr``)."""
        d: dict[str, Any] = {"primitive": self.primitive, "T": self.T, "N": self.N, "x0": self.x0, "bias": self.bias}
        d.update({k: getattr(self, k).tolist() for k in self.FIELDS})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MBECode:
        return cls(d["primitive"], *(d[k] for k in cls.FIELDS), x0=d["x0"], bias=d["bias"], T=d["T"])

    # -- evaluation ---------------------------------------------------------------------------
    def schedules(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> tuple[Tensor, ...]:
        """``(theta, reset, intensity)`` ``[N, T]`` computed in float64, then cast."""
        sched = [decay(self.start, k, self.T) for k in (self.k_th, self.k_r, self.k_d)]
        return tuple(s.to(dtype=dtype, device=device) for s in sched)

    def constants(self, dtype: torch.dtype, device: torch.device | str) -> tuple[Tensor, ...]:
        """Cached ``(theta, reset, intensity, weight, delta, sign, bias)`` in ``dtype`` on ``device``."""
        key = (dtype, str(device))
        if key not in self._consts:
            rest = (self.weight, self.delta, self.sign, torch.tensor(self.bias, dtype=torch.float64))
            self._consts[key] = self.schedules(dtype, device) + tuple(v.to(dtype=dtype, device=device) for v in rest)
        return self._consts[key]

    def table(self, dtype: torch.dtype, device: torch.device | str) -> MBETable:
        """The exact staircase of the whole neuron over ``z`` in ``dtype`` (built once, cached).

        A basis of sign -1 fires on ``-z >= q``, i.e. ``z < nextafter(-q, +inf)``: in ``z`` its
        breakpoints are those ``nextafter`` values, so one left-closed table holds both signs.
        Values are summed in :func:`run_steps`' order (positive bases, negative bases, their sum).
        """
        key = (dtype, str(device))
        if key not in self._tables:
            theta, reset, intensity, weight, delta, sign, bias = self.constants(dtype, "cpu")
            per = {n: _basis_intervals(theta[n], reset[n], intensity[n], delta[n]) for n in range(self.N)}
            cuts = [per[n][0][1:] if float(sign[n]) > 0 else
                    torch.nextafter(-per[n][0][1:], torch.tensor(math.inf, dtype=dtype)) for n in range(self.N)]
            bounds = torch.unique(torch.cat(cuts))  # sorted
            left = torch.cat([bounds.new_full((1,), -math.inf), bounds])
            groups, spikes = [], torch.zeros(len(left), dtype=torch.int32)
            extremes = torch.tensor([[math.inf, -math.inf]], dtype=dtype).expand(len(left), 2)
            for sgn in (1.0, -1.0):
                acc = None
                for n in range(self.N):
                    if float(sign[n]) != sgn:
                        continue
                    lo, out, cnt, ext = per[n]
                    j = torch.bucketize(left if sgn > 0 else -left, lo[1:], right=True)
                    term = weight[n] * out[j]  # same order and expressions as run_steps
                    acc = term if acc is None else acc + term
                    spikes += cnt[j]
                    extremes = torch.stack([torch.minimum(extremes[:, 0], ext[j, 0]),
                                            torch.maximum(extremes[:, 1], ext[j, 1])], 1)
                if acc is not None:
                    groups.append(acc)
            values = groups[0] if len(groups) == 1 else groups[0] + groups[1]
            tab = _with_cells(_with_grid(MBETable(bounds.contiguous(), values, spikes, values + bias)))
            tab = replace(tab, extremes=extremes.contiguous(), count_extremes=_by_count(extremes, spikes, self.N * self.T))
            self._tables[key] = MBETable(**{f.name: _to(getattr(tab, f.name), device) for f in fields(tab)})
        return self._tables[key]

    def table_size(self) -> int:
        """Number of intervals of the float32 table."""
        return len(self.table(torch.float32, "cpu").values)

    def __call__(self, z: Tensor, exact_table: bool = True) -> tuple[Tensor, Tensor]:
        """``(c + sum_n w_n o_n, spike count)`` for normalised inputs ``z`` (table or step path)."""
        if exact_table:
            return self.table(z.dtype, z.device).lookup(z)
        theta, reset, intensity, weight, delta, sign, bias = self.constants(z.dtype, z.device)
        value, count = run_steps(z, theta, reset, intensity, weight, delta, sign, bias)
        return value, count.to(torch.int32)

    def value(self, z: Tensor) -> Tensor:
        """``c + sum_n w_n o_n`` from the exact table (no spike counts)."""
        return self.table(z.dtype, z.device).lookup(z)[0]

    def __repr__(self) -> str:
        return f"MBECode({self.primitive}, T={self.T}, N={self.N})"


def table_path(T: int, N: int) -> Path:
    """Where the shipped parameters for ``(T, N)`` live (package data)."""
    return Path(str(resources.files("csdlab.snn").joinpath(TABLE_DIR, f"mbe_T{T}_N{N}.json")))


def load_codes(T: int, N: int, directory: Path | str | None = None) -> dict[str, MBECode]:
    """All fitted primitives for ``(T, N)``.

    Raises:
        ValueError: bad ``T`` / ``N``, or no parameters fitted for them (names the command that fits them).
    """
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T must be an integer >= 1, got {T!r}")
    if not isinstance(N, int) or isinstance(N, bool) or N < 1:
        raise ValueError(f"N (bases) must be an integer >= 1, got {N!r}")
    path = table_path(T, N) if directory is None else Path(directory) / f"mbe_T{T}_N{N}.json"
    if not path.is_file():
        shipped = sorted(p.name for p in table_path(T, N).parent.glob("mbe_T*_N*.json"))
        raise ValueError(f"no fitted MBE parameters for T={T}, N={N} ({path} missing; shipped: {shipped}). "
                         f"Fit them with `{FIT_COMMAND} --Ts {T} --Ns {N}` (csdlab.snn.mbe_fit.fit_all; it names the "
                         f"folder it writes) and convert with `--model.converter.table_dir <that folder>`.")
    data = json.loads(path.read_text())
    return {name: MBECode.from_dict(d) for name, d in data["codes"].items()}


def load_code(primitive: str, T: int, N: int) -> MBECode:
    """One fitted primitive (see :func:`load_codes`)."""
    return load_codes(T, N)[primitive]


class MBENeuron(base.MemoryModule):
    """A layer of MBE neurons with one fitted code (docs/methods.md §4.1), value presented once.

    ``forward(x)`` runs all ``T`` steps of every element and returns the decoded output
    ``out_scale (c + sum_n w_n sum_t d_n(t) s_n(t))`` (what the next layer accumulates from the
    spikes). With ``fast=True`` this is the exact table (bit-identical to the step-by-step
    simulation); ``exact=True`` replaces the neuron by its exact function (the equivalence check).

    Memories: ``v``, the membranes ``[N, *x.shape]`` after the last presentation (step path only;
    ``None`` otherwise), cleared by ``functional.reset_net``.

    Counting: the table gives the spike counts with the outputs (one lookup). While the
    evaluation's counters count (:func:`~csdlab.snn.counting.counting_cache`), a forward keeps the
    counts of its input, and :meth:`spike_counts` of that same tensor object (the counters' calls,
    here and in the layer the neuron feeds) answers from them instead of a second lookup. The
    record goes with the tensor, a new forward, ``reset_net`` or :meth:`set_scale`; as for
    :func:`csdlab.snn.counting.record_nonzero_rows`, inputs are not modified in place afterwards.

    Args:
        code: the fitted parameters (shared between sites: its table is built once).
        in_scale: input scale (identity: the site's calibrated range).
        out_scale: output scale (identity: the same range).
        fast: use the exact table.
        exact: return the exact primitive instead (no spikes).
    """

    def __init__(self, code: MBECode, in_scale: float = 1.0, out_scale: float = 1.0, fast: bool = True,
                 exact: bool = False) -> None:
        super().__init__()
        self.code = code
        self.fast, self.exact = fast, exact
        self.register_buffer("in_scale", torch.tensor(float(in_scale), dtype=torch.float64))
        self.register_buffer("out_scale", torch.tensor(float(out_scale), dtype=torch.float64))
        self.register_memory("v", None)
        self.step_mode = "s"
        # (input, its spike counts, their sum or None)
        self._record: tuple[weakref.ref, Tensor, Tensor | None] | None = None

    def supported_step_mode(self) -> tuple[str, ...]:
        return ("s",)

    def set_scale(self, scale: float) -> None:
        """Set ``in_scale = out_scale = scale`` (identity neurons: the site's range, > 0)."""
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"MBE scale must be finite and > 0, got {scale!r}")
        self.in_scale.fill_(scale)
        self.out_scale.fill_(scale)
        self._record = None

    def reset(self) -> None:
        super().reset()
        self._record = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_record"] = None  # a weak reference does not pickle, and the record is not state
        return state

    def _remember(self, x: Tensor, counts: Tensor, total: Tensor | None) -> None:
        me = weakref.ref(self)

        def drop(ref: weakref.ref) -> None:  # the input is gone: free its counts
            n = me()
            if n is not None and n._record is not None and n._record[0] is ref:
                n._record = None

        self._record = (weakref.ref(x, drop), counts, total)

    def normalise(self, x: Tensor) -> Tensor:
        """``z = x / in_scale - x0``."""
        z = x / self.in_scale.to(x.dtype)
        return z - self.code.x0 if self.code.x0 != 0.0 else z  # z - 0.0 == z bit for bit (-0.0 and NaN too)

    def single_step_functional_forward(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                                       **kwargs: object) -> tuple[tuple[Tensor], tuple[object]]:
        x = inputs[0]
        if self.exact:
            prim = PRIMITIVES[self.code.primitive]
            return (prim.fn(x / self.in_scale.to(x.dtype)) * self.out_scale.to(x.dtype),), (None,)
        if self.fast:
            out = self.code.table(x.dtype, x.device).respond(x, self.in_scale, self.code.x0, self.out_scale)
            if out is None:
                value, counts = self.code(self.normalise(x))
                y, total = value * self.out_scale.to(x.dtype), None
            else:
                y, counts, total = out
            if counting_active():  # the evaluation's counters will ask for these counts
                self._remember(x, counts, total)
            return (y,), (None,)
        z = self.normalise(x)
        theta, reset, intensity, weight, delta, sign, bias = self.code.constants(z.dtype, z.device)
        value, _ = run_steps(z, theta, reset, intensity, weight, delta, sign, bias)
        return (value * self.out_scale.to(x.dtype),), (self.membranes(x),)

    def membranes(self, x: Tensor) -> Tensor:
        """Membranes ``u_n(T)`` ``[N, *x.shape]`` after presenting ``x`` (step-by-step)."""
        theta, reset, _, _, delta, sign, _ = self.code.constants(x.dtype, x.device)
        trains = self.spike_trains(x)  # [T, N, *S]
        shape = (-1,) + (1,) * x.dim()
        u = sign.view(shape) * self.normalise(x).unsqueeze(0) + delta.view(shape)
        for t in range(trains.shape[0]):
            u = u - trains[t] * reset[:, t].view(shape)
        return u

    def spike_trains(self, x: Tensor) -> Tensor:
        """The binary spikes ``[T, N, *x.shape]`` of every basis and step (step-by-step)."""
        theta, reset, intensity, weight, delta, sign, bias = self.code.constants(x.dtype, x.device)
        rec: list[Tensor] = []
        run_steps(self.normalise(x), theta, reset, intensity, weight, delta, sign, bias, record=rec)
        return torch.stack(rec)

    def decode(self, trains: Tensor, x: Tensor) -> Tensor:
        """What the receiver reconstructs from ``trains`` ``[T, N, *x.shape]``:
        ``out_scale (c + sum_n w_n sum_t d_n(t) s_n(t))``, accumulated in :func:`run_steps`' order
        (the spike-driven check compares it with what :meth:`forward` passed on)."""
        _, _, intensity, weight, _, sign, bias = self.code.constants(x.dtype, x.device)
        shape = (-1,) + (1,) * x.dim()
        out = torch.zeros(trains.shape[1:], dtype=x.dtype, device=x.device)
        for t in range(trains.shape[0]):
            out = out + trains[t] * intensity[:, t].view(shape)
        return (_sum_groups(out, weight, sign) + bias) * self.out_scale.to(x.dtype)

    def spike_counts(self, x: Tensor) -> Tensor:
        """Spikes per element (all bases and steps) for input ``x`` (0 when ``exact``)."""
        if self.exact:
            return torch.zeros_like(x, dtype=torch.int32)
        record = self._record
        if record is not None and record[0]() is x:
            return record[1]
        return self.code(self.normalise(x), exact_table=self.fast)[1]

    def train_values(self, x: Tensor, rows: int | None = None) -> Tensor:
        """The smallest and the largest entry of the trains :meth:`spike_trains` gives for every
        element of ``x[:rows]`` (all of ``x`` for ``None`` or 0-d; ``[elements, 2]``, in any
        order, each distinct pair at least once): read from the table's record of each interval
        (the trains enumerated when it was built), so the payload counter measures what the
        neurons send without rerunning their ``T`` steps (the step path reduces its trains).
        Where the extremes are a function of the spike count (binary trains), they are read by
        the counts the forward kept for ``x``, one per count present."""
        part = x if rows is None or not x.dim() else x[:rows]
        tab = self.code.table(x.dtype, x.device) if self.fast and not self.exact else None
        if tab is None or tab.extremes is None:
            trains = self.spike_trains(part).flatten(0, 1)
            return torch.stack([trains.amin(0), trains.amax(0)], -1).reshape(-1, 2)
        if tab.count_extremes is None:
            return tab.extremes.index_select(0, tab.index(self.normalise(part)).reshape(-1))
        record = self._record
        if record is not None and record[0]() is x:  # the counts the forward kept (counters on)
            counts = record[1] if part is x else record[1][:rows]
        else:
            counts = self.spike_counts(part)
        present = torch.bincount(counts.reshape(-1).long(), minlength=len(tab.count_extremes)) > 0
        return tab.count_extremes[present]

    def spike_total(self, x: Tensor) -> Tensor:
        """All spikes for input ``x`` (bases, steps, elements): a 0-d float64 tensor on its device,
        from the sum the forward's pass made when it kept the counts."""
        record = self._record
        if record is not None and record[2] is not None and record[0]() is x:
            return record[2].to(torch.float64)
        return self.spike_counts(x).sum(dtype=torch.float64)  # small integers: exact in float64

    def count_events(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, float]:
        """``(spikes summed over bases and steps, elements x N x T)`` of the call just made (the
        spikes a 0-d tensor on the input's device: no host synchronisation)."""
        x = inputs[0]
        return self.spike_total(x), float(x.numel() * self.code.N * self.code.T)

    def count_ops(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[float, Tensor]:
        """A stand-alone neuron costs one AC per spike (docs/methods.md §4.4: ``T N eta E_AC``)."""
        return 0.0, self.spike_total(inputs[0])

    def extra_repr(self) -> str:
        mode = "exact" if self.exact else ("table" if self.fast else "steps")
        return (f"{self.code.primitive}, T={self.code.T}, N={self.code.N}, scale={float(self.in_scale):.4g}, "
                f"{mode}")
