"""Speed of one whole MBE SNN evaluation (all T steps of every neuron) vs one ANN forward, same batch.

    python benchmarks/mbe_speed.py [--T 16] [--bases 8] [--batch 256] [--device cuda] [--no-counters]

The SNN is timed as the evaluation runs it: :class:`~csdlab.convert.mbe.MBESpikingModel` inside
the evaluation's own counters (:class:`~csdlab.eval.counters.SimulationCounters`, as
:class:`~csdlab.eval.metrics.ConversionMetrics` enters them); ``--no-counters`` times the bare
forward. Prints both timings (medians of interleaved repeats, after warm-up) side by side; the last line is ``ratio=<SNN time / ANN time>`` (issue 17's target: <= 4 at
T = 16, N = 8, counters on). Uses the Fashion-MNIST ViT in ``assets/`` and random normalised
images; identity ranges are calibrated on the same batch.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

from csdlab.convert.mbe import MBESpikingModel, calibrate_ranges, convert_vit_mbe
from csdlab.eval.counters import SimulationCounters
from csdlab.lit.module import load_classifier

log = logging.getLogger("mbe_speed")
ASSET = Path(__file__).resolve().parents[1] / "assets" / "fmnist_vit_tiny.ckpt"


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_pair(ann, snn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Medians of interleaved repeats (load from other processes hits both alike), after warm-up."""
    for fn in (ann, snn, ann, snn):  # warm-up; the first SNN call builds the neurons' tables
        fn()
    t_ann, t_snn = [], []
    for _ in range(repeats):
        t_ann.append(_seconds(ann, device))
        t_snn.append(_seconds(snn, device))
    return statistics.median(t_ann), statistics.median(t_snn)


def counted(model: MBESpikingModel, x: torch.Tensor) -> torch.Tensor:
    """One evaluation step as :class:`~csdlab.eval.metrics.ConversionMetrics` runs it, inside the
    evaluation's counters (:class:`~csdlab.eval.counters.SimulationCounters`: their cost is part of
    an evaluation)."""
    with SimulationCounters(model, device=x.device):
        return model(x)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=16)
    p.add_argument("--bases", type=int, default=8)
    p.add_argument("--gelu-bases", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the shared CI machine: 1)")
    p.add_argument("--no-counters", action="store_true", help="time the SNN without the evaluation's counters")
    return p


def measure(a: argparse.Namespace) -> dict[str, float]:
    """ANN and whole-SNN medians (``benchmarks/gpu_check.py`` calls this); ``ratio``: SNN / ANN."""
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    model, _ = load_classifier(ASSET)
    model = model.eval().to(device)
    x = torch.randn(a.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)
    ranges = calibrate_ranges(model, [x], lambda t: t, T=a.T, N=a.bases, gelu_bases=a.gelu_bases)
    snn = MBESpikingModel(convert_vit_mbe(model, a.T, a.bases, a.gelu_bases, ranges).to(device), a.T)
    run_snn = (lambda: snn(x)) if getattr(a, "no_counters", False) else (lambda: counted(snn, x))
    with torch.no_grad():
        t_ann, t_snn = _time_pair(lambda: model(x), run_snn, device, a.repeats)
    return {"ann_s": t_ann, "snn_s": t_snn, "ratio": t_snn / t_ann}


def main() -> None:
    a = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = measure(a)
    log.info("device=%s batch=%d T=%d N=%d (GELU %d) counters=%s", a.device, a.batch, a.T, a.bases, a.gelu_bases,
             "off" if getattr(a, "no_counters", False) else "on")
    log.info("ANN forward        %8.2f ms", 1e3 * res["ann_s"])
    log.info("MBE SNN (all T)    %8.2f ms", 1e3 * res["snn_s"])
    print(f"ratio={res['ratio']:.3f}")  # noqa: T201  the one machine-read line


if __name__ == "__main__":
    main()
