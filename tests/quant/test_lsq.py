"""LSQ / QCFS quantizers (docs/methods.md §1.2): values at level boundaries, gradients, equivalence."""

import math

import pytest
import torch

from csdlab.quant import LSQQuantizer, QCFSQuantizer, make_activation


def _lsq(step: float, levels: int = 4) -> LSQQuantizer:
    q = LSQQuantizer(levels)
    q.step_size.data.fill_(step)
    q.initialized.fill_(True)
    return q


def test_rounds_half_up_at_every_level_boundary():
    q = _lsq(0.5, levels=4)
    eps = 1e-4
    for k in range(4):
        boundary = (k + 0.5) * 0.5  # x/s = k + 1/2 rounds UP to k + 1
        below, at, above = q(torch.tensor([boundary - eps, boundary, boundary + eps], dtype=torch.float64)).tolist()
        assert below == pytest.approx(k * 0.5) and at == pytest.approx((k + 1) * 0.5) and above == pytest.approx((k + 1) * 0.5)
    # clipping: negatives -> 0, beyond L*s -> L*s; torch.round would send 0.25 (x/s = 0.5) to 0
    x = torch.tensor([-1.0, 0.1, 0.25, 0.74, 0.76, 3.0])
    assert q(x).tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 2.0]


def test_lsq_gradients_match_the_formulas():
    levels, s = 4, 0.3
    q = _lsq(s, levels)
    x = torch.tensor([[-0.5, -0.01, 0.1, 0.44, 0.46, 0.8, 1.1, 1.25, 5.0]], requires_grad=True)  # one sample
    q(x).sum().backward()
    v = x.detach() / s
    inside = (v >= 0) & (v <= levels)
    # dy/dx: straight-through inside [0, L*s], zero outside
    assert torch.equal(x.grad, inside.float())
    # dy/ds: round(v) - v inside, L above, 0 below; times g = 1/sqrt(numel * L)
    ds = torch.where(inside, torch.floor(v + 0.5) - v, torch.where(v > levels, torch.tensor(float(levels)), torch.tensor(0.0)))
    g = 1 / math.sqrt(x[0].numel() * levels)  # numel per sample
    assert q.step_size.grad.item() == pytest.approx(float(ds.sum()) * g, rel=1e-5)


def test_step_initialised_from_first_training_batch():
    q = LSQQuantizer(4).train()
    x = torch.randn(64, 10)
    q(x)
    assert bool(q.initialized)
    assert q.step_size.item() == pytest.approx(float(2 * x.abs().mean() / 2.0), rel=1e-6)  # 2 mean|x| / sqrt(4)
    s = q.step_size.item()
    q(torch.randn(64, 10) * 100)  # later batches do not re-initialise
    assert q.step_size.item() == s


@pytest.mark.parametrize("levels", [1, 2, 4, 8])
def test_lsq_equals_qcfs_with_lam_equal_s_times_L(levels):
    torch.manual_seed(levels)
    s = 0.37
    lsq = _lsq(s, levels)
    qcfs = QCFSQuantizer(levels)
    qcfs.clip.data.fill_(s * levels)
    x = torch.randn(10_000, dtype=torch.float64) * 2
    torch.testing.assert_close(lsq(x), qcfs(x), rtol=0, atol=1e-12)
    assert qcfs.threshold.item() == pytest.approx(lsq.threshold.item())


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_levels_below_one_rejected(bad):
    with pytest.raises(ValueError, match=f"levels L must be an integer >= 1, got {bad!r}"):
        LSQQuantizer(bad)
    with pytest.raises(ValueError, match=f"levels L must be an integer >= 1, got {bad!r}"):
        QCFSQuantizer(bad)


def test_unknown_activation_rejected():
    with pytest.raises(ValueError, match="relu.*lsq.*qcfs"):
        make_activation("gelu")
