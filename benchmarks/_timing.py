"""Shared preamble and timing loop of the benchmarks (not collected by pytest).

Every benchmark compares two or more callables measured *side by side in one run*: rounds are
interleaved (A, B, A, B, ... with the order rotated every round), so load from other processes
hits every candidate alike, and the median per candidate is reported. The last line a benchmark
prints is ``ratio=<value>`` (:func:`print_ratio`).

    from _timing import add_common_args, setup, interleaved, peak_mib, print_ratio

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the peak bytes of live tensor
storages created during the call (:class:`LiveTensorPeak`, allocator-independent).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["add_common_args", "setup", "sync", "interleaved", "medians", "LiveTensorPeak", "peak_mib",
           "print_ratio"]

log = logging.getLogger("benchmarks")


def add_common_args(parser: argparse.ArgumentParser, repeats: int = 10) -> argparse.ArgumentParser:
    """``--repeats``, ``--warmup``, ``--threads``, ``--device``, ``--seed`` (shared by every benchmark)."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds per candidate (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per candidate first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Logging to stdout, thread count, seed; returns the device. Raises ``ValueError`` on bad values."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for, but CUDA is not available; use --device cpu")
    torch.manual_seed(args.seed)
    return device


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU), so wall-clock time covers the kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, device: torch.device,
                warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of every candidate, ``repeats`` interleaved rounds after ``warmup`` rounds.

    The order inside a round is rotated each round, so no candidate always runs right after the
    same neighbour (cache, allocator and frequency effects spread evenly).
    """
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for k in names[shift:] + names[:shift]:
            sync(device)
            t0 = time.perf_counter()
            fns[k]()
            sync(device)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storages produced inside the mode and still alive (CPU peak memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage pointer -> live tensors using it

    def _release(self, ptr: int, nbytes: int) -> None:
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            del self._refs[ptr]
            self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or id(t) in inputs:  # in-place ops return their input
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr not in self._refs:
                self._refs[ptr] = 0
                self.live += nbytes
            self._refs[ptr] += 1
            weakref.finalize(t, self._release, ptr, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory of one call of ``fn`` above what was allocated before it, MiB."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with LiveTensorPeak() as tracker:
        fn()
    return tracker.peak / 2**20


def print_ratio(value: float) -> None:
    """The benchmark's result, the last line it prints (machine-readable)."""
    print(f"ratio={value:.3f}")  # noqa: T201 - the one line meant for stdout
