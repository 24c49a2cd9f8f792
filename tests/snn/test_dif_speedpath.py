"""The fast DIF neuron and TDEC operators (docs/methods.md §1.3-1.4) against literal references:
every spike, the final membrane and every TDEC output bit for bit, exact ties included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional
from torch import Tensor, nn

from csdlab.snn.neurons import DelayedIFNode
from csdlab.snn.tdec import TDECMatMul, TDECMaxPool2d, cumsum_steps, difference_steps, difference_steps_


def literal_dif(x: Tensor, theta: Tensor, delay: int, v: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Algorithm 1 as written: v = theta/2; integrate while t <= T; fire and subtract once t > D."""
    theta = theta.to(x.dtype)
    v = torch.full_like(x[0], 0.5) * theta if v is None else v.clone()
    spikes = []
    for t in range(x.shape[0] + delay):
        if t < x.shape[0]:
            v = v + x[t]
        if t >= delay:
            s = (v >= theta).to(x.dtype)
            v = v - s * theta
            spikes.append(s)
    return torch.stack(spikes), v


def _currents(T: int, n: int, dtype: torch.dtype, theta: float, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=g, dtype=dtype) * theta
    # a third on a grid of theta/4: sums land exactly on theta, 2 theta, ... (ties of v >= theta)
    grid = torch.randint(-4, 9, (T, n // 3), generator=g).to(dtype) * (theta / 4)
    x[:, : n // 3] = grid
    x[:, n // 3 : n // 3 + 5] = 0.0  # silent neurons: v stays theta/2
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("T", "delay"), [(1, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3), (4, 5), (5, 4)])
def test_eager_dif_equals_literal(T: int, delay: int, dtype: torch.dtype) -> None:
    theta = 0.75  # theta / 4 is exact: grid sums hit theta exactly
    x = _currents(T, 3000, dtype, theta, seed=T * 10 + delay)
    node = DelayedIFNode(torch.tensor(theta, dtype=dtype), delay, compile_kernel=False)
    spikes = node(x)
    ref_spikes, ref_v = literal_dif(x, node.v_threshold, delay)
    assert torch.equal(spikes, ref_spikes) and torch.equal(node.v, ref_v)
    ties = ((x[:, :1000].sum(0) + theta / 2) % theta == 0).sum()
    assert ties > 50  # the grid really produced exact ties


@pytest.mark.parametrize(("T", "delay", "dtype"), [(4, 3, torch.float32), (4, 0, torch.float32),
                                                   (3, 1, torch.float32), (4, 3, torch.float64)])
def test_compiled_dif_equals_literal(T: int, delay: int, dtype: torch.dtype) -> None:
    theta = torch.tensor(0.3, dtype=dtype)  # not a power of two: rounding in every subtraction
    x = _currents(T, 5000, dtype, 0.3, seed=delay)
    node = DelayedIFNode(theta, delay, compile_kernel=True)
    spikes = node(x.view(T, 50, 100)).view(T, -1)
    if DelayedIFNode._kernel.failed:
        pytest.skip(f"torch.compile unavailable here: {DelayedIFNode._kernel.failed}")
    assert DelayedIFNode._kernel._compiled is not None
    ref_spikes, ref_v = literal_dif(x, theta, delay)
    assert torch.equal(spikes, ref_spikes)
    assert torch.equal(node.v.view(-1), ref_v)
    assert spikes.shape == (T, 5000) and 0 < spikes.mean() < 1


def test_dif_continues_a_supplied_state() -> None:
    x = _currents(4, 600, torch.float32, 1.0, seed=3)
    node = DelayedIFNode(1.0, 1)
    first = node(x[:2])
    second = node(x[2:])  # no reset: continues from the stored membrane (eager path)
    ref1, v1 = literal_dif(x[:2], node.v_threshold, 1)
    ref2, v2 = literal_dif(x[2:], node.v_threshold, 1, v1)
    assert torch.equal(first, ref1) and torch.equal(second, ref2) and torch.equal(node.v, v2)
    functional.reset_net(node)
    assert node.v is None


def test_dif_auto_compile_threshold() -> None:
    node = DelayedIFNode(1.0, 3)
    assert not node._use_kernel(torch.zeros(4, DelayedIFNode.COMPILE_MIN_NEURONS - 1))
    assert node._use_kernel(torch.zeros(4, 2, DelayedIFNode.COMPILE_MIN_NEURONS // 2))
    assert not DelayedIFNode(1.0, 3, compile_kernel=False)._use_kernel(torch.zeros(4, 1 << 20))


def test_dif_count_events_is_count_nonzero() -> None:
    x = _currents(4, 4000, torch.float32, 1.0, seed=5)
    node = DelayedIFNode(1.0, 3)
    spikes = node(x)
    events, steps = node.count_events((x,), spikes)
    assert events.dtype == torch.float64 and float(events) == float(torch.count_nonzero(spikes)) > 0
    assert steps == spikes.numel()


def _old_tdec_pool(x: Tensor, k: int, s: int, p: int) -> Tensor:
    counts = torch.cat([torch.zeros_like(x[:1]), x.cumsum(0)])
    pooled = F.max_pool2d(counts.flatten(0, 1), k, s, p).unflatten(0, counts.shape[:2])
    return pooled[1:] - pooled[:-1]


@pytest.mark.parametrize(("k", "s", "p", "hw"), [(3, 2, 1, (16, 16)), (3, 2, 1, (9, 7)), (2, 2, 0, (8, 10)),
                                                 (3, 1, 1, (5, 5))])
def test_tdec_maxpool_equals_concat_cumsum_form(k: int, s: int, p: int, hw: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(k + s + p)
    x = (torch.rand(4, 3, 5, *hw, generator=g) < 0.4).float()
    y = TDECMaxPool2d.from_module(nn.MaxPool2d(k, s, p))(x)
    assert torch.equal(y, _old_tdec_pool(x, k, s, p))
    assert y.is_contiguous()  # the channels-last detour does not leak out


def test_tdec_matmul_equals_concat_cumsum_form() -> None:
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(4, 2, 3, 7, 16, generator=g) < 0.5).float()
    b = (torch.rand(4, 2, 3, 16, 9, generator=g) < 0.5).float().transpose(-2, -1).contiguous().transpose(-2, -1)
    sa = torch.cat([torch.zeros_like(a[:1]), a.cumsum(0)])
    sb = torch.cat([torch.zeros_like(b[:1]), b.cumsum(0)])
    prod = sa @ sb
    assert torch.equal(TDECMatMul()(a, b), prod[1:] - prod[:-1])


def test_step_helpers() -> None:
    x = torch.randint(0, 2, (5, 3, 4)).float()
    assert torch.equal(cumsum_steps(x), x.cumsum(0))
    assert torch.equal(difference_steps(x.cumsum(0)), x)
    assert torch.equal(difference_steps_(x.cumsum(0)), x)
