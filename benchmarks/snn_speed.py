"""SNN simulation speed against the QANN, measured side by side in one run (issue 3).

Prints, for D = 0 and D = 3, ``SNN time for one batch / (T x QANN time for the same batch)`` (a dense
simulation cannot go much below 1.0: every layer sees T input steps) and the peak memory of both;
the last line is ``ratio=<value for D = 3>``.

    python benchmarks/snn_speed.py [--model csdformer_tiny] [--batch 64] [--repeats 5] [--threads 2]

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the peak bytes of live tensor
storages created during the forward pass (tracked by a dispatch mode, allocator-independent).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import csdlab.models  # noqa: F401  (registers csdformer_*)
from csdlab.convert.csdformer import convert_csdformer
from csdlab.quant import ActQuantizer

log = logging.getLogger("snn_speed")


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


def measure(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds per call and peak memory (MiB) of ``fn``."""
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with LiveTensorPeak() as tracker:
            fn()
        peak = tracker.peak
    return statistics.median(times), peak / 2**20


def build_qann(name: str, batch: int, device: torch.device) -> tuple[nn.Module, Tensor]:
    """Random weights, LSQ steps initialised from one batch (as at the start of QAT)."""
    model = timm.create_model(name).to(device)
    x = torch.randn(batch, model.in_chans, model.img_size, model.img_size, device=device)
    model.eval()
    for q in model.modules():
        if isinstance(q, ActQuantizer):
            q.train()
    with torch.no_grad():
        model(x)
    return model.eval(), x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="csdformer_tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    qann, x = build_qann(args.model, args.batch, device)
    snns = {d: convert_csdformer(qann, delay=d) for d in (0, 3)}
    T = snns[3].time_steps
    with torch.no_grad():
        t_qann, mem_qann = measure(lambda: qann(x), args.repeats, device)
        log.info("%s, batch %d, %s: QANN %.2f ms, peak %.1f MiB", args.model, args.batch, device, 1e3 * t_qann, mem_qann)
        ratios = {}
        for d, snn in snns.items():
            t_snn, mem_snn = measure(lambda: snn(x), args.repeats, device)
            ratios[d] = t_snn / (T * t_qann)
            log.info("SNN T=%d D=%d: %.2f ms, peak %.1f MiB (%.2fx the QANN's); time / (T x QANN) = %.3f",
                     T, d, 1e3 * t_snn, mem_snn, mem_snn / mem_qann, ratios[d])
    print(f"ratio={ratios[3]:.3f}")


if __name__ == "__main__":
    main()
