"""``torch.compile`` with an eager fallback for csdlab's few hot elementwise kernels.

Training applies an LSQ quantizer after every layer and a converted SNN runs a DIF neuron there;
eagerly, each is a chain of 5-12 elementwise passes over large tensors, which inductor fuses into
one loop (:mod:`csdlab.quant.lsq`, :mod:`csdlab.snn.neurons`). The plain Python function is always
the reference: a kernel falls back to it

* where compiling is impossible (no C++ compiler or Triton, unsupported platform): the first
  failure is logged and the process stays eager from then on;
* when the environment variable ``CSDLAB_COMPILE`` is ``0`` (or ``false`` / ``no`` / ``off``);
* inside an outer ``torch.compile`` (dynamo then traces the plain function into its own graph),
  and under a Python dispatch mode (a memory tracker, a FLOP counter), which dynamo does not trace.

Inductor compiles with ``-ffp-contract=off`` and without unsafe math, so a compiled kernel
performs the same IEEE operations as the eager one: the tests check bit equality.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["COMPILE_ENV", "compile_allowed", "CompiledKernel"]

log = logging.getLogger(__name__)

#: environment variable: ``0`` keeps every csdlab kernel eager (no torch.compile) in this process
COMPILE_ENV = "CSDLAB_COMPILE"


def _separate_inductor_cache() -> None:
    """One inductor cache folder per CPU capability. Inductor's on-disk cache does not key its C++
    kernels on ``ATEN_CPU_CAPABILITY``: a process running with ``avx2`` reused the AVX-512 kernels of
    an earlier process (or the reverse) and wrote out of bounds (heap corruption, values of 1e22).
    A user's own ``TORCHINDUCTOR_CACHE_DIR`` is left as it is (torch itself writes its default
    folder into that variable once it has used it: that one is replaced)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is not None and os.path.abspath(current) != default:
        return
    capability = torch.backends.cpu.get_cpu_capability().lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default}_{capability}"


_separate_inductor_cache()


def compile_allowed() -> bool:
    """False when ``CSDLAB_COMPILE`` is ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get(COMPILE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class CompiledKernel:
    """``fn`` compiled on first use (dynamic shapes, one graph), ``fn`` itself as the fallback.

    Args:
        fn: a pure tensor function (no side effects, no data-dependent Python control flow).
        options: inductor options for this kernel (e.g. ``{"assert_indirect_indexing": False}``
            for a gather whose indices are in range by construction).
    """

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any] | None = None) -> None:
        self.fn = fn
        self.options = dict(options or {})
        self._compiled: Callable[..., Any] | None = None
        self.failed: str | None = None  # why compiling failed, once it has

    @property
    def usable(self) -> bool:
        """Whether the compiled kernel may be used now: allowed, not failed, not inside dynamo, and
        no Python dispatch mode active (dynamo does not trace under one, e.g. a memory tracker)."""
        return (self.failed is None and compile_allowed() and not torch.compiler.is_compiling()
                and _get_current_dispatch_mode() is None)

    def __call__(self, *args: Any, compiled: bool = True) -> Any:
        """Run the compiled kernel when ``compiled`` and :attr:`usable`, else the eager ``fn``."""
        if compiled and self.usable:
            try:
                if self._compiled is None:
                    # dynamic: the callers pass flattened tensors, so one graph serves every size
                    self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True,
                                                   options=self.options or None)
                    # the first call compiles (seconds to a minute on a CPU): say so, the run is not stuck
                    log.info("compiling %s with torch.compile (first use in this process; %s=0 runs it "
                             "eagerly)", self.fn.__qualname__, COMPILE_ENV)
                    start = time.perf_counter()
                    out = self._compiled(*args)
                    log.info("compiled %s in %.1f s", self.fn.__qualname__, time.perf_counter() - start)
                    return out
                return self._compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
                self.failed = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                log.warning("torch.compile of %s failed (%s); running it eagerly from now on (same "
                            "results, slower)", self.fn.__qualname__, self.failed)
        return self.fn(*args)
