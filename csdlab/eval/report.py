"""Tables, JSON and plots of a conversion evaluation, from the figures of
:class:`csdlab.eval.metrics.ConversionMetrics` (fractions; percent only in the printed tables)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csdlab.report import format_table, plot_bars, plot_curves, write_json

__all__ = ["summary_table", "steps_table", "write_report", "plot_report"]


def _pct(x: float) -> float:
    return 100.0 * x


def summary_table(results: Mapping[str, Any], reference_name: str = "ANN") -> str:
    """One row per network: the ANN (when scored), the reference, every spiking variant."""
    f, variants = results["figures"], results["variants"]
    rows: list[list[Any]] = []
    if "ann/top1" in f:
        rows.append(["ANN (float)", "-", _pct(f["ann/top1"]), "-", "-", "-", "-", "1.000"])
    rows.append([reference_name, "-", _pct(f["ref/top1"]), "100.00", "0", "0", "-", "1.000"])
    for v, meta in variants.items():
        rows.append([f"SNN {v}", meta["latency"], _pct(f[f"snn/{v}/top1"]), _pct(f[f"snn/{v}/agreement"]),
                     f"{f[f'snn/{v}/logit_error']:.4f}", f"{f[f'snn/{v}/max_logit_diff']:.3g}",
                     f"{f[f'snn/{v}/firing_rate']:.3f}", f"{f[f'energy/{v}/ratio']:.3f}"])
    return format_table(rows, ["model", "steps", "top-1 (%)", f"agreement with {reference_name} (%)",
                               "mean abs logit error", "max abs logit diff", "firing rate", "energy vs ANN"])


def steps_table(results: Mapping[str, Any]) -> str | None:
    """Readout after every step t (variants with more than one readout); None if there are none."""
    f = results["figures"]
    multi = {v: m["readout_steps"] for v, m in results["variants"].items() if len(m["readout_steps"]) > 1}
    if not multi:
        return None
    ts = sorted({t for steps in multi.values() for t in steps})
    header, rows = ["t"], [[t] for t in ts]
    for v, steps in multi.items():
        cols = (["top-1 (%)", "logit error", "energy vs ANN"] if len(multi) == 1
                else [f"{v} top-1 (%)", f"{v} energy"])
        header += cols
        for row, t in zip(rows, ts):
            if t not in steps:
                row += ["-"] * len(cols)
                continue
            cells = [_pct(f[f"snn/{v}/top1_t{t}"])]
            if len(multi) == 1:
                cells.append(f"{f[f'snn/{v}/logit_error_t{t}']:.4f}")
            cells.append(f"{f[f'energy/{v}/ratio_t{t}']:.3f}")
            row += cells
    return format_table(rows, header)


def plot_report(results: Mapping[str, Any], out_dir: str | Path, reference_name: str = "ANN") -> list[Path]:
    """Accuracy and energy vs step t (one curve per variant), accuracy vs latency across variants,
    firing rate per site of the last variant. Returns the image paths."""
    out, f, variants = Path(out_dir), results["figures"], results["variants"]
    ref = {reference_name: _pct(f["ref/top1"])}
    acc = {v: (m["readout_steps"], [_pct(f[f"snn/{v}/top1_t{t}"]) for t in m["readout_steps"]])
           for v, m in variants.items()}
    energy = {v: (m["readout_steps"], [f[f"energy/{v}/ratio_t{t}"] for t in m["readout_steps"]])
              for v, m in variants.items()}
    method = results.get("method", "snn")
    paths = [plot_curves(acc, out / "accuracy_vs_t.png", xlabel="time step t", ylabel="top-1 (%)",
                         title=f"{method}: accuracy of the readout after t steps", hlines=ref),
             plot_curves(energy, out / "energy_vs_t.png", xlabel="time step t", ylabel="E_SNN / E_ANN",
                         title=f"{method}: energy of steps 1..t vs the ANN")]
    if len(variants) > 1:
        lat = [m["latency"] for m in variants.values()]
        paths.append(plot_curves({"SNN": (lat, [_pct(f[f"snn/{v}/top1"]) for v in variants])},
                                 out / "accuracy_vs_latency.png", xlabel="latency (steps)", ylabel="top-1 (%)",
                                 title=f"{method}: final accuracy per variant ({', '.join(variants)})", hlines=ref))
    last = list(variants)[-1]
    key = f"snn/{last}/firing_rate/"
    rates = {k.removeprefix(key): v for k, v in f.items() if k.startswith(key)}
    if rates:
        paths.append(plot_bars(rates, out / "firing_rate_per_site.png", ylabel="spikes / neuron / step",
                               title=f"{method} {last}: firing rate per site"))
    return paths


def write_report(results: Mapping[str, Any], out_dir: str | Path, reference_name: str = "ANN",
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``figures.json`` and the plots under ``out_dir``; return the tables and paths."""
    out = Path(out_dir)
    tables = {"summary": summary_table(results, reference_name)}
    per_t = steps_table(results)
    if per_t is not None:
        tables["per_step"] = per_t
    plots = plot_report(results, out, reference_name)
    json_path = write_json({**dict(extra or {}), **results, "tables": tables, "plots": plots}, out / "figures.json")
    return {"tables": tables, "plots": plots, "json": json_path}
