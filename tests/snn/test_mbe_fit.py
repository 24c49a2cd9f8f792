"""MBE fitting (docs/methods.md §4.2): paper Table X targets at T = 16, and bit-identical refits."""

import pytest
import torch

from csdlab.snn.mbe import load_codes, table_path
from csdlab.snn.mbe_fit import FitConfig, fit_all, fit_primitive, initial_code, mse_on_grid


# paper Table X (T = 16): GELU on (-120, 10) with N = 4 and 8; the others with N = 8
@pytest.mark.parametrize(("primitive", "N", "target"), [("gelu", 4, 2.3e-4), ("gelu", 8, 1.0e-4), ("exp2", 8, 5.3e-5),
                                                       ("recip", 8, 4.4e-5), ("rsqrt", 8, 4.9e-5)])
def test_shipped_fit_meets_table_x(primitive, N, target):
    code = load_codes(16, N)[primitive]
    assert code.T == 16 and code.N == N
    assert mse_on_grid(code) <= target
    assert mse_on_grid(code, dtype=torch.float32) <= target  # as the network runs it


@pytest.mark.parametrize("T", [8, 10, 12, 16])
def test_identity_code_is_finer_than_one_basis(T):
    code = load_codes(T, 8)["identity"]
    assert code.bias == 0.0  # its products are pure ANDs
    # uniform error on [-1, 1] of a T-bit code with step 2^-(T-1) is 2^-2(T-1) / 12 per basis
    assert mse_on_grid(code) <= 2.0 ** (-2 * (T - 1)) / 12


def test_refit_reproduces_the_shipped_file(tmp_path):
    fit_all(tmp_path, Ts=[4], Ns=[4])
    assert (tmp_path / "mbe_T4_N4.json").read_bytes() == table_path(4, 4).read_bytes()


def test_fit_is_seeded_and_improves_on_the_halving_start():
    cfg = FitConfig(points=2000, steps=30, check_every=10)
    a, info = fit_primitive("exp2", 8, 4, cfg)
    b, _ = fit_primitive("exp2", 8, 4, cfg)
    assert a.to_dict() == b.to_dict()
    c, _ = fit_primitive("exp2", 8, 4, FitConfig(points=2000, steps=30, check_every=10, seed=1))
    assert a.to_dict() != c.to_dict()
    assert info["mse_fit"] <= info["mse_init"]
    start = initial_code("exp2", 8, 4)
    assert torch.allclose(start.k_th, torch.full((4,), 0.6931471805599453, dtype=torch.float64))


def test_bad_mode():
    with pytest.raises(ValueError, match="sign mode"):
        initial_code("gelu", 8, 4, mode="mirror")
