"""csdlab.compiling: a compiled kernel falls back to its eager function, and says so once."""

from __future__ import annotations

import logging

import pytest
import torch

from csdlab import compiling
from csdlab.compiling import CompiledKernel, compile_allowed


def _axpy(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return x * a + 1.0


def test_failed_compile_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    k = CompiledKernel(_axpy)
    x, a = torch.arange(4.0), torch.tensor(2.0)
    with caplog.at_level(logging.WARNING, logger=compiling.__name__):
        assert k(x, a).tolist() == [1.0, 3.0, 5.0, 7.0]
        assert k(x, a).tolist() == [1.0, 3.0, 5.0, 7.0]
    assert k.failed is not None and "no C++ compiler" in k.failed and not k.usable
    assert sum("failed" in r.message for r in caplog.records) == 1  # logged once, then quietly eager


@pytest.mark.parametrize(("value", "allowed"), [("0", False), ("off", False), ("False", False), ("1", True), ("", True)])
def test_environment_switch(monkeypatch: pytest.MonkeyPatch, value: str, allowed: bool) -> None:
    monkeypatch.setenv("CSDLAB_COMPILE", value)
    assert compile_allowed() is allowed
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(1) or fn)
    CompiledKernel(_axpy)(torch.ones(2), torch.tensor(3.0))
    assert calls == ([1] if allowed else [])


def test_first_call_says_it_compiles(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The first call of a kernel compiles (seconds to a minute on a CPU): it is announced, once."""
    monkeypatch.setenv("CSDLAB_COMPILE", "1")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    k = CompiledKernel(_axpy)
    with caplog.at_level(logging.INFO, logger=compiling.__name__):
        for _ in range(3):
            k(torch.ones(2), torch.tensor(3.0))
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("compiling _axpy with torch.compile") for m in messages) == 1
    assert sum(m.startswith("compiled _axpy in ") for m in messages) == 1


def test_inductor_cache_is_separate_per_cpu_capability() -> None:
    """Kernels compiled under one ATEN_CPU_CAPABILITY must not be reused under another (inductor's
    cache key ignores it: a process with avx2 reused AVX-512 kernels and corrupted the heap)."""
    import os

    import torch

    import csdlab.compiling  # noqa: F401  sets the folder on import

    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(f"_{capability}")
