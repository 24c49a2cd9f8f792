"""Fashion-MNIST top-1 of the MBE SNN of ``assets/fmnist_vit_tiny.ckpt`` (docs/mbe.md figures).

    python benchmarks/mbe_accuracy.py [--Ts 8 10 12 16] [--limit 10000] [--ablation]
    python benchmarks/mbe_accuracy.py --primitive-errors [--Ts 16] [--checkpoint assets/fmnist_vit_deep.ckpt]
    python benchmarks/mbe_accuracy.py --departures --Ts 4 8 --limit 2000

Accuracy runs are ``convert.py test --config configs/convert/fmnist_vit_mbe.yaml`` (the one
evaluation path: identity ranges calibrated on training images, never the test set) on the first
``--limit`` test images. ``--ablation`` adds, at the largest T, one operation group spiking at a
time. ``--primitive-errors`` measures each fitted primitive on the inputs the ViT feeds it.
``--departures`` takes back one of csdlab's departures from the paper's neuron at a time (converter
options ``codes`` = ``truncating`` / ``unsigned`` / ``no_offsets``, ``global_range``; docs/mbe.md).
"""


from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from csdlab.convert.mbe import GROUPS
from csdlab.lit.data import ImageDataModule
from csdlab.lit.module import load_classifier

log = logging.getLogger("mbe_accuracy")
ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "fmnist_vit_tiny.ckpt"

# the rows of the departures table: converter options on top of the shipped configuration
DEPARTURES = {
    "csdlab": ("csdlab (fitted, signed, offsets, per-site ranges)", {}),
    "truncating": ("plain truncating identity code (the paper's)", {"codes": "truncating"}),
    "global_range": ("one global range", {"global_range": "true"}),
    "unsigned": ("unsigned bases (identity, GELU)", {"codes": "unsigned"}),
    "no_offsets": ("no offsets (refitted with delta = 0)", {"codes": "no_offsets"}),
}


def mbe_accuracies(Ts: list[int], limit: int = 10_000, data_dir: str | None = None,
                   switches: dict[str, bool] | None = None, options: dict[str, str] | None = None,
                   figures: dict[str, float] | None = None) -> dict[str, float]:
    """``{"ann": top1, "T8": top1, ...}`` (fractions) on the first ``limit`` test images, through
    ``convert.py``'s MBE config (``options``: more ``--model.converter.<key>`` values; ``figures``:
    filled with the run's whole figure dictionary)."""
    from csdlab.cli import make_convert_cli

    out = tempfile.mkdtemp(prefix="mbe_accuracy_")
    args = ["test", "--config", str(ROOT / "configs" / "convert" / "fmnist_vit_mbe.yaml"),
            "--model.checkpoint", str(ASSET), "--model.converter.Ts", str(list(Ts)),
            "--data.limit", str(limit), "--data.data_dir", data_dir or f"{out}/data",
            "--report.out_dir", out, "--trainer.default_root_dir", out, "--progress_bar.refresh_rate", "0"]
    args += [f"--model.converter.{g}={str(on).lower()}" for g, on in (switches or {}).items()]
    args += [f"--model.converter.{k}={v}" for k, v in (options or {}).items()]
    f = make_convert_cli(args).model.results["figures"]
    if figures is not None:
        figures.update(f)
    return {"ann": f["ref/top1"], **{f"T{T}": f[f"snn/T{T}/top1"] for T in Ts}}


@torch.no_grad()
def primitive_errors(T: int, bases: int = 8, gelu_bases: int = 4, images: int = 256,
                     data_dir: str | None = None, checkpoint: Path | str = ASSET,
                     codes: str = "fitted") -> dict[str, dict[str, float]]:
    """MSE of each fitted primitive on the inputs the ViT actually feeds it (training images).

    The network runs with exact neurons (it is the ANN); every neuron's input is captured and its
    fitted version compared with the exact function there. Identity sites: MSE divided by the
    site's range squared (the unit range the code is fitted on), averaged over sites. Also the
    range of the inputs each primitive saw (``lo``, ``hi``, over its sites).
    """
    from csdlab.convert.mbe import calibrate_ranges, convert_vit_mbe
    from csdlab.convert.mbe_vit import mbe_sites
    from csdlab.snn.mbe import PRIMITIVES, MBENeuron

    model, _ = load_classifier(checkpoint)
    model.eval()
    dm = ImageDataModule("fashion_mnist", data_dir or tempfile.mkdtemp(prefix="fmnist_"), batch_size=images,
                         augment=False)
    x, _ = next(iter(dm.calibration_dataloader()))
    ranges = calibrate_ranges(model, [x], lambda t: t, T=T, N=bases, gelu_bases=gelu_bases)
    snn = convert_vit_mbe(model, T, bases, gelu_bases, ranges, exact=True, codes=codes)
    seen: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0]))
             for n, m in mbe_sites(snn).items()]
    snn(x)
    for h in hooks:
        h.remove()
    errs: dict[str, list[float]] = {}
    span: dict[str, list[float]] = {}
    for name, m in mbe_sites(snn).items():
        inp = torch.cat([t.flatten() for t in seen[name]]).double()
        fitted = MBENeuron(m.code, float(m.in_scale), float(m.out_scale))
        exact = PRIMITIVES[m.code.primitive].fn(inp / float(m.in_scale)) * float(m.out_scale)
        mse = float(((fitted(inp) - exact) ** 2).mean())
        if m.code.primitive == "identity":
            mse /= float(m.in_scale) ** 2
        errs.setdefault(m.code.primitive, []).append(mse)
        lo, hi = span.setdefault(m.code.primitive, [math.inf, -math.inf])
        span[m.code.primitive] = [min(lo, float(inp.min())), max(hi, float(inp.max()))]
    return {k: {"mean_mse": sum(v) / len(v), "max_mse": max(v), "sites": len(v), "lo": span[k][0], "hi": span[k][1]}
            for k, v in errs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--Ts", type=int, nargs="+", default=[8, 10, 12, 16])
    p.add_argument("--limit", type=int, default=10_000)
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--primitive-errors", action="store_true", help="only the per-primitive errors on real inputs")
    p.add_argument("--departures", nargs="*", choices=list(DEPARTURES), default=None,
                   help="only the beyond-the-paper table (rows of DEPARTURES; none named: all)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--checkpoint", default=str(ASSET), help="for --primitive-errors")
    p.add_argument("--codes", default="fitted", help="code variant for --primitive-errors (CODE_VARIANTS)")
    p.add_argument("--gelu-bases", type=int, default=4, help="GELU bases for --primitive-errors")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    if a.primitive_errors:
        for T in a.Ts:
            errs = primitive_errors(T, gelu_bases=a.gelu_bases, data_dir=a.data_dir, checkpoint=a.checkpoint,
                                    codes=a.codes)
            for k, v in errs.items():
                log.info("T=%d %-8s mean MSE %.3g  max %.3g  (%d sites, inputs %.3g .. %.3g)", T, k, v["mean_mse"],
                         v["max_mse"], v["sites"], v["lo"], v["hi"])
        return
    if a.departures is not None:
        rows = []
        for label, opts in (DEPARTURES[k] for k in (a.departures or DEPARTURES)):
            t0, f = time.perf_counter(), {}
            mbe_accuracies(a.Ts, a.limit, a.data_dir, options=opts, figures=f)
            cells = [f"{100 * f[f'snn/T{T}/top1']:.2f} / {100 * f[f'snn/T{T}/agreement']:.2f} / "
                     f"{f[f'snn/T{T}/logit_error']:.3g}" for T in a.Ts]
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
            log.info("%s: %s (ANN %.2f %%, %.0f s)", label, cells, 100 * f["ref/top1"], time.perf_counter() - t0)
        log.info("| variant | " + " | ".join(f"T = {T}: top-1 / agreement (%) / logit error" for T in a.Ts) + " |")
        log.info("|---|" + "---|" * len(a.Ts))
        for r in rows:
            log.info(r)
        return
    t0 = time.perf_counter()
    acc = mbe_accuracies(a.Ts, a.limit, a.data_dir)
    log.info("all groups: %s  (%.0f s)", {k: round(100 * v, 2) for k, v in acc.items()}, time.perf_counter() - t0)
    if a.ablation:
        T = max(a.Ts)
        for group in GROUPS:
            t0 = time.perf_counter()
            alone = mbe_accuracies([T], a.limit, a.data_dir, {g: g == group for g in GROUPS})
            log.info("T=%d %s alone: %.2f %%  (%.0f s)", T, group, 100 * alone[f"T{T}"], time.perf_counter() - t0)


if __name__ == "__main__":
    main()
