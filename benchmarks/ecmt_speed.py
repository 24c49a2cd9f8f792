"""ECMT SNN simulation speed against the float ViT, measured side by side in one run (issue 4).

Prints the SNN's time per time step divided by the ANN's forward time on the same batch (target:
at most 1.5) and the peak memory of both; the last line is ``ratio=<value>``. ANN and SNN runs
are interleaved, repeat by repeat, so load from other processes hits both alike; medians are used.

    python benchmarks/ecmt_speed.py [--model vit_small_patch16_224] [--batch 8] [--T 4] [--repeats 5]

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the peak bytes of live tensor
storages (``LiveTensorPeak`` of ``benchmarks/snn_speed.py``). The SNN's figure covers a whole
T-step simulation (its state: membranes and EC running sums).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import timm
import torch

from csdlab.convert.vit import convert_vit, mt_sites, simulate
from snn_speed import LiveTensorPeak  # benchmarks/ is on sys.path when this file runs as a script

log = logging.getLogger("ecmt_speed")


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with LiveTensorPeak() as tracker:
        fn()
    return tracker.peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="count spikes per level (as the evaluation does)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ann = timm.create_model(args.model).to(device).eval()
    x = torch.randn(args.batch, 3, *ann.patch_embed.img_size, device=device)
    snn = convert_vit(ann, levels=args.levels)
    for m in mt_sites(snn).values():
        m.record = args.record
        m.set_thresholds(0.05, 0.05)  # random weights: thresholds at the activations' scale so neurons fire
    with torch.no_grad():
        ann(x), simulate(snn, x, args.T)  # warm-up
        t_ann, t_snn = [], []
        for _ in range(args.repeats):
            t_ann.append(seconds(lambda: ann(x), device))
            t_snn.append(seconds(lambda: simulate(snn, x, args.T), device) / args.T)
        mem_ann = peak_mib(lambda: ann(x), device)
        mem_snn = peak_mib(lambda: simulate(snn, x, args.T), device)
    ann_s, snn_s = statistics.median(t_ann), statistics.median(t_snn)
    ratio = snn_s / ann_s
    log.info("%s, batch %d, %s, T=%d, n=%d, record=%s", args.model, args.batch, device, args.T, args.levels,
             args.record)
    log.info("ANN forward     %9.2f ms   peak %8.1f MiB", 1e3 * ann_s, mem_ann)
    log.info("SNN per step    %9.2f ms   peak %8.1f MiB (%.2fx the ANN's)", 1e3 * snn_s, mem_snn, mem_snn / mem_ann)
    log.info("SNN time per step / ANN forward time = %.3f", ratio)
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
