"""The cost of accuracy: for each method and ViT checkpoint, the fewest steps per image at which the
SNN is within ``--within`` (0.5 points) of its ANN, the energy there, and the simulation time in ANN
forwards, measured side by side in this run.

    python benchmarks/cost_of_accuracy.py [--limit 2000] [--checkpoints tiny deep] [--methods ecmt mbe csdformer]
        [--deep-checkpoint PATH] [--json logs/benchmarks/cost_of_accuracy.json]

Accuracy and energy come from ``convert.py test`` (the one evaluation path, each method's config
of ``configs/convert/``) on the first ``--limit`` test images:

* **fixed T**: ECMT and CSDformer read out after every step t of one run (the smallest t within the
  target); MBE runs one variant per T of ``--mbe-Ts`` (the smallest such T).
* **early exit** (ECMT, CSDformer: a readout after every step): ``--model.early_exit auto``, its
  setting calibrated on ``--exit-images`` held-out training images (docs/early_exit.md); the row
  gives its mean steps per image and whether the test images land within the target.

Simulation time: the ANN forward and the SNN at the row's T run interleaved on one batch of
``--batch`` test images (``_timing.interleaved``, median of ``--repeats``). An early-exit row's
time is interpolated linearly between the measured simulations of the two whole step counts
around its mean steps: the simulators run a batch for all its steps, so this is the time a
simulator that stops each image at its exit step would take (said in the table's note).
CSDformer's steps are its latency t + D (the D delay steps are simulated too).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from _timing import add_common_args, interleaved, medians, print_ratio, setup

log = logging.getLogger("cost_of_accuracy")
ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = {"tiny": ROOT / "assets" / "fmnist_vit_tiny.ckpt", "deep": ROOT / "assets" / "fmnist_vit_deep.ckpt"}
CONFIGS = {("ecmt", "tiny"): "fmnist_vit_ecmt.yaml", ("ecmt", "deep"): "fmnist_vit_deep_ecmt.yaml",
           ("mbe", "tiny"): "fmnist_vit_mbe.yaml", ("mbe", "deep"): "fmnist_vit_deep_mbe.yaml",
           ("csdformer", "csdformer"): "fmnist_csdformer_tiny.yaml"}


def _convert(config: str, args: argparse.Namespace, *extra: str) -> Any:
    from csdlab.cli import make_convert_cli

    out = tempfile.mkdtemp(prefix="cost_of_accuracy_", dir=args.out_root)
    argv = ["test", "--config", str(ROOT / "configs" / "convert" / config), "--data.limit", str(args.limit),
            "--data.data_dir", args.data_dir, "--report.out_dir", out, "--trainer.default_root_dir", out,
            "--trainer.logger", "false", "--progress_bar.refresh_rate", "0", "--trainer.accelerator",
            args.device, *extra]
    return make_convert_cli(argv)


def _first_within(points: list[tuple[float, float, float]], target: float) -> tuple[float, float, float] | None:
    """The first ``(steps, top1, energy)`` (ascending steps) with ``top1 >= target``."""
    return next((p for p in sorted(points) if p[1] >= target - 1e-12), None)


def _time_ratios(ann: torch.nn.Module, snns: dict[Any, torch.nn.Module], x: torch.Tensor,
                 args: argparse.Namespace) -> dict[Any, float]:
    """Seconds of each SNN's simulation of ``x`` over one ANN forward of ``x``, interleaved."""
    fns = {"ANN": lambda: ann(x), **{str(k): (lambda s=s: s(x)) for k, s in snns.items()}}
    with torch.no_grad():
        t = medians(interleaved(fns, args.repeats, torch.device(args.device), args.warmup))
    return {k: t[str(k)] / t["ANN"] for k in snns}


def _batch(cli: Any, args: argparse.Namespace) -> torch.Tensor:
    x, _ = next(iter(cli.datamodule.test_dataloader()))
    return x[: args.batch].to(args.device, next(cli.model.reference.parameters()).dtype)


def per_step_method(method: str, ckpt_name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """ECMT (one run to ``--ecmt-T``) or CSDformer (its delays): fixed-T and early-exit rows."""
    config = CONFIGS[(method, ckpt_name)]
    extra = ["--model.early_exit", "auto", "--model.exit_tolerance", str(args.exit_tolerance),
             "--data.exit_images", str(args.exit_images)]
    if method == "ecmt":
        extra += ["--model.checkpoint", str(args.ckpt[ckpt_name]), "--model.converter.T", str(args.ecmt_T)]
    else:  # the config's paths are relative to the repository
        extra += ["--model.checkpoint", str(ROOT / "assets" / "fmnist_csdformer_tiny_qat.ckpt"),
                  "--model.ann_checkpoint", str(ROOT / "assets" / "fmnist_csdformer_tiny_float.ckpt")]
    cli = _convert(config, args, *extra)
    res, model = cli.model.results, cli.model
    f = res["figures"]
    ann = f["ref/top1"]  # what the SNN converts: the ANN (ECMT), the QANN (CSDformer)
    target = ann - args.within
    rows: list[dict[str, Any]] = []
    x = _batch(cli, args)
    for v, meta in res["variants"].items():
        delay = meta["latency"] - meta["time_steps"]  # CSDformer's D; 0 for ECMT
        points = [(t + delay, f[f"snn/{v}/top1_t{t}"], f[f"energy/{v}/ratio_t{t}"]) for t in meta["readout_steps"]]
        best = _first_within(points, target)
        row = {"method": method, "checkpoint": ckpt_name, "variant": v, "mode": "fixed T", "ann_top1": ann,
               "images": f["samples"]}
        if best is None:
            rows.append({**row, "steps": None, "top1": f[f"snn/{v}/top1"], "energy": f[f"energy/{v}/ratio"],
                         "ann_forwards": None, "within": False})
        else:
            rows.append({**row, "steps": best[0], "top1": best[1], "energy": best[2], "within": True})
        if v in res.get("early_exit", {}):
            rows.append({**row, "mode": f"early exit ({res['early_exit'][v]['chosen_rule']})",
                         "steps": f[f"exit/{v}/mean_steps"] + delay, "top1": f[f"exit/{v}/top1"],
                         "energy": f[f"exit/{v}/energy_ratio"], "within": f[f"exit/{v}/top1"] >= target - 1e-12,
                         "calibration": res["early_exit"][v]})
    # simulation time: the variant at T* and, for the early-exit row, at the two whole step counts
    # around its mean (rebuilt with the calibrated thresholds), side by side with the ANN
    if method == "ecmt":
        fixed = next(r for r in rows if r["mode"] == "fixed T")
        t_star = int(fixed["steps"] or args.ecmt_T)
        exit_steps = [r["steps"] for r in rows if r["mode"] != "fixed T"]
        Ts = sorted({t_star, *(n for e in exit_steps for n in (math.floor(e), math.ceil(e)))})

        def rebuilt(T: int) -> torch.nn.Module:
            conv = copy.copy(model.converter)
            conv.T = T
            return conv.convert(model.reference)[f"T{T}"]

        ratios = _time_ratios(model.reference, {T: rebuilt(T) for T in Ts}, x, args)
        for r in rows:
            if r["mode"] == "fixed T":
                r["ann_forwards"], r["time_measured"] = ratios[t_star], True
            else:  # between the measured simulations of floor(mean) and ceil(mean) steps
                lo, hi = math.floor(r["steps"]), math.ceil(r["steps"])
                r["ann_forwards"] = ratios[lo] + (ratios[hi] - ratios[lo]) * (r["steps"] - lo)
                r["time_measured"] = False
    else:  # CSDformer: each variant simulates all its T + D steps for any readout
        ratios = _time_ratios(model.reference, dict(model.variants()), x, args)
        for r in rows:
            steps_total = res["variants"][r["variant"]]["latency"]
            per_step = ratios[r["variant"]] / steps_total
            r["ann_forwards"] = per_step * r["steps"] if r["steps"] is not None else ratios[r["variant"]]
            r["time_measured"] = False
    return rows


def mbe_rows(ckpt_name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """MBE: one variant per T; the smallest T within the target, timed against the ANN."""
    cli = _convert(CONFIGS[("mbe", ckpt_name)], args, "--model.checkpoint", str(args.ckpt[ckpt_name]),
                   "--model.converter.Ts", str(args.mbe_Ts))
    f = cli.model.results["figures"]
    ann = f["ref/top1"]
    points = [(float(T), f[f"snn/T{T}/top1"], f[f"energy/T{T}/ratio"]) for T in args.mbe_Ts]
    best = _first_within(points, ann - args.within)
    T = int(best[0]) if best else max(args.mbe_Ts)
    ratio = _time_ratios(cli.model.reference, {"T": cli.model.variants()[f"T{T}"]}, _batch(cli, args), args)["T"]
    return [{"method": "mbe", "checkpoint": ckpt_name, "variant": f"T{T}", "mode": "fixed T", "ann_top1": ann,
             "images": f["samples"], "steps": best[0] if best else None, "top1": f[f"snn/T{T}/top1"],
             "energy": f[f"energy/T{T}/ratio"], "within": best is not None, "ann_forwards": ratio,
             "time_measured": True, "all_T": {f"T{int(p[0])}": p[1] for p in points}}]


def table(rows: list[dict[str, Any]], within: float) -> str:
    from csdlab.eval.plots import format_table

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    body = [[r["method"], r["checkpoint"], r["variant"], r["mode"], num(100 * r["ann_top1"], ".2f"),
             num(r["steps"], ".2f") + ("" if r["within"] else " (not reached)"), num(100 * r["top1"], ".2f"),
             num(100 * (r["top1"] - r["ann_top1"]), "+.2f"), num(r["energy"], ".3f"),
             num(r["ann_forwards"], ".1f") + ("" if r.get("time_measured") else "*")] for r in rows]
    return format_table(body, ["method", "checkpoint", "variant", "mode", "ANN (%)",
                               f"steps within {100 * within:.1f} pt", "top-1 (%)", "vs ANN (pt)", "energy vs ANN",
                               "sim. time (ANN forwards)"])


def main() -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=5)
    p.add_argument("--limit", type=int, default=2000, help="test images scored (10000: the whole test set)")
    p.add_argument("--checkpoints", nargs="+", default=["tiny", "deep"], choices=list(CHECKPOINTS))
    p.add_argument("--methods", nargs="+", default=["ecmt", "mbe", "csdformer"], choices=["ecmt", "mbe", "csdformer"])
    p.add_argument("--deep-checkpoint", default=None, help="the deep testbed (default assets/fmnist_vit_deep.ckpt)")
    p.add_argument("--within", type=float, default=0.005, help="target: accuracy loss vs the ANN (fraction)")
    p.add_argument("--ecmt-T", type=int, default=16, help="ECMT steps simulated (readout after each)")
    p.add_argument("--mbe-Ts", type=int, nargs="+", default=[2, 3, 4, 8, 16],
                   help="MBE variants (fitted tables are shipped for T = 2, 3, 4, 8, 10, 12, 16)")
    p.add_argument("--exit-tolerance", type=float, default=0.001, help="early exit: calibration target (fraction)")
    p.add_argument("--exit-images", type=int, default=2000, help="early exit: held-out training images")
    p.add_argument("--batch", type=int, default=64, help="images per timed simulation")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--json", default=str(ROOT / "logs" / "benchmarks" / "cost_of_accuracy.json"))
    args = p.parse_args()
    setup(args)
    if args.limit < 1 or args.batch < 1:
        raise ValueError(f"--limit and --batch must be >= 1, got {args.limit} and {args.batch}")
    args.ckpt = dict(CHECKPOINTS)
    if args.deep_checkpoint:
        args.ckpt["deep"] = Path(args.deep_checkpoint)
    args.out_root = str(ROOT / "logs" / "benchmarks")
    Path(args.out_root).mkdir(parents=True, exist_ok=True)
    args.device = str(args.device)
    rows: list[dict[str, Any]] = []
    for name in args.checkpoints:
        for method in args.methods:
            if method == "ecmt":
                rows += per_step_method("ecmt", name, args)
            elif method == "mbe":
                rows += mbe_rows(name, args)
    if "csdformer" in args.methods:  # on its own (quantized ReLU) checkpoint
        rows += per_step_method("csdformer", "csdformer", args)
    log.info("cost of accuracy (first %d test images; %s threads, %s):\n%s\n* interpolated from measured "
             "fixed-T simulations (a simulator that stops each image at its exit step)", args.limit,
             torch.get_num_threads(), args.device, table(rows, args.within))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                          indent=2, default=str) + "\n")
    log.info("wrote %s", args.json)
    ecmt = [r for r in rows if r["method"] == "ecmt" and r["steps"] is not None]
    fixed = [r for r in ecmt if r["mode"] == "fixed T"]
    exits = [r for r in ecmt if r["mode"] != "fixed T"]
    # the headline ratio: ECMT mean steps with early exit over fixed T, last checkpoint
    print_ratio(exits[-1]["steps"] / fixed[-1]["steps"] if exits and fixed else float("nan"))


if __name__ == "__main__":
    main()
