"""CSDformer SNN simulation speed against the QANN, measured side by side in one run (issues 3, 9).

For D = 0 and D = 3 (T = L = 4): ``SNN time for one batch / (T x QANN time for the same batch)``.
A dense simulation cannot go much below 1.0: every layer sees T input steps. The SNN is timed
alone and *with the evaluation's own counters* around it: ``csdlab.eval.counters.FiringCounter``
(events of every neuron layer) and ``csdlab.eval.counters.OpCounter`` (every spike-fed Conv2d / Linear:
non-zero input events x actual fan-out, per time step; modules with ``count_ops`` count
themselves; the analog first conv and head: dense MACs). All candidates are interleaved round by
round (``benchmarks/_timing.py``), medians reported; the last line is
``ratio=<SNN at D = 3 with counting / (T x QANN)>``.

    python benchmarks/snn_speed.py [--model csdformer_tiny] [--batch 64] [--repeats 10] [--threads 1]

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the peak bytes of live tensor
storages created during the forward pass (``LiveTensorPeak``, allocator-independent; under it the
DIF neurons run their eager loop, which allocates the same tensors as the compiled one).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import Tensor, nn

import csdlab.models  # noqa: F401  (registers csdformer_*)
from _timing import add_common_args, interleaved, medians, peak_mib, print_ratio, setup
from csdlab.convert.csdformer import SpikingCSDformer, convert_csdformer
from csdlab.eval.counters import SimulationCounters
from csdlab.quant import ActQuantizer

__all__ = ["build_qann", "counted", "build_parser", "measure"]

log = logging.getLogger("snn_speed")


def counted(snn: SpikingCSDformer, x: Tensor) -> Tensor:
    """One simulation with the evaluation's firing and operation counters attached."""
    with SimulationCounters(snn, device=x.device):
        return snn(x)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, repeats=10)
    parser.add_argument("--model", default="csdformer_tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 3])
    return parser


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every timing and peak memory of the benchmark (``benchmarks/gpu_check.py`` calls this);
    ``ratio``: SNN at D = 3 with counting / (T x QANN)."""
    device = setup(args)
    if 3 not in args.delays:
        raise ValueError(f"--delays must include 3 (the ratio line is D = 3), got {args.delays}")
    qann, x = build_qann(args.model, args.batch, device)
    snns = {d: convert_csdformer(qann, delay=d) for d in args.delays}
    T = snns[3].time_steps

    fns: dict[str, Callable[[], Any]] = {"qann": lambda: qann(x)}
    for d in args.delays:
        fns[f"snn D={d}"] = lambda d=d: snns[d](x)
        fns[f"snn D={d} +count"] = lambda d=d: counted(snns[d], x)
    with torch.no_grad():
        med = medians(interleaved(fns, args.repeats, device, args.warmup))
        mem = {"qann": peak_mib(fns["qann"], device)}
        for d in args.delays:
            mem[f"snn D={d}"] = peak_mib(fns[f"snn D={d}"], device)
    return {"device": str(device), "T": T, "seconds": med, "peak_mib": mem,
            "ratio": med["snn D=3 +count"] / (T * med["qann"])}


def main() -> None:
    args = build_parser().parse_args()
    res = measure(args)
    med, mem, T = res["seconds"], res["peak_mib"], res["T"]
    log.info("%s, batch %d, %s, %d threads, T=%d, %d interleaved rounds", args.model, args.batch, res["device"],
             torch.get_num_threads(), T, args.repeats)
    log.info("QANN forward               %9.2f ms   peak %7.1f MiB", 1e3 * med["qann"], mem["qann"])
    for d in args.delays:
        sim, cnt = med[f"snn D={d}"], med[f"snn D={d} +count"]
        log.info("SNN D=%d simulation only    %9.2f ms   time / (T x QANN) = %.3f   peak %7.1f MiB (%.2fx the QANN's)",
                 d, 1e3 * sim, sim / (T * med["qann"]), mem[f"snn D={d}"], mem[f"snn D={d}"] / mem["qann"])
        log.info("SNN D=%d with counting      %9.2f ms   time / (T x QANN) = %.3f", d, 1e3 * cnt, cnt / (T * med["qann"]))
    print_ratio(res["ratio"])


if __name__ == "__main__":
    main()
