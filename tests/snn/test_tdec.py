"""TDEC operators (docs/methods.md §1.3.4): binary max-pool, spike-train product that telescopes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csdlab.snn.tdec import TDECMatMul, TDECMaxPool2d


def _spikes(*shape: int, p: float = 0.4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < p).float()


@pytest.mark.parametrize("padding", [0, 1])
def test_tdec_maxpool_binary_and_sums_to_pool_of_counts(padding: int) -> None:
    x = _spikes(4, 2, 3, 9, 9)
    pool = TDECMaxPool2d.from_module(nn.MaxPool2d(3, stride=2, padding=padding))
    y = pool(x)
    assert y.shape == (4, 2, 3, *F.max_pool2d(x[0], 3, 2, padding).shape[-2:])
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(y.sum(0), F.max_pool2d(x.sum(0), 3, 2, padding))
    # the output is a different train from pooling each step (that would over-count)
    assert y.sum() < F.max_pool2d(x.flatten(0, 1), 3, 2, padding).sum()


def test_tdec_maxpool_rejects_unsupported() -> None:
    with pytest.raises(ValueError, match="ceil_mode"):
        TDECMaxPool2d.from_module(nn.MaxPool2d(2, ceil_mode=True))


def test_tdec_matmul_sums_to_product_of_counts() -> None:
    T = 4
    a, b = _spikes(T, 2, 3, 5, 8, seed=1), _spikes(T, 2, 3, 8, 6, seed=2)
    p = TDECMatMul()(a, b)
    assert p.shape == (T, 2, 3, 5, 6)
    assert torch.equal(p.sum(0), a.sum(0) @ b.sum(0))
    # each step equals the three-term form A_t B_t + A_t S^B_{t-1} + S^A_{t-1} B_t
    sa = torch.cat([torch.zeros_like(a[:1]), a.cumsum(0)[:-1]])
    sb = torch.cat([torch.zeros_like(b[:1]), b.cumsum(0)[:-1]])
    assert torch.equal(p, a @ b + a @ sb + sa @ b)
    assert torch.equal(p, p.round()) and p.min() >= 0


def test_tdec_matmul_count_ops() -> None:
    a, b = torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 4, 5)
    a[0, 0, 0, 0] = a[1, 0, 2, 1] = 1.0  # 2 events, fan-out m = 5 twice each
    b[0, 0, 1, 1] = b[1, 0, 3, 4] = 1.0  # only the step-2 event meets a non-zero S^A (fan-out n=3)
    macs, acs = TDECMatMul.count_ops((a, b), TDECMatMul()(a, b))
    assert (macs, acs) == (0.0, 2 * 2 * 5 + 1 * 3)
