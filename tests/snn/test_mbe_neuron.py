"""MBE neuron (docs/methods.md §4.1): hand-computed trains, halving code, exact table == steps."""

import math

import pytest
import torch
from spikingjelly.activation_based import functional
from torch import Tensor

from csdlab.snn.counting import counting_cache
from csdlab.snn.mbe import FIT_COMMAND, PRIMITIVES, MBECode, MBENeuron, load_code, load_codes

LN2 = math.log(2.0)


def two_bases() -> MBECode:
    # basis 0: halving from 4 (theta = r = d = 4, 2, 1, 0.5), w = 1, positive
    # basis 1: constant threshold and reset 3, intensity 3, 1.5, .75, .375, w = 0.5, delta = 0.5, negative
    return MBECode("identity", start=[4.0, 3.0], k_th=[LN2, 0.0], k_r=[LN2, 0.0], k_d=[LN2, LN2],
                   weight=[1.0, 0.5], delta=[0.0, 0.5], sign=[1.0, -1.0], x0=0.0, bias=0.25, T=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_bases_four_steps_by_hand(dtype):
    neuron = MBENeuron(two_bases(), fast=False)
    x = torch.tensor([5.3, -7.0, 2.0], dtype=dtype)
    trains = neuron.spike_trains(x)  # [T, N, 3]
    # x = 5.3: basis 0 fires at 4 (u 1.3), not at 2, at 1 (u 0.3), not at 0.5; basis 1 sees -4.8: silent
    # x = -7: basis 1 sees 7.5: fires at 3 (4.5), at 3 (1.5), then stays below 3; basis 0 silent
    # x = 2: basis 0 reaches its second threshold exactly (H(0) = 1), then u = 0
    assert trains[:, 0, 0].tolist() == [1, 0, 1, 0]
    assert trains[:, 1, 0].tolist() == [0, 0, 0, 0]
    assert trains[:, 0, 1].tolist() == [0, 0, 0, 0]
    assert trains[:, 1, 1].tolist() == [1, 1, 0, 0]
    assert trains[:, 0, 2].tolist() == [0, 1, 0, 0]
    assert trains[:, 1, 2].tolist() == [0, 0, 0, 0]
    y = neuron(x)  # 0.25 + 1 * (4 + 1); 0.25 + 0.5 * (3 + 1.5); 0.25 + 1 * 2
    assert y.dtype == dtype and y.tolist() == [5.25, 2.5, 2.25]
    torch.testing.assert_close(neuron.v[:, 0], torch.tensor([0.3, -4.8], dtype=dtype))
    assert neuron.count_events((x,), y) == (5.0, 3 * 2 * 4)  # 2 + 2 + 1 spikes
    functional.reset_net(neuron)
    assert neuron.v is None
    fast = MBENeuron(two_bases())
    assert fast(x).tolist() == [5.25, 2.5, 2.25] and fast.spike_counts(x).tolist() == [2, 2, 1]


@pytest.mark.parametrize("T", [4, 8, 16])
def test_halving_code_is_the_binary_code(T):
    code = MBECode.halving(T, 2, lo=-1.0, hi=3.0)  # a = 2, covers [-1, 3)
    x = torch.linspace(-1.0, 3.0, 20001, dtype=torch.float64)[:-1]
    z = x - code.x0
    y, count = code(z, exact_table=False)
    last = 2.0 * 2.0 ** -(T - 1)  # the last step's intensity
    err = z - y
    assert float(err.min()) >= 0 and float(err.max()) <= last  # truncation to the T-bit grid
    # the spike count is the number of ones of the binary code of floor((x - lo) / last), twice (2 bases)
    ints = torch.floor(z / last).long()
    ones = sum(((ints >> b) & 1) for b in range(T))
    assert torch.equal(count.long(), 2 * ones)


def _random_code(T: int, N: int, seed: int) -> MBECode:
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(N, generator=g, dtype=torch.float64)  # noqa: E731
    sign = torch.where(torch.rand(N, generator=g) < 0.5, 1.0, -1.0)
    return MBECode("gelu", r(0.2, 3.0), r(0.3, 1.0), r(0.3, 1.0), r(0.1, 1.2), r(-1, 1), r(-0.1, 0.1), sign,
                   0.0, 0.1, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("code", [pytest.param(lambda: _random_code(8, 5, 0), id="random"),
                                  pytest.param(lambda: MBECode.halving(12, 8, 0, 1, signed=True, dither=True),
                                               id="dithered"),
                                  pytest.param(lambda: load_code("gelu", 8, 4), id="gelu-T8"),
                                  pytest.param(lambda: load_code("identity", 8, 8), id="identity-T8")])
def test_exact_table_equals_step_by_step(code, dtype):
    code = code()
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(10_000, generator=g, dtype=dtype) * 3,
                   torch.linspace(-8, 8, 5_001, dtype=dtype)])
    table = MBENeuron(code)
    steps = MBENeuron(code, fast=False)
    assert torch.equal(table(x), steps(x))
    assert torch.equal(table.spike_counts(x), steps.spike_counts(x))
    # the step-by-step counts are the spike trains summed
    assert torch.equal(steps.spike_trains(x).sum((0, 1)).int(), steps.spike_counts(x))
    # breakpoints themselves: every interval's left end, where the pattern changes
    bounds = code.table(dtype, "cpu").bounds
    b = bounds[:: max(1, len(bounds) // 3000)]
    assert torch.equal(table(b), steps(b)) and torch.equal(table.spike_counts(b), steps.spike_counts(b))


def test_count_events_counts_bases_and_steps():
    code = load_code("identity", 8, 8)
    n = MBENeuron(code, 2.0, 2.0)
    x = torch.tensor([[0.0, 1.0], [-1.5, 0.7]])
    events, steps = n.count_events((x,), n(x))
    assert steps == 4 * 8 * 8
    assert events == float(n.spike_counts(x).sum()) and n.spike_counts(x)[0, 0] == 0  # zero is silent


def test_identity_scale_and_exact():
    code = load_code("identity", 8, 8)
    n = MBENeuron(code)
    n.set_scale(4.0)
    x = torch.linspace(-4, 4, 1001)
    assert float((n(x) - x).abs().max()) <= 4.0 * 2.0 ** -8  # 8 bits on [-4, 4], and better
    n.exact = True
    assert torch.equal(n(x), x)
    with pytest.raises(ValueError, match="scale"):
        n.set_scale(0.0)


def test_bad_input():
    with pytest.raises(ValueError, match="T must be"):
        load_codes(0, 8)
    with pytest.raises(ValueError, match="N"):
        load_codes(8, 0)
    with pytest.raises(ValueError, match="mbe-fit") as e:
        load_codes(9, 8)
    assert FIT_COMMAND in str(e.value)
    with pytest.raises(ValueError, match="primitive"):
        MBECode("tanh", [1.0], [0.7], [0.7], [0.7], [1.0], [0.0], [1.0], 0.0, 0.0, 4)
    with pytest.raises(ValueError, match="start"):
        MBECode("gelu", [-1.0], [0.7], [0.7], [0.7], [1.0], [0.0], [1.0], 0.0, 0.0, 4)
    with pytest.raises(ValueError, match="T must be"):
        MBECode.halving(0, 2)
    assert set(PRIMITIVES) == {"gelu", "exp2", "recip", "rsqrt", "identity"}


def _edge_inputs(bounds: Tensor, g: torch.Generator) -> Tensor:
    # every breakpoint, the float just below it, a random spread and the far ends
    b = bounds.double() if bounds.dtype == torch.float64 else bounds
    below = torch.nextafter(b, torch.tensor(-math.inf, dtype=b.dtype))
    spread = b[0] + (b[-1] - b[0]) * torch.rand(20_000, generator=g, dtype=torch.float64).to(b.dtype)
    ends = torch.tensor([-math.inf, -1e30, 0.0, -0.0, 1e30, math.inf], dtype=b.dtype)
    return torch.cat([b, below, spread, ends])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("primitive", "T", "N"), [("identity", 16, 8), ("gelu", 16, 4), ("exp2", 16, 8),
                                                    ("recip", 16, 8), ("gelu", 3, 4), ("identity", 2, 8)])
def test_table_lookup_is_bucketize_at_every_breakpoint(primitive, T, N, dtype):
    """Every path of the lookup (the CPU's one-comparison cells with the search for denser cells,
    the binary search other devices take) gives torch.bucketize's interval, at and just below
    every breakpoint."""
    code = load_code(primitive, T, N)
    tab = code.table(dtype, "cpu")
    z = _edge_inputs(tab.bounds, torch.Generator().manual_seed(2))
    j = torch.bucketize(z, tab.bounds, right=True)
    value, spikes = tab.lookup(z)
    assert torch.equal(value, tab.biased[j]) and torch.equal(spikes, tab.spikes[j])
    assert torch.equal(tab.index(z), j)  # the search every element takes off the CPU
    assert torch.equal(tab.index(z.view(-1, 2)), j.view(-1, 2))  # any shape
    if dtype == torch.float32 and primitive == "gelu" and T == 16:
        assert tab.steps > 1 and bool((tab.grid.view(torch.int32)[0::2] < 0).any())  # denser cells exist


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("primitive", "T", "N"), [("gelu", 16, 4), ("rsqrt", 16, 8), ("identity", 3, 8)])
def test_table_neuron_equals_step_by_step_at_breakpoints(primitive, T, N, dtype):
    code = load_code(primitive, T, N)
    bounds = code.table(dtype, "cpu").bounds
    z = _edge_inputs(bounds[:: max(1, len(bounds) // 4000)], torch.Generator().manual_seed(3))
    z = z[torch.isfinite(z)]
    x = z + code.x0  # in_scale 1: the neuron normalises back to z
    table, steps = MBENeuron(code), MBENeuron(code, fast=False)
    assert torch.equal(table(x), steps(x))
    assert torch.equal(table.spike_counts(x), steps.spike_counts(x))


@pytest.mark.parametrize(("primitive", "T", "N"), [("identity", 16, 8), ("gelu", 16, 4), ("exp2", 8, 8),
                                                    ("identity", 3, 8)])
def test_train_values_are_the_trains_extremes(primitive, T, N):
    """What the payload counter reads from a table neuron (each element's smallest and largest
    train entry, recorded per interval) is what the step-by-step trains hold, at and just below
    breakpoints and on a spread."""
    code = load_code(primitive, T, N)
    bounds = code.table(torch.float32, "cpu").bounds
    z = _edge_inputs(bounds[:: max(1, len(bounds) // 3000)], torch.Generator().manual_seed(7))
    x = (z[torch.isfinite(z)] + code.x0).view(-1, 2)
    trains = MBENeuron(code, fast=False).spike_trains(x).flatten(0, 1)  # [T N, *x.shape]
    expected = torch.stack([trains.amin(0), trains.amax(0)], -1).reshape(-1, 2)
    table = MBENeuron(code)
    assert torch.equal(table.train_values(x).unique(dim=0), expected.unique(dim=0))  # by the spike counts
    tab = code.table(torch.float32, "cpu")
    assert tab.count_extremes is not None
    by_interval = tab.extremes.index_select(0, tab.index(x / table.in_scale.float() - code.x0).reshape(-1))
    assert torch.equal(by_interval, expected)  # every element's own extremes
    assert torch.equal(table.train_values(x, rows=3).unique(dim=0), expected[:6].unique(dim=0))
    assert torch.equal(MBENeuron(code, fast=False).train_values(x), expected)
    assert set(expected.unique().tolist()) == {0.0, 1.0}  # binary: silent and firing entries both occur


def test_nan_unchanged():
    """NaN is refused by the evaluation (check_finite); inside a neuron the table path raises on it
    (an out-of-range interval), the step path fires nothing."""
    code = load_code("identity", 8, 8)
    x = torch.tensor([float("nan"), 0.5])
    with pytest.raises(IndexError):
        MBENeuron(code)(x)
    y = MBENeuron(code, fast=False)(x)
    assert y[0] == code.bias and MBENeuron(code, fast=False).spike_counts(x)[0] == 0


def test_counts_kept_for_the_counters_only_while_counting():
    code = load_code("identity", 8, 8)
    n = MBENeuron(code, 2.0, 2.0)
    x = torch.linspace(-2, 2, 101)
    n(x)
    assert n._record is None  # nobody counts: nothing kept
    counting = counting_cache()
    counting.__enter__()
    n(x)
    kept = n.spike_counts(x)
    assert n._record is not None and n._record[1] is kept  # answered from the forward's counts
    assert torch.equal(kept, MBENeuron(code, 2.0, 2.0, fast=False).spike_counts(x))
    assert n.spike_counts(x.clone()) is not kept and torch.equal(n.spike_counts(x.clone()), kept)
    n.set_scale(1.0)  # a new scale: the kept counts are stale
    assert n._record is None
    n(x)
    functional.reset_net(n)
    assert n._record is None
    n(x)
    del x
    assert n._record is None  # the record went with its tensor
    counting.__exit__(None, None, None)


def test_neuron_with_kept_counts_pickles():
    import io
    import pickle

    n = MBENeuron(load_code("identity", 8, 8))
    x = torch.linspace(-1, 1, 11)
    with counting_cache():
        n(x)
    assert n._record is not None
    buf = io.BytesIO()
    torch.save(n, buf)
    copy = pickle.loads(pickle.dumps(n))
    assert copy._record is None and torch.equal(copy(x), n(x))
    from csdlab.snn.mbe_ops import MBESoftmax

    sm = MBESoftmax(MBENeuron(load_code("exp2", 8, 8)), MBENeuron(load_code("recip", 8, 8)))
    scores = torch.randn(2, 5)
    with counting_cache():
        sm(scores)
    assert sm._seen.ref is not None and pickle.loads(pickle.dumps(sm))._seen.ref is None


def _respond_reference(tab, x: Tensor, in_scale: Tensor, x0: float, out_scale: Tensor) -> tuple[Tensor, Tensor]:
    # what the neuron did before the one-pass response: normalise, look up, scale
    z = x / in_scale.to(x.dtype)
    z = z - x0 if x0 != 0.0 else z
    value, spikes = tab.lookup(z)
    return value * out_scale.to(x.dtype), spikes


@pytest.mark.parametrize(("primitive", "T", "N", "sub_grids"), [("identity", 16, 8, False), ("gelu", 16, 4, True),
                                                                 ("exp2", 16, 8, True), ("rsqrt", 16, 8, True),
                                                                 ("recip", 8, 8, None), ("identity", 3, 8, None)])
def test_one_pass_response_is_the_lookup_bit_for_bit(primitive, T, N, sub_grids):
    """The compiled one-pass response (cell records, sub-grids for cells of several bounds) gives
    the lookup's outputs and spike counts bit for bit, and their sum, at and just below every
    breakpoint (scaled back to ``x``), on a spread, at +-0, +-inf and huge values."""
    from csdlab.snn import mbe

    code = load_code(primitive, T, N)
    tab = code.table(torch.float32, "cpu")
    if sub_grids is not None:
        assert tab.sub_grids == sub_grids  # both kernels are exercised
    in_scale, out_scale = torch.tensor(2.5, dtype=torch.float64), torch.tensor(0.75, dtype=torch.float64)
    z = _edge_inputs(tab.bounds, torch.Generator().manual_seed(4))
    for x in (z * 2.5 + code.x0 * 2.5, z):  # near every breakpoint after normalising, and raw
        out = tab.respond(x, in_scale, code.x0, out_scale)
        if out is None:
            pytest.skip(f"torch.compile unavailable here ({mbe._RESPOND.failed})")
        y, spikes, total = out
        ref_y, ref_spikes = _respond_reference(tab, x, in_scale, code.x0, out_scale)
        assert torch.equal(y, ref_y) and torch.equal(spikes, ref_spikes)
        assert int(total) == int(ref_spikes.sum())
    assert (mbe._RESPOND_SUB if tab.sub_grids else mbe._RESPOND)._compiled is not None  # the compiled pass ran


def test_one_pass_response_with_wide_spike_counts():
    """The 8-byte records keep spikes at a cell's left end in uint8; a code that can fire more than
    254 times (24 bases, 12 steps) takes int16 there, with the same results as the lookup."""
    code = MBECode.halving(12, 24, 0.0, 1.0, dither=True)
    tab = code.table(torch.float32, "cpu")
    assert tab.pairs is not None and tab.lefts.dtype == torch.int16 and int(tab.spikes.max()) > 254
    one = torch.tensor(1.0, dtype=torch.float64)
    x = _edge_inputs(tab.bounds, torch.Generator().manual_seed(8))
    out = tab.respond(x, one, 0.0, one)
    if out is None:
        pytest.skip("torch.compile unavailable here")
    ref = _respond_reference(tab, x, one, 0.0, one)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]) and int(out[2]) == int(ref[1].sum())


def test_one_pass_response_flags_dense_cells_of_8_byte_records():
    """8-byte records over a grid with cells of several bounds (what a table with non-finite end
    bounds gets): those cells' elements, and the elements at or above the bound of the cell
    before one, are flagged and take the lookup; the result is the lookup's, bit for bit."""
    from dataclasses import replace

    from csdlab.snn import mbe

    code = load_code("gelu", 8, 4)
    tab = code.table(torch.float32, "cpu")
    geom, per = mbe._grid_of(tab.bounds, 4096)
    per = per[:4096]
    dense = per > 1
    assert int((dense[:-1] & ~dense[1:]).sum()) > 0  # dense cells before cells of at most one bound
    plain = replace(tab, cells=None, sub_grids=False, geom=geom,
                    **mbe._pairs(mbe._records(tab, torch.cumsum(per, 0) - per, per)))
    x = _edge_inputs(tab.bounds, torch.Generator().manual_seed(9))
    one = torch.tensor(1.0, dtype=torch.float64)
    out = plain.respond(x, one, 0.0, one)
    if out is None:
        pytest.skip("torch.compile unavailable here")
    ref = _respond_reference(tab, x, one, 0.0, one)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]) and int(out[2]) == int(ref[1].sum())


def test_one_pass_response_falls_back_for_unresolved_cells(monkeypatch):
    """Sub-grids too coarse to separate their bounds leave cells flagged: those elements take the
    lookup inside the same call, and the result is still the lookup's, bit for bit."""
    from csdlab.snn import mbe

    monkeypatch.setattr(mbe, "SUB_CELLS_PER_BOUND", 1)
    code = load_code("gelu", 8, 4)
    tab = mbe._with_cells(code.table(torch.float32, "cpu"), max_cells=64)
    meta = tab.cells.view(-1, 4)[:, 3]
    assert tab.sub_grids and int((meta[int(tab.geom[2]) + 2:] == -1).sum()) > 0  # unresolved sub-cells
    x = _edge_inputs(tab.bounds, torch.Generator().manual_seed(5))
    one = torch.tensor(1.0, dtype=torch.float64)
    out = tab.respond(x, one, 0.0, one)
    if out is None:
        pytest.skip(f"torch.compile unavailable here ({mbe._RESPOND.failed})")
    flagged = mbe._respond_sub(x, torch.tensor([1.0, 0.0, 1.0]), tab.geom, tab.cells.view(torch.int64))[3]
    assert int(flagged) > 0
    ref = _respond_reference(tab, x, one, 0.0, one)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]) and int(out[2]) == int(ref[1].sum())


def test_one_pass_response_only_where_it_applies(monkeypatch):
    """float64, and a process without torch.compile (CSDLAB_COMPILE=0), take normalise / lookup /
    scale (``respond`` answers None); the neuron's outputs and counts are the same either way."""
    code = load_code("gelu", 16, 4)
    x = torch.randn(5_000, generator=torch.Generator().manual_seed(6)) * 4
    assert code.table(torch.float64, "cpu").respond(x.double(), torch.tensor(1.0), 0.0, torch.tensor(1.0)) is None
    with counting_cache():
        fast = MBENeuron(code, 1.5, 2.0)
        y = fast(x)
        counts, total = fast.spike_counts(x), fast.spike_total(x)
    monkeypatch.setenv("CSDLAB_COMPILE", "0")
    assert code.table(torch.float32, "cpu").respond(x, torch.tensor(1.0), 0.0, torch.tensor(1.0)) is None
    eager = MBENeuron(code, 1.5, 2.0)
    assert torch.equal(eager(x), y) and torch.equal(eager.spike_counts(x), counts)
    assert float(total) == float(counts.sum())
