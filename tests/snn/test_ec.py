"""Expectation-compensation modules of ECMT (docs/methods.md §2.3): anytime correctness, the
multi-step path against the single-step one, and the matrix-product EC's operation counts."""

from __future__ import annotations

import pytest
import torch

from csdlab.snn.ecmt import ECFunction, ECMatMul, running_sum


def _single_steps(module: torch.nn.Module, *seqs: torch.Tensor) -> torch.Tensor:
    module.step_mode = "s"
    module.reset()
    return torch.stack([module(*(s[t] for s in seqs)) for t in range(seqs[0].shape[0])])


def _multi_steps(module: torch.nn.Module, *seqs: torch.Tensor, chunks: tuple[int, ...]) -> torch.Tensor:
    """Multi-step in chunks of steps (states carried between calls), time-flattened input."""
    module.step_mode = "m"
    module.reset()
    outs, start = [], 0
    for steps in chunks:
        module.flat_steps = steps
        flat = [s[start:start + steps].flatten(0, 1) for s in seqs]  # [steps*B, ...]
        outs.append(module(*flat).unflatten(0, (steps, -1)))
        start += steps
    module.flat_steps = None
    return torch.cat(outs)


def test_running_sum_is_the_single_step_sum() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 300)
    start = torch.randn(300)
    expected, s = [], start
    for xt in x:
        s = s + xt
        expected.append(s)
    assert torch.equal(running_sum(x, start), torch.stack(expected))  # bit-identical in float32
    assert torch.equal(running_sum(x)[0], x[0])


def test_ec_function_running_mean_is_f_of_running_mean() -> None:
    torch.manual_seed(0)
    ec = ECFunction(torch.nn.GELU())
    x = torch.randn(6, 50)
    outs = torch.stack([ec(xt) for xt in x])
    t = torch.arange(1, 7).view(-1, 1)
    torch.testing.assert_close(outs.cumsum(0) / t, torch.nn.functional.gelu(x.cumsum(0) / t), atol=1e-6, rtol=0)


def test_ec_matmul_running_mean_is_product_of_running_means() -> None:
    torch.manual_seed(0)
    mm = ECMatMul(scale=0.5)
    a, b = torch.randn(5, 2, 4, 3), torch.randn(5, 2, 3, 6)
    outs = torch.stack([mm(a[i], b[i]) for i in range(5)])
    t = torch.arange(1, 6).view(-1, 1, 1, 1)
    expected = 0.5 * (a.cumsum(0) / t) @ (b.cumsum(0) / t)
    torch.testing.assert_close(outs.cumsum(0) / t, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunks", [(7,), (3, 4), (1, 1, 5)])
@pytest.mark.parametrize("fn", [lambda: torch.nn.LayerNorm(16), torch.nn.GELU, lambda: torch.nn.Softmax(dim=-1)])
def test_ec_function_multi_step_equals_single_step(fn, chunks: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 3, 5, 16)
    ec = ECFunction(fn())
    # float32: the same operations in the same order, so the same bits
    assert torch.equal(_multi_steps(ec, x, chunks=chunks), _single_steps(ec, x))
    ec, x = ec.double(), x.double()
    assert torch.equal(_multi_steps(ec, x, chunks=chunks), _single_steps(ec, x))


@pytest.mark.parametrize("chunks", [(6,), (2, 4), (1, 5)])
def test_ec_matmul_multi_step_equals_single_step(chunks: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(6, 2, 3, 5, 4).double(), torch.randn(6, 2, 3, 4, 7).double()
    mm = ECMatMul(scale=0.3)
    diff = (_multi_steps(mm, a, b, chunks=chunks) - _single_steps(mm, a, b)).abs().max().item()
    assert diff <= 1e-12, diff


def test_ec_matmul_counts_additions_and_scalings() -> None:
    mm = ECMatMul()
    a = torch.zeros(1, 4, 8)
    a[0, 0, :2] = 1.0  # event fraction 2/32
    b = torch.ones(1, 8, 5)  # event fraction 1
    mm(a, b)
    macs, acs = mm.count_ops((a, b), mm(a, b))  # second step: all four parts of Eq. 43
    n, p, m, ea = 4, 8, 5, 2 / 32
    assert acs == pytest.approx((ea * 1 + ea + 1) * n * p * m + 3 * n * m)
    assert macs == pytest.approx((ea + ea + 1) * n * m + n * m)


def test_ec_matmul_per_step_counts_equal_single_step_counts() -> None:
    torch.manual_seed(0)
    # spike-like operands: sparse, a different event fraction at every step
    a = torch.randn(5, 2, 3, 6, 4) * (torch.rand(5, 2, 3, 6, 4) < torch.linspace(0.1, 0.9, 5).view(-1, 1, 1, 1, 1))
    b = torch.randn(5, 2, 3, 4, 6) * (torch.rand(5, 2, 3, 4, 6) < 0.3)
    mm = ECMatMul(scale=0.5)
    single = []
    for t in range(5):
        out = mm(a[t], b[t])
        single.append(mm.count_ops((a[t], b[t]), out))
    mm.reset()
    mm.step_mode, mm.flat_steps = "m", 5
    flat = (a.flatten(0, 1), b.flatten(0, 1))
    macs, acs = mm.count_ops(flat, mm(*flat))
    assert macs.shape == acs.shape == (5,)
    assert macs.tolist() == pytest.approx([float(s[0]) for s in single], rel=1e-12)
    assert acs.tolist() == pytest.approx([float(s[1]) for s in single], rel=1e-12)
    # a second chunk continues at t = 6: no step is counted as a first step again
    macs2, acs2 = mm.count_ops(flat, mm(*flat))
    assert acs2[0] > acs[0]


def test_dropped_state_is_not_continued_silently() -> None:
    ec = ECFunction(torch.nn.GELU())
    ec.step_mode, ec.keep_state = "m", False
    x = torch.randn(4, 2, 3)
    ec(x)
    with pytest.raises(RuntimeError, match="keep_state=False"):
        ec(x)
    ec.reset()
    ec(x)
