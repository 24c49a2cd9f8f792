"""Fashion-MNIST top-1 of the MBE SNN of ``assets/fmnist_vit_tiny.ckpt`` (docs/mbe.md figures).

    python benchmarks/mbe_accuracy.py [--Ts 8 10 12 16] [--limit 10000] [--ablation]

Identity ranges are calibrated on training images (``--calib-batches`` x 256, evaluation
transforms), never the test set; accuracy is on the first ``--limit`` test images. ``--ablation``
adds, at the largest T, one operation group spiking at a time, then all. Single process, CPU or GPU.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from pathlib import Path

import torch

from csdlab.convert.mbe import GROUPS, MBEConverter
from csdlab.lit.data import ImageDataModule
from csdlab.lit.module import load_classifier

log = logging.getLogger("mbe_accuracy")
ASSET = Path(__file__).resolve().parents[1] / "assets" / "fmnist_vit_tiny.ckpt"


@torch.no_grad()
def mbe_accuracies(Ts: list[int], limit: int = 10_000, calib_batches: int = 4, data_dir: str | None = None,
                   switches: dict[str, bool] | None = None, bases: int = 8, gelu_bases: int = 4,
                   device: str = "cpu") -> dict[str, float]:
    """``{"ann": top1, "T8": top1, ...}`` (fractions) on the first ``limit`` test images."""
    model, _ = load_classifier(ASSET)
    model = model.eval().to(device)
    dm = ImageDataModule("fashion_mnist", data_dir or tempfile.mkdtemp(prefix="fmnist_"), batch_size=256,
                         augment=False)
    conv = MBEConverter(Ts=Ts, bases=bases, gelu_bases=gelu_bases, **(switches or {}))
    conv.check(model)
    calib = (x.to(device) for x, _ in itertools.islice(dm.calibration_dataloader(), calib_batches))
    conv.calibrate(model, calib, lambda t: t)
    variants = conv.convert(model)
    correct = dict.fromkeys(["ann", *variants], 0)
    seen = 0
    for x, y in dm.test_dataloader():
        x, y = x[: limit - seen].to(device), y[: limit - seen].to(device)
        correct["ann"] += int((model(x).argmax(-1) == y).sum())
        for label, sm in variants.items():
            correct[label] += int((sm(x)[-1].argmax(-1) == y).sum())
        seen += len(y)
        if seen >= limit:
            break
    return {k: v / seen for k, v in correct.items()}


@torch.no_grad()
def primitive_errors(T: int, bases: int = 8, gelu_bases: int = 4, images: int = 256,
                     data_dir: str | None = None) -> dict[str, dict[str, float]]:
    """MSE of each fitted primitive on the inputs the ViT actually feeds it (training images).

    The network runs with exact neurons (it is the ANN); every neuron's input is captured and its
    fitted version compared with the exact function there. Identity sites: MSE divided by the
    site's range squared (the unit range the code is fitted on), averaged over sites.
    """
    from csdlab.convert.mbe import calibrate_ranges, convert_vit_mbe, mbe_sites
    from csdlab.snn.mbe import PRIMITIVES, MBENeuron

    model, _ = load_classifier(ASSET)
    model.eval()
    dm = ImageDataModule("fashion_mnist", data_dir or tempfile.mkdtemp(prefix="fmnist_"), batch_size=images,
                         augment=False)
    x, _ = next(iter(dm.calibration_dataloader()))
    ranges = calibrate_ranges(model, [x], lambda t: t, T=T, N=bases, gelu_bases=gelu_bases)
    snn = convert_vit_mbe(model, T, bases, gelu_bases, ranges, exact=True)
    seen: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0]))
             for n, m in mbe_sites(snn).items()]
    snn(x)
    for h in hooks:
        h.remove()
    errs: dict[str, list[float]] = {}
    for name, m in mbe_sites(snn).items():
        inp = torch.cat([t.flatten() for t in seen[name]]).double()
        fitted = MBENeuron(m.code, float(m.in_scale), float(m.out_scale))
        exact = PRIMITIVES[m.code.primitive].fn(inp / float(m.in_scale)) * float(m.out_scale)
        mse = float(((fitted(inp) - exact) ** 2).mean())
        if m.code.primitive == "identity":
            mse /= float(m.in_scale) ** 2
        errs.setdefault(m.code.primitive, []).append(mse)
    return {k: {"mean_mse": sum(v) / len(v), "max_mse": max(v), "sites": len(v)} for k, v in errs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--Ts", type=int, nargs="+", default=[8, 10, 12, 16])
    p.add_argument("--limit", type=int, default=10_000)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--primitive-errors", action="store_true", help="only the per-primitive errors on real inputs")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    if a.primitive_errors:
        for T in a.Ts:
            for k, v in primitive_errors(T, data_dir=a.data_dir).items():
                log.info("T=%d %-8s mean MSE %.3g  max %.3g  (%d sites)", T, k, v["mean_mse"], v["max_mse"], v["sites"])
        return
    t0 = time.perf_counter()
    acc = mbe_accuracies(a.Ts, a.limit, a.calib_batches, a.data_dir, device=a.device)
    log.info("all groups: %s  (%.0f s)", {k: round(100 * v, 2) for k, v in acc.items()}, time.perf_counter() - t0)
    if a.ablation:
        T = max(a.Ts)
        for group in GROUPS:
            t0 = time.perf_counter()
            alone = mbe_accuracies([T], a.limit, a.calib_batches, a.data_dir, {g: g == group for g in GROUPS},
                                   device=a.device)
            log.info("T=%d %s alone: %.2f %%  (%.0f s)", T, group, 100 * alone[f"T{T}"], time.perf_counter() - t0)


if __name__ == "__main__":
    main()
