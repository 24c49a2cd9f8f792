"""MT neuron (docs/methods.md §2.1): hand-made inputs, multi-step against single-step, level counts."""

from __future__ import annotations

import pytest
import torch
from spikingjelly.activation_based import functional

from csdlab.snn.neurons import MTNeuron


@pytest.mark.parametrize(("current", "out", "v_after"), [
    (0.0, 0.0, 0.0),
    (0.49, 0.0, 0.49),     # below th1/2: silent
    (0.5, 1.0, -0.5),      # th1 * 2^0 - th1/2: smallest positive level
    (1.49, 1.0, 0.49),
    (1.5, 2.0, -0.5),      # th1 * 2^1 - th1/2
    (5.5, 4.0, 1.5),       # 2^2 is the largest level for n = 3 (8 - 0.5 > 5.5)
    (7.5, 8.0, -0.5),      # largest level th1 * 2^(n-1)
    (1000.0, 8.0, 992.0),  # saturates at the largest level, rest stays in the membrane
    (-0.24, 0.0, -0.24),   # above -th2/2: silent
    (-0.25, -0.5, 0.25),   # smallest negative level -th2
    (-0.75, -1.0, 0.25),   # -th2 * 2
    (-3.75, -4.0, 0.25),   # largest negative level -th2 * 2^(n-1)
    (-100.0, -4.0, -96.0),
])
def test_mt_single_step(current: float, out: float, v_after: float) -> None:
    n = MTNeuron(th1=1.0, th2=0.5, levels=4)
    y = n(torch.tensor([current]))
    assert y.item() == pytest.approx(out) and n.v.item() == pytest.approx(v_after, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mt_levels_counted_per_sign(dtype: torch.dtype) -> None:
    n = MTNeuron(th1=1.0, th2=0.5, levels=4, count_levels=True).to(dtype)
    n(torch.tensor([0.5, 1.5, 7.5, 0.1, -0.25, -3.75, -3.75, 0.0, -0.0], dtype=dtype))
    # [+1, +2, +4, +8, -0.5, -1, -2, -4]
    assert n.spike_counts.tolist() == [1, 1, 0, 1, 1, 0, 0, 2] and n.neuron_steps.item() == 9


def test_mt_counts_nothing_by_default_and_counts_are_not_saved() -> None:
    n = MTNeuron(th1=0.3, th2=0.2, levels=4)
    n(torch.randn(100))
    assert n.spike_counts.sum().item() == 0 and n.neuron_steps.item() == 0
    assert set(n.state_dict()) == {"th1", "th2"}  # thresholds are saved, counters are not


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunks", [(8,), (3, 5), (1, 1, 6)])
def test_mt_multi_step_matches_single_step(dtype: torch.dtype, chunks: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    th1, th2 = 0.3, 0.2
    x = (torch.randn(8, 4, 250) * 2).to(dtype)
    single = MTNeuron(th1, th2, levels=8, count_levels=True).to(dtype)
    ys = torch.stack([single(xt) for xt in x])
    multi = MTNeuron(th1, th2, levels=8, count_levels=True).to(dtype)
    multi.step_mode = "m"
    outs, start = [], 0
    for steps in chunks:  # time-flattened [steps*B, ...] chunks, membrane carried between them
        multi.flat_steps = steps
        outs.append(multi(x[start:start + steps].flatten(0, 1)).unflatten(0, (steps, -1)))
        start += steps
    assert torch.equal(torch.cat(outs), ys)  # the same operations: bit-identical
    assert torch.equal(multi.v, single.v)
    assert multi.spike_counts.tolist() == single.spike_counts.tolist()
    assert multi.neuron_steps.item() == single.neuron_steps.item() == x.numel()
    # the counts agree with the spike values: level k at +th1 2^k / -th2 2^k (to rounding: the
    # neuron forms -th2 as -(th1+th2)/2 + (th1-th2)/2)
    levels = torch.cat([th1 * 2.0 ** torch.arange(8), -th2 * 2.0 ** torch.arange(8)]).to(dtype)
    expected = [torch.isclose(ys, lv, rtol=1e-6, atol=0).sum().item() for lv in levels]
    assert single.spike_counts.tolist() == expected and sum(expected) == (ys != 0).sum().item()
    functional.reset_net(single)
    assert single.v is None


def test_mt_spikes_at_most_once_per_step_sign_given_by_membrane() -> None:
    torch.manual_seed(0)
    n = MTNeuron(0.5, 0.25, levels=6)
    n.step_mode = "m"
    x = torch.randn(10, 2000)
    y = n(x)
    allowed = torch.cat([0.5 * 2.0 ** torch.arange(6), -0.25 * 2.0 ** torch.arange(6), torch.zeros(1)])
    assert torch.isin(y, allowed).all()


def test_mt_output_sum_tracks_input_sum() -> None:
    torch.manual_seed(0)
    th1, th2 = 0.3, 0.2
    # inputs within one base threshold per step: the running sums differ by < th at every t
    x = (torch.rand(32, 5000) * 2 - 1) * torch.where(torch.rand(5000) < 0.5, th1, th2)
    n = MTNeuron(th1, th2, levels=8)
    ys = torch.stack([n(xt) for xt in x])
    assert (ys.cumsum(0) - x.cumsum(0)).abs().max().item() < max(th1, th2)
    # large inputs (up to 60 base thresholds per step): once the input stops, the large levels
    # drain the membrane (it halves each step), ending within half a base threshold
    n = MTNeuron(th1, th2, levels=8, count_levels=True)
    x = torch.cat([torch.randn(8, 5000) * 6.0, torch.zeros(12, 5000)])
    ys = torch.stack([n(xt) for xt in x])
    err = (ys.sum(0) - x.sum(0)).abs().max().item()
    assert err <= max(th1, th2) / 2 + 1e-5
    assert n.spike_counts[1:8].sum() > 0 and n.spike_counts[9:].sum() > 0  # higher levels were used


@pytest.mark.parametrize("kwargs", [{"th1": 0.0}, {"th2": -1.0}, {"levels": 0}, {"th1": float("nan")}, {"levels": 2.0}])
def test_mt_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MTNeuron(**kwargs)


def test_mt_inplace_and_count_events() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 200)
    ref = MTNeuron(0.3, 0.2, levels=8)
    ref.step_mode = "m"
    expected = ref(x)
    n = MTNeuron(0.3, 0.2, levels=8, inplace=True)
    n.step_mode = "m"
    current = x.clone()
    y = n(current)
    assert torch.equal(y, expected) and y.data_ptr() == current.data_ptr()  # spikes over the input
    events, steps = n.count_events((current,), y)
    assert events.item() == (expected != 0).sum().item() > 0 and steps == x.numel()


# the first step of th1 = 1, th2 = 0.5, n = 4, by hand. Paper (Eq. 25): the largest level with
# m >= th 2^k - th/2; nearest level: level k >= 1 from m >= 0.75 th 2^k, level 0 from m >= th/2
_FIRST_STEP = [  # current, paper, nearest
    (0.4, 0.0, 0.0), (0.6, 1.0, 1.0), (1.4, 1.0, 1.0), (1.6, 2.0, 2.0),
    (2.9, 2.0, 2.0),    # below 3 = midway between 2 and 4: both keep 2
    (3.1, 2.0, 4.0),    # paper keeps 2 until 3.5 (error 1.1); nearest fires 4 (error 0.9)
    (5.9, 4.0, 4.0), (6.1, 4.0, 8.0), (100.0, 8.0, 8.0),
    (-0.2, 0.0, 0.0), (-0.3, -0.5, -0.5),
    (-1.6, -1.0, -2.0),  # |m| = 3.2 th2: paper's band for 2 th2 ends at 3.5 th2, nearest's at 3 th2
]


@pytest.mark.parametrize("multi_step", [False, True])
def test_mt_nearest_level_first_step_by_hand(multi_step: bool) -> None:
    current = torch.tensor([c for c, _, _ in _FIRST_STEP])
    for nearest, column in ((False, 1), (True, 2)):
        n = MTNeuron(th1=1.0, th2=0.5, levels=4, nearest_level=nearest)
        n.step_mode = "m" if multi_step else "s"
        y = n(current.unsqueeze(0) if multi_step else current).flatten()
        assert y.tolist() == [row[column] for row in _FIRST_STEP], nearest
        # the residual stays in the membrane: nearest may overshoot (negative residual for a positive
        # input), which a later negative spike takes back
        torch.testing.assert_close(n.v.flatten(), current - y)


def test_mt_nearest_level_error_is_never_larger_at_the_first_step() -> None:
    torch.manual_seed(0)
    x = torch.randn(20_000) * 8
    errs = []
    for nearest in (False, True):
        n = MTNeuron(th1=0.3, th2=0.2, levels=8, nearest_level=nearest)
        errs.append((n(x) - x).abs())
    assert (errs[1] <= errs[0] + 1e-6).all() and errs[1].mean() < 0.8 * errs[0].mean()


@pytest.mark.parametrize("multi_step", [False, True])
def test_mt_initial_membrane_changes_the_first_step_by_hand(multi_step: bool) -> None:
    # th1 = 1, th2 = 1, v(0) = 0.5 th1: m(1) = I + 0.5
    current = torch.tensor([0.3, -0.3, -0.6, 1.2, -1.2])
    expected = {0.0: [0.0, 0.0, -1.0, 1.0, -1.0],  # m = I: 0.3 silent, -0.6 fires -1, 1.2 fires 1
                0.5: [1.0, 0.0, 0.0, 2.0, -1.0]}   # m = 0.8, 0.2, -0.1, 1.7, -0.7
    for v0, out in expected.items():
        n = MTNeuron(th1=1.0, th2=1.0, levels=4, initial_membrane=v0)
        n.step_mode = "m" if multi_step else "s"
        y = n(current.unsqueeze(0) if multi_step else current).flatten()
        assert y.tolist() == out, v0
        torch.testing.assert_close(n.v.flatten(), current + v0 - y)
        functional.reset_net(n)  # the next simulation starts from v(0) again
        y2 = n(current.unsqueeze(0) if multi_step else current).flatten()
        assert y2.tolist() == out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("nearest", "v0"), [(True, 0.0), (False, 0.25), (True, 0.5)])
def test_mt_options_multi_step_matches_single_step(dtype: torch.dtype, nearest: bool, v0: float) -> None:
    torch.manual_seed(0)
    x = (torch.randn(6, 3, 300) * 2).to(dtype)
    single = MTNeuron(0.3, 0.2, levels=8, nearest_level=nearest, initial_membrane=v0).to(dtype)
    ys = torch.stack([single(xt) for xt in x])
    multi = MTNeuron(0.3, 0.2, levels=8, nearest_level=nearest, initial_membrane=v0).to(dtype)
    multi.step_mode = "m"
    assert torch.equal(multi(x), ys)  # bit-identical
    allowed = torch.cat([0.3 * 2.0 ** torch.arange(8), -0.2 * 2.0 ** torch.arange(8), torch.zeros(1)]).to(dtype)
    assert torch.isclose(ys.unsqueeze(-1), allowed, rtol=1e-6, atol=0).any(-1).all()  # the same alphabet


@pytest.mark.parametrize("v0", [1.0, -0.1, float("nan"), True, "0.5"])
def test_mt_rejects_bad_initial_membrane(v0: object) -> None:
    with pytest.raises(ValueError, match=r"initial_membrane is a fraction of the threshold th1 in \[0, 1\)"):
        MTNeuron(initial_membrane=v0)
