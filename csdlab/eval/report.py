"""The written output of a conversion evaluation: tables, JSON and plots from the figures of
:class:`csdlab.eval.metrics.ConversionMetrics` (fractions; percent only in the printed tables), and
:class:`ConversionReport`, the Lightning callback of ``convert.py`` that writes them (rank 0)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from csdlab.eval.plots import format_table, plot_bars, plot_curves, write_json
from csdlab.eval.checks import spike_driven_check
from csdlab.eval.exit import EXIT_RULES

__all__ = ["summary_table", "payload_cell", "steps_table", "exit_table", "exit_curve_table", "plot_exit",
           "write_report", "plot_report", "log_images", "run_folder", "ConversionReport"]

log = logging.getLogger(__name__)


def _pct(x: float) -> float:
    return 100.0 * x


def summary_table(results: Mapping[str, Any], reference_name: str = "ANN") -> str:
    """One row per network: the ANN (when scored), the reference, every spiking variant."""
    f, variants = results["figures"], results["variants"]
    rows: list[list[Any]] = []
    if "ann/top1" in f:
        rows.append(["ANN (float)", "-", _pct(f["ann/top1"]), "-", "-", "-", "-", "-", "1.000", "1.000"])
    rows.append([reference_name, "-", _pct(f["ref/top1"]), "100.00", "0", "0", "-", "-", "1.000", "1.000"])
    for v, meta in variants.items():
        rows.append([f"SNN {v}", meta["latency"], _pct(f[f"snn/{v}/top1"]), _pct(f[f"snn/{v}/agreement"]),
                     f"{f[f'snn/{v}/logit_error']:.4f}", f"{f[f'snn/{v}/max_logit_diff']:.3g}",
                     f"{f[f'snn/{v}/firing_rate']:.3f}", payload_cell(f, v),
                     f"{f[f'energy/{v}/ratio']:.3f}", f"{f[f'energy/{v}/ratio_spike']:.3f}"])
    return format_table(rows, ["model", "steps", "top-1 (%)", f"agreement with {reference_name} (%)",
                               "mean abs logit error", "max abs logit diff", "firing rate",
                               "payload: bits (largest value, spikes / event)",
                               "energy vs ANN, per event", "energy vs ANN, per unit spike"])


def payload_cell(f: Mapping[str, float], v: str) -> str:
    """``8 (112, 8.5)``: the measured payload bits, the largest value one neuron sent in one step
    and the unit spikes per event (a binary payload: ``1 (1, 1.0)``)."""
    return (f"{f[f'payload/{v}/bits']:.0f} ({f[f'payload/{v}/max_units']:.0f}, "
            f"{f[f'payload/{v}/spikes_per_event']:.2f})")


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


def _exit_curve(f: Mapping[str, float], v: str, rule: str, field: str) -> list[float]:
    out, i = [], 0
    while f"exit/{v}/{rule}/{field}_s{i}" in f:
        out.append(f[f"exit/{v}/{rule}/{field}_s{i}"])
        i += 1
    return out


def exit_table(results: Mapping[str, Any]) -> str | None:
    """Per variant with early exit: the calibrated setting and what it gives on the scored images,
    next to the fixed-T readout of the same mean cost; None without early exit."""
    f, exits = results["figures"], results.get("early_exit") or {}
    if not exits:
        return None
    rows = []
    for v, g in exits.items():
        cal = g["calibration"]
        c = g["chosen"]
        rows.append([v, g["chosen_rule"], f"{g['chosen_threshold']:.4g}", f"{cal['mean_steps'][c]:.2f}",
                     _pct(cal["top1"][c]), _pct(cal["ref_top1"][0]), f"{f[f'exit/{v}/mean_steps']:.2f}",
                     _pct(f[f"exit/{v}/top1"]), _pct(f[f"exit/{v}/agreement"]), f"{f[f'exit/{v}/energy_ratio']:.3f}"])
    return format_table(rows, ["variant", "rule", "threshold", "calib. mean steps", "calib. top-1 (%)",
                               "calib. reference (%)", "mean steps", "top-1 (%)", "agreement (%)", "energy vs ANN"])


def exit_curve_table(results: Mapping[str, Any], v: str) -> str:
    """The exit curve of variant ``v``: every setting of every rule (scored images)."""
    f = results["figures"]
    rows = []
    for rule in EXIT_RULES:
        for th, steps, top1, agree, energy in zip(*(_exit_curve(f, v, rule, k) for k in (
                "threshold", "mean_steps", "top1", "agreement", "energy_ratio"))):
            rows.append([rule, f"{th:.4g}", f"{steps:.2f}", _pct(top1), _pct(agree), f"{energy:.3f}"])
    return format_table(rows, ["rule", "threshold", "mean steps", "top-1 (%)", "agreement (%)", "energy vs ANN"])


def plot_exit(results: Mapping[str, Any], out_dir: str | Path, reference_name: str = "ANN") -> list[Path]:
    """Per variant with early exit: accuracy against mean steps and against energy, one curve per
    rule and the fixed-T readout for comparison, and the distribution of exit steps at the
    calibrated setting."""
    out, f = Path(out_dir), results["figures"]
    ref = {reference_name: _pct(f["ref/top1"])}
    method = results.get("method", "snn")
    paths: list[Path] = []
    for v in results.get("early_exit") or {}:
        steps = results["variants"][v]["readout_steps"]
        fixed_acc = [_pct(f[f"snn/{v}/top1_t{t}"]) for t in steps]
        acc = {rule: _exit_curve(f, v, rule, "top1") for rule in EXIT_RULES}
        by_steps = {f"exit: {r}": (_exit_curve(f, v, r, "mean_steps"), [_pct(a) for a in acc[r]]) for r in EXIT_RULES}
        by_energy = {f"exit: {r}": (_exit_curve(f, v, r, "energy_ratio"), [_pct(a) for a in acc[r]])
                     for r in EXIT_RULES}
        by_steps["fixed T"] = (steps, fixed_acc)
        by_energy["fixed T"] = ([f[f"energy/{v}/ratio_t{t}"] for t in steps], fixed_acc)
        paths.append(plot_curves(by_steps, out / f"exit_accuracy_vs_steps_{v}.png", xlabel="mean steps per image",
                                 ylabel="top-1 (%)", title=f"{method} {v}: early exit vs fixed T", hlines=ref))
        paths.append(plot_curves(by_energy, out / f"exit_accuracy_vs_energy_{v}.png", xlabel="E_SNN / E_ANN",
                                 ylabel="top-1 (%)", title=f"{method} {v}: early exit, energy spent", hlines=ref))
        paths.append(plot_bars({str(t): f[f"exit/{v}/steps_t{t}"] for t in steps}, out / f"exit_steps_{v}.png",
                               ylabel="share of images",
                               title=f"{method} {v}: exit step (mean {f[f'exit/{v}/mean_steps']:.2f})"))
    return paths


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
    exits = exit_table(results)
    if exits is not None:
        tables["early_exit"] = exits
        for v in results["early_exit"]:
            tables[f"early_exit_curve_{v}"] = exit_curve_table(results, v)
        plots += plot_exit(results, out, reference_name)
    json_path = write_json({**dict(extra or {}), **results, "tables": tables, "plots": plots}, out / "figures.json")
    return {"tables": tables, "plots": plots, "json": json_path}


def log_images(trainer: L.Trainer, paths: list[Path], prefix: str) -> None:
    """Send image files to every W&B logger of ``trainer`` under ``prefix/<file stem>``."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            for p in paths:
                logger.log_image(key=f"{prefix}/{Path(p).stem}", images=[str(p)])


def next_version(root: str | Path) -> Path:
    """``root/version_N`` with N one more than the largest existing one (0 for the first run)."""
    root = Path(root)
    taken = [int(p.name.removeprefix("version_")) for p in root.glob("version_*")
             if p.name.removeprefix("version_").isdigit()]
    return root / f"version_{max(taken, default=-1) + 1}"


def run_folder(trainer: L.Trainer) -> Path:
    """The folder of this run's files: the trainer's log dir when a logger versions it
    (``<root>/version_N`` with the CSV logger of ``configs/convert/``), else a new
    ``version_N`` under ``default_root_dir``, so a re-run never overwrites the last one.
    A collective under DDP (every rank must call it)."""
    log_dir = trainer.log_dir  # a broadcast from rank 0
    if trainer.loggers and log_dir and Path(log_dir) != Path(trainer.default_root_dir):
        return Path(log_dir)
    return next_version(trainer.default_root_dir)


class ConversionReport(Callback):
    """Tables, JSON, plots and the spike-driven check of a conversion evaluation.

    Args:
        out_dir: where ``figures.json`` and the plots go (default: the run's versioned folder,
            :func:`run_folder`); checked writable before anything is computed.
        check_images: test images the spike-driven check runs on (0: skip the check).
    """

    def __init__(self, out_dir: str | None = None, check_images: int = 8) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.check_images = check_images
        self._images: Tensor | None = None
        self.folder: Path | None = None
        self.written: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        folder = Path(self.out_dir) if self.out_dir else run_folder(trainer)
        self.folder = folder
        if trainer.is_global_zero:
            from csdlab.eval.plots import check_writable

            check_writable(folder, "the report folder (--report.out_dir)")
            if (folder / "figures.json").exists():
                log.warning("%s already holds a report: it is replaced", folder)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and self.check_images > 0:
            self._images = batch[0][: self.check_images].detach()

    def _spike_driven(self, pl_module: L.LightningModule) -> dict[str, Any]:
        if self._images is None:
            return {}
        x = self._images.to(next(pl_module.reference.parameters()).dtype)
        verdicts = {}
        for v, snn in pl_module.variants().items():
            with torch.no_grad():
                report = spike_driven_check(snn, lambda s: s(x), exempt=snn.analog_layers())
            verdicts[v] = {"spike_driven": report.ok, "layers_checked": len(report.layers),
                           "analog_inputs": report.violations, "operands": report.operand_kinds(),
                           "failed_sources": report.failed_sources,
                           "exempt": [c.name for c in report.layers if c.exempt], "summary": report.summary()}
            log.info("spike-driven check %s: %s", v, report.summary())
        return verdicts

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not getattr(pl_module, "results", None):
            return
        out = self.folder or Path(self.out_dir or trainer.default_root_dir)
        pl_module.results["spike_driven_check"] = self._spike_driven(pl_module)
        results = pl_module.results
        ref_name = pl_module.converter.reference_name
        meta = {"checkpoint": pl_module.checkpoint, "float64": pl_module.float64, "world_size": trainer.world_size}
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "num_images"):
            meta.update(dataset=dm.dataset, split=dm.split, images=dm.num_images(), limit=dm.limit)
        self.written = write_report(results, out, ref_name, extra=meta)
        images = int(results["figures"]["samples"])
        for name, table in self.written["tables"].items():
            log.info("%s conversion, %s (%d images, %s split):\n%s", results["method"], name, images,
                     meta.get("split", "?"), table)
        log.info("figures: %s", self.written["json"])
        log_images(trainer, self.written["plots"], f"conversion/{results['method']}")

