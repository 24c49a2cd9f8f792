"""The compiled LSQ training kernels (docs/methods.md §1.2) against the eager ones: same values."""

from __future__ import annotations

import pytest
import torch

from csdlab.quant import LSQQuantizer, lsq
from csdlab.quant.lsq import compile_enabled, set_compile


def _pair(step: float, levels: int, dtype: torch.dtype) -> tuple[LSQQuantizer, LSQQuantizer]:
    compiled, eager = LSQQuantizer(levels), LSQQuantizer(levels, compile_kernels=False)
    for q in (compiled, eager):
        q.step_size.data.fill_(step)
        q.initialized.fill_(True)
        q.to(dtype)
    return compiled, eager


def _inputs(dtype: torch.dtype, step: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 37, 23, generator=g, dtype=dtype) * 1.5
    # exact ties: x / s = k + 1/2 (round half up) and the clip edges 0 and L
    ties = (torch.arange(-4, 20, dtype=dtype) * 0.5) * step
    x.view(-1)[: ties.numel()] = ties
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("levels", [1, 4])
def test_compiled_equals_eager(dtype: torch.dtype, levels: int) -> None:
    step = 0.25  # a power of two: the ties above are exact
    compiled, eager = _pair(step, levels, dtype)
    x = _inputs(dtype, step)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = compiled(xa), eager(xb)
    if not compile_enabled():
        pytest.skip(f"torch.compile unavailable here: {lsq._FORWARD.failed or lsq._BACKWARD.failed}")
    assert lsq._FORWARD._compiled is not None  # the compiled kernel ran
    assert torch.equal(ya, yb)  # forward: bit for bit, ties included
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)  # straight-through mask: exact
    # d/ds: the same analytic formula, summed in another order
    torch.testing.assert_close(compiled.step_size.grad, eager.step_size.grad, rtol=1e-6, atol=1e-6)
    assert compiled.step_size.grad.abs() > 1e-3  # not trivially zero


def test_eval_mode_and_no_grad_stay_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Spy:  # stands in for the compiled kernels and records when they would run
        def __init__(self, kernel):
            self.kernel = kernel

        @property
        def usable(self):
            return True

        def __call__(self, *args, **kwargs):
            calls.append(1)
            return self.kernel.fn(*args)

    monkeypatch.setattr(lsq, "_FORWARD", Spy(lsq._FORWARD))
    monkeypatch.setattr(lsq, "_BACKWARD", Spy(lsq._BACKWARD))
    q, _ = _pair(0.25, 4, torch.float32)
    x = torch.randn(8, 10)
    q.eval()(x)
    with torch.no_grad():
        q.train()(x)
    assert calls == []
    q.train()(x.requires_grad_()).sum().backward()
    assert calls == [1, 1]  # forward and backward kernels in a training step


def test_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(LSQQuantizer(4), torch.nn.Linear(3, 3), LSQQuantizer(4), torch.nn.ReLU())
    assert set_compile(model, False) == 2
    assert not any(q.compile_kernels for q in model if isinstance(q, LSQQuantizer))
    monkeypatch.setenv("CSDLAB_COMPILE", "0")
    assert not compile_enabled()
    # with compiling switched off the training step still runs and gives the analytic values
    q, _ = _pair(0.5, 4, torch.float32)
    x = torch.tensor([[-1.0, 0.1, 0.25, 0.74, 0.76, 3.0]], requires_grad=True)
    assert q(x).tolist() == [[0.0, 0.0, 0.5, 0.5, 1.0, 2.0]]
