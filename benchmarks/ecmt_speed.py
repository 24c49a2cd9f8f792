"""ECMT simulation cost against the float ViT, measured side by side in one run (issue 9).

Honest inputs: the trained Fashion-MNIST ViT (``assets/fmnist_vit_tiny.ckpt``, thresholds calibrated
on training batches, test images) and ``vit_small_patch16_224`` at 224 px (random weights: no hub
access here; thresholds calibrated on random images, random images in). For each model and batch:

* **speed**: SNN time per step / ANN forward time, with the evaluation's counting off and on
  (on: the evaluation's own ``FiringCounter`` on every MT site and ``OpCounter`` on every layer,
  per step; ``--count-levels`` adds the MT neurons' per-level histograms). ANN and SNN runs are interleaved
  repeat by repeat, so load from other processes hits both alike; medians are reported, wall
  clock and this thread's CPU time;
* **memory** (``--memory-T`` steps, the largest batch): peak bytes of live tensors (``LiveTensorPeak``,
  allocator-independent; ``torch.cuda.max_memory_allocated`` on a GPU) and, in separate
  processes, the peak process RSS over the run (sampled every 2 ms) minus the RSS before it;
* **calibration**: ``ECMTConverter.calibrate`` time / one ANN pass over the same batches, and the
  peak RSS of a calibration over 40 vs 5 batches (separate processes, batches drawn lazily).

The last line is ``ratio=<SNN per step / ANN>`` of the main configuration: the Fashion-MNIST ViT at
the largest batch with counting on (the evaluation's setting). ``--breakdown`` profiles one run of
each and splits the time into dense products, the functions F and the rest (neurons, EC running
sums and differences, counting): the dense products and F alone are the floor of any exact dense
simulation.

    python benchmarks/ecmt_speed.py [--models fmnist,vit_small] [--batches 8,64] [--T 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from csdlab.convert.ecmt import ECMTConverter, SpikingViT
from csdlab.eval.counters import SimulationCounters

from _timing import LiveTensorPeak  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

log = logging.getLogger("ecmt_speed")

ROOT = Path(__file__).resolve().parents[1]
FMNIST_CKPT = ROOT / "assets" / "fmnist_vit_tiny.ckpt"


# -- measuring ------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.thread_time()
    fn()
    _sync(device)
    return time.perf_counter() - w0, time.thread_time() - c0


def live_peak_mib(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with LiveTensorPeak() as tracker:
        fn()
    return tracker.peak / 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak_mib(fn: Callable[[], Any]) -> tuple[float, float]:
    """(peak RSS during ``fn`` minus RSS before it, RSS before), MiB; RSS sampled every 2 ms."""
    before = peak = _rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak = max(peak, _rss_bytes())
    return (peak - before) / 2**20, before / 2**20


# -- the evaluation's counting ---------------------------------------------------------------------

@contextlib.contextmanager
def eval_counting(snn: SpikingViT) -> Iterator[None]:
    """The counters ``csdlab.eval`` wraps every simulation in (``ConversionMetrics``), unchanged:
    firing per MT site and MACs / ACs per step of every layer."""
    with SimulationCounters(snn):
        yield


# -- where the time goes -------------------------------------------------------------------------

_DENSE = ("aten::addmm", "aten::mm", "aten::bmm", "aten::mkldnn_convolution", "aten::convolution",
          "aten::_scaled_dot_product_flash_attention_for_cpu")
_FUNCTIONS = ("aten::native_layer_norm", "aten::gelu", "aten::_softmax")


def breakdown(fn: Callable[[], Any]) -> dict[str, float]:
    """Self CPU seconds of one call of ``fn`` split into the dense products (Linear, conv, matrix
    products, fused attention), the non-linear functions F (LayerNorm, GELU, softmax) and all the
    rest (neurons, EC sums and differences, counting, dispatch overhead)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    split = {"dense": 0.0, "F": 0.0, "rest": 0.0}
    for e in prof.key_averages():
        key = "dense" if e.key in _DENSE else "F" if e.key in _FUNCTIONS else "rest"
        split[key] += e.self_cpu_time_total / 1e6
    return split


# -- models ---------------------------------------------------------------------------------------

def fmnist_batches(data_dir: str, batch: int, split: str) -> Iterator[Tensor]:
    """Fashion-MNIST images: shuffled training images (calibration) or test images, lazily."""
    from csdlab.lit.data import ImageDataModule

    dm = ImageDataModule(dataset="fashion_mnist", data_dir=data_dir, batch_size=batch, num_workers=0)
    dm.prepare_data()
    dm.setup()
    loader = dm.calibration_dataloader() if split == "calib" else dm._loader(dm.test_set, shuffle=False)
    for x, _ in loader:
        yield x


def build(model: str, data_dir: str, calib_batches: int, calib_batch: int) -> tuple[nn.Module, list[Tensor] | None]:
    """The ANN and its calibration batches (Fashion-MNIST training images / random images)."""
    if model == "fmnist":
        from csdlab.lit.module import load_classifier

        ann, _ = load_classifier(FMNIST_CKPT)
        batches = fmnist_batches(data_dir, calib_batch, "calib")
        return ann.eval(), [next(batches) for _ in range(calib_batches)]
    ann = timm.create_model(model, pretrained=False).eval()
    g = torch.Generator().manual_seed(1)
    size = ann.patch_embed.img_size
    return ann, [torch.randn(calib_batch, 3, *size, generator=g) for _ in range(calib_batches)]


def inputs(model: str, ann: nn.Module, data_dir: str, batch: int) -> Tensor:
    if model == "fmnist":
        return next(fmnist_batches(data_dir, batch, "test"))
    return torch.randn(batch, 3, *ann.patch_embed.img_size, generator=torch.Generator().manual_seed(2))


def calib_batch(args: argparse.Namespace, model: str) -> int:
    """Images per calibration batch: ``--calib-batch`` for Fashion-MNIST, at most 8 at 224 px."""
    return args.calib_batch if model == "fmnist" else min(args.calib_batch, 8)


def converter(args: argparse.Namespace, T: int) -> ECMTConverter:
    return ECMTConverter(T=T, levels=args.levels, images_per_pass=args.images_per_pass)


# -- sections -------------------------------------------------------------------------------------

def speed(args: argparse.Namespace, model: str, device: torch.device) -> dict[int, dict[str, float]]:
    ann, calib = build(model, args.data_dir, args.calib_batches, calib_batch(args, model))
    conv = converter(args, args.T)
    conv.calibrate(ann, calib, lambda t: t)
    ann = ann.to(device)
    snn = conv.convert(ann)[f"T{args.T}"].to(device)
    results = {}
    for batch in args.batches:
        x = inputs(model, ann, args.data_dir, batch).to(device)
        modes = ["off", "on"] + (["on+levels"] if args.count_levels else [])

        def run_snn(mode: str) -> None:
            for m in snn.sites().values():
                m.count_levels = mode == "on+levels"
            if mode == "off":
                snn(x)
            else:
                with eval_counting(snn):
                    snn(x)

        variants: dict[str, Callable[[], Any]] = {"ann": lambda: ann(x)}
        variants.update({f"snn {mode}": (lambda mode=mode: run_snn(mode)) for mode in modes})
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        with torch.no_grad():
            for fn in variants.values():
                fn()  # warm-up
            for _ in range(args.repeats):
                for k, fn in variants.items():
                    times[k].append(timed(fn, device))
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
        ann_w, ann_c = med["ann"]
        log.info("%s, batch %d, T=%d, n=%d, %s, %d repeats (medians):", model, batch, args.T, args.levels,
                 device, args.repeats)
        log.info("  %-16s %10s %10s %12s %11s", "", "wall ms", "cpu ms", "ratio(wall)", "ratio(cpu)")
        log.info("  %-16s %10.2f %10.2f %12.2f %11.2f", "ANN forward", 1e3 * ann_w, 1e3 * ann_c, 1.0, 1.0)
        res = {}
        for mode in modes:
            w, c = (v / args.T for v in med[f"snn {mode}"])
            res[mode] = w / ann_w
            log.info("  %-16s %10.2f %10.2f %12.3f %11.3f", f"SNN/step {mode}", 1e3 * w, 1e3 * c, w / ann_w, c / ann_c)
        if args.breakdown:
            with torch.no_grad():
                parts = {"ANN forward": breakdown(variants["ann"]),
                         "SNN/step on": {k: v / args.T for k, v in breakdown(variants["snn on"]).items()}}
            total = sum(parts["ANN forward"].values())
            log.info("  where the time goes (profiled self CPU time, ms; in units of the ANN forward):")
            for name, split in parts.items():
                log.info("  %-16s %s", name, "   ".join(f"{k} {1e3 * v:8.2f} ({v / total:.2f})" for k, v in split.items()))
        results[batch] = res
    return results


def memory(args: argparse.Namespace, model: str, device: torch.device) -> None:
    batch = max(args.batches)
    ann, calib = build(model, args.data_dir, 1, min(args.calib_batch, 16))
    conv = converter(args, args.memory_T)
    conv.calibrate(ann, calib, lambda t: t)
    ann = ann.to(device)
    snn = conv.convert(ann)[f"T{args.memory_T}"].to(device)
    x = inputs(model, ann, args.data_dir, batch).to(device)
    with torch.no_grad():
        ann(x)
        mem_ann = live_peak_mib(lambda: ann(x), device)
        mem_snn = live_peak_mib(lambda: snn(x), device)
    log.info("%s, batch %d: peak live tensors  ANN forward %8.1f MiB   SNN T=%d %8.1f MiB  (%.2fx)", model, batch,
             mem_ann, args.memory_T, mem_snn, mem_snn / mem_ann)
    if device.type == "cpu":
        rss = {what: _child(args, model, what, batch) for what in ("ann", "snn")}
        log.info("%s, batch %d: peak process RSS over the run (separate processes)  ANN %8.1f MiB   SNN T=%d "
                 "%8.1f MiB  (%.2fx; RSS before: %.0f / %.0f MiB)", model, batch, rss["ann"]["peak"],
                 args.memory_T, rss["snn"]["peak"], rss["snn"]["peak"] / max(rss["ann"]["peak"], 1e-9),
                 rss["ann"]["before"], rss["snn"]["before"])


def calibration(args: argparse.Namespace, model: str, device: torch.device) -> None:
    ann, calib = build(model, args.data_dir, args.calib_batches, calib_batch(args, model))
    ann = ann.to(device)
    calib = [x.to(device) for x in calib]
    conv = converter(args, args.T)

    def one_ann_pass() -> None:
        for x in calib:
            ann(x)

    t_cal, t_ann = [], []
    with torch.no_grad():
        one_ann_pass()
        for _ in range(args.repeats):
            t_ann.append(timed(one_ann_pass, device)[0])
            t_cal.append(timed(lambda: conv.calibrate(ann, calib, lambda t: t), device)[0])
    cal, ann_s = statistics.median(t_cal), statistics.median(t_ann)
    log.info("%s: calibration on %d batches of %d: %.3f s, one ANN pass over them %.3f s: %.2fx", model,
             len(calib), calib[0].shape[0], cal, ann_s, cal / ann_s)
    if device.type == "cpu":
        few, many = (_child(args, model, f"calib{n}", calib_batch(args, model)) for n in (5, 40))
        log.info("%s: peak process RSS of a calibration (separate processes, lazy batches): 5 batches %.0f MiB, "
                 "40 batches %.0f MiB (%+.1f %%)", model, few["total"], many["total"],
                 100 * (many["total"] / few["total"] - 1))


def _child(args: argparse.Namespace, model: str, what: str, batch: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", what, "--models", model, "--batches", str(batch),
           "--memory-T", str(args.memory_T), "--levels", str(args.levels), "--data-dir", args.data_dir,
           "--calib-batch", str(calib_batch(args, model)), "--threads", str(args.threads)]
    if args.images_per_pass:
        cmd += ["--images-per-pass", str(args.images_per_pass)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(args: argparse.Namespace) -> None:
    """One measured run in a fresh process; prints JSON {peak, before, total} in MiB."""
    model, batch, what = args.models[0], args.batches[0], args.child
    if what.startswith("calib"):
        n = int(what[len("calib"):])
        ann, _ = build(model, args.data_dir, 0, args.calib_batch)
        if model == "fmnist":
            batches: Any = (x for _, x in zip(range(n), fmnist_batches(args.data_dir, args.calib_batch, "calib")))
        else:
            g = torch.Generator().manual_seed(1)
            batches = (torch.randn(args.calib_batch, 3, *ann.patch_embed.img_size, generator=g) for _ in range(n))
        conv = converter(args, args.memory_T)
        peak, before = rss_peak_mib(lambda: conv.calibrate(ann, batches, lambda t: t))
    else:
        ann, calib = build(model, args.data_dir, 1, min(args.calib_batch, 16))
        conv = converter(args, args.memory_T)
        conv.calibrate(ann, calib, lambda t: t)
        snn = conv.convert(ann)[f"T{args.memory_T}"]
        x = inputs(model, ann, args.data_dir, batch)
        fn = (lambda: ann(x)) if what == "ann" else (lambda: snn(x))
        with torch.no_grad():
            peak, before = rss_peak_mib(fn)
    total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "before": before, "total": total}))


def build_parser() -> argparse.ArgumentParser:
    """The command line (``benchmarks/gpu_check.py`` parses its own settings with it and calls
    :func:`speed`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=["fmnist", "vit_small_patch16_224"],
                        help="comma-separated: fmnist (the trained asset) and/or timm ViT names")
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[8, 64])
    parser.add_argument("--T", type=int, default=10, help="time steps of the speed runs")
    parser.add_argument("--memory-T", type=int, default=10, help="time steps of the memory runs")
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--calib-batch", type=int, default=128, help="images per calibration batch (fmnist)")
    parser.add_argument("--images-per-pass", type=int, default=None,
                        help="images simulated together (default: the converter's ceil(160 / T))")
    parser.add_argument("--count-levels", action="store_true", help="also time per-level spike histograms")
    parser.add_argument("--breakdown", action="store_true",
                        help="profile one ANN forward and one SNN run: dense products / F / rest")
    parser.add_argument("--sections", type=lambda s: s.split(","), default=["speed", "memory", "calibration"])
    parser.add_argument("--data-dir", default="/tmp/csdlab_data")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared machine, 2 threads wait on each other)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("csdlab").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.child:
        child(args)
        return
    device = torch.device(args.device)
    log.info("torch %s, %d threads, %s; load average %s", torch.__version__, torch.get_num_threads(), device,
             " ".join(f"{v:.1f}" for v in os.getloadavg()))
    main_ratio = float("nan")
    for model in args.models:
        if "speed" in args.sections:
            res = speed(args, model, device)
            if model == args.models[0]:
                main_ratio = res[max(args.batches)]["on"]
        if "memory" in args.sections:
            memory(args, model, device)
        if "calibration" in args.sections:
            calibration(args, model, device)
    log.info("load average at the end %s", " ".join(f"{v:.1f}" for v in os.getloadavg()))
    print(f"ratio={main_ratio:.3f}")


if __name__ == "__main__":
    main()
