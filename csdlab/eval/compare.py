"""The method comparison (``convert.py compare``): several converters on one checkpoint and the same
images, each at several T, in one table (markdown and JSON) and two plots.

Every (method, T) is one ordinary conversion evaluation (:class:`~csdlab.eval.module.ConversionEvaluation`
run by ``Trainer.test``, the path ``convert.py test`` takes): the same calibration images, the same
test images, the same metric keys (:mod:`csdlab.eval.metrics`). Per row: top-1 after the first step
and at T, agreement with the ANN, the measured payload (bits, largest value one neuron sent in one
step, unit spikes per event), energy / ANN under both counting rules, and the simulation time / ANN
forward, timed side by side (interleaved rounds on the same images, medians, counters off).

A method is a ``configs/convert/*.yaml`` file, optionally with converter options after a colon::

    configs/convert/fmnist_vit_ecmt.yaml:levels=16;percentile=99.9

Its ``T`` (``Ts = [T]`` for a converter that takes a list, MBE) is set to each requested T; a T a
method cannot run (MBE has no T = 1 table) becomes a row saying why.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from csdlab.eval.api import Converter, SpikingModel
from csdlab.eval.plots import _figure, _save, check_writable, format_table, write_json

__all__ = [
    "ROW_KEYS",
    "MethodSpec",
    "build_converter",
    "compare",
    "comparison_table",
    "meets",
    "parse_method",
    "peer_answers",
    "peer_answers_table",
    "plot_comparison",
    "time_side_by_side",
]

log = logging.getLogger(__name__)

#: the figures of one row (fractions; percent only in the markdown table)
ROW_KEYS = ("top1_t1", "top1", "agreement", "payload_bits", "max_units", "spikes_per_event", "energy_event",
            "energy_spike", "sim_over_ann")


class MethodSpec:
    """One method of the comparison: a convert config and converter options over it."""

    def __init__(self, config: str, overrides: Mapping[str, Any] | None = None, label: str | None = None) -> None:
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"no convert config {config!r}: give a configs/convert/*.yaml file")
        cfg = yaml.safe_load(path.read_text()) or {}
        conv = (cfg.get("model") or {}).get("converter")
        if not isinstance(conv, Mapping) or "class_path" not in conv:
            raise ValueError(f"{config}: no model.converter.class_path; give a convert config (configs/convert/)")
        self.config, self.class_path = str(path), str(conv["class_path"])
        self.init_args = {**dict(conv.get("init_args") or {}), **dict(overrides or {})}
        self.overrides = dict(overrides or {})
        self.data = dict(cfg.get("data") or {})
        self.checkpoint = (cfg.get("model") or {}).get("checkpoint")
        extra = ",".join(f"{k}={v}" for k, v in self.overrides.items())
        self.label = label or (path.stem + (f" [{extra}]" if extra else ""))


def parse_method(text: str) -> MethodSpec:
    """``path.yaml`` or ``path.yaml:key=value;key=value`` (``,`` works too, inside a quoted list
    item; values read as YAML: ``16``, ``null``)."""
    path, _, opts = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, (o.strip() for o in re.split("[,;]", opts))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad converter option {item!r} in {text!r}: write key=value (e.g. levels=16)")
        overrides[key.strip()] = yaml.safe_load(value)
    return MethodSpec(path, overrides)


def build_converter(spec: MethodSpec, T: int) -> Converter:
    """The spec's converter at ``T`` steps (its ``T``, or ``Ts = [T]``)."""
    module, _, name = spec.class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    args = dict(spec.init_args)
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if "T" in params:
        args["T"] = T
    elif "Ts" in params:
        args["Ts"] = [T]
    else:
        raise ValueError(f"{cls.__name__} takes neither T nor Ts: it cannot be compared across T")
    return cls(**args)


def time_side_by_side(ann: nn.Module, snn: SpikingModel, x: Tensor, repeats: int = 3) -> dict[str, float]:
    """Median seconds of ``snn(x)`` and ``ann(x)`` over ``repeats`` interleaved rounds (one warm-up
    each; the order alternates), counters off; ``ratio`` = SNN / ANN."""
    times: dict[str, list[float]] = {"ann": [], "snn": []}
    fns = {"ann": lambda: ann(x), "snn": lambda: snn(x)}
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    # inference mode, as Trainer.test ran the models (their counting buffers are inference tensors)
    with torch.inference_mode():
        for r in range(repeats + 1):
            order = ["ann", "snn"] if r % 2 == 0 else ["snn", "ann"]
            for k in order:
                sync()
                t0 = time.perf_counter()
                fns[k]()
                sync()
                if r:
                    times[k].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"ann_s": med["ann"], "snn_s": med["snn"], "ratio": med["snn"] / med["ann"]}


def _row(results: Mapping[str, Any], variant: str) -> dict[str, float]:
    f, v = results["figures"], variant
    steps = results["variants"][v]["readout_steps"]
    return {"top1_t1": f.get(f"snn/{v}/top1_t1", float("nan")) if 1 in steps else float("nan"),
            "top1": f[f"snn/{v}/top1"], "agreement": f[f"snn/{v}/agreement"],
            "payload_bits": f[f"payload/{v}/bits"], "max_units": f[f"payload/{v}/max_units"],
            "spikes_per_event": f[f"payload/{v}/spikes_per_event"], "energy_event": f[f"energy/{v}/ratio"],
            "energy_spike": f[f"energy/{v}/ratio_spike"]}


def _evaluate(converter: Converter, checkpoint: str, data: Mapping[str, Any], accelerator: str,
              timing_images: int, timing_repeats: int) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """One ``convert.py test``-style run, then the side-by-side timing of each variant."""
    from lightning.pytorch import Trainer, seed_everything

    from csdlab.eval.data import ConversionData
    from csdlab.eval.module import ConversionEvaluation

    seed_everything(0, verbose=False)  # as convert.py test
    module = ConversionEvaluation(converter, checkpoint=checkpoint)
    dm = ConversionData(**data, model_data=module.data_config)
    trainer = Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False)
    trainer.test(module, datamodule=dm, verbose=False)
    x = next(iter(dm.test_dataloader()))[0][:timing_images].to(module.device, module._ref_dtype())
    timing = {v: time_side_by_side(module.reference, snn, x, timing_repeats) for v, snn in module.variants().items()}
    return module.results, timing


def compare(methods: list[str], checkpoint: str | None = None, Ts: list[int] = [1, 2, 4, 8, 16],  # noqa: B006
            limit: int | None = 1000, batch_size: int | None = None, calib_batches: int | None = None,
            out_dir: str | None = None, timing_images: int = 50, timing_repeats: int = 3,
            accelerator: str = "auto", include: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """Compare converters on one checkpoint and the same images; write ``comparison.md``,
    ``comparison.json``, ``accuracy_vs_energy.png`` and ``accuracy_vs_payload.png``.

    Args:
        methods: convert configs, each optionally with converter options
            (``configs/convert/fmnist_vit_ecmt.yaml:levels=16``).
        checkpoint: the network every method converts (default: the first config's).
        Ts: time steps; every method runs at each.
        limit: score the first ``limit`` test images (None: the whole split); the same for all.
        batch_size: images per batch (default: the first config's).
        calib_batches: calibration batches of training images (default: the first config's).
        out_dir: where the files go (default: a new ``logs/compare/version_N``).
        timing_images: images of the side-by-side timing (the first test images).
        timing_repeats: timed rounds per candidate (medians).
        accelerator: Lightning's accelerator (``auto``, ``cpu``, ``gpu``).
        include: ``comparison.json`` files of earlier comparisons on the same checkpoint and the
            same images (checked) whose rows join this table (methods run as separate processes).
    """
    from csdlab.eval.report import next_version

    if not methods and not include:
        raise ValueError("give at least one method: --methods [configs/convert/fmnist_vit_ecmt.yaml, ...]")
    if not Ts or any(not isinstance(t, int) or t < 1 for t in Ts):
        raise ValueError(f"Ts must be integers >= 1, got {Ts!r}")
    if timing_images < 1 or timing_repeats < 1:
        raise ValueError("timing_images and timing_repeats must be >= 1")
    earlier = [json.loads(Path(p).read_text()) for p in include]
    specs = [parse_method(m) for m in methods]
    first = specs[0] if specs else None
    checkpoint = checkpoint or (first.checkpoint if first else earlier[0]["checkpoint"])
    if not checkpoint:
        raise ValueError("no checkpoint: pass --checkpoint or set model.checkpoint in the first config")
    cfg_data = first.data if first else earlier[0]["data"]
    data = {"dataset": cfg_data.get("dataset"), "split": cfg_data.get("split", "test"), "limit": limit,
            "batch_size": batch_size or cfg_data.get("batch_size", 250),
            "calib_batches": calib_batches or cfg_data.get("calib_batches", 8)}
    if "data_dir" in cfg_data:
        data["data_dir"] = cfg_data["data_dir"]
    for p, e in zip(include, earlier, strict=True):
        same = {k: e["data"].get(k) for k in ("dataset", "split", "limit", "calib_batches")}
        if e["checkpoint"] != checkpoint or same != {k: data[k] for k in same}:
            raise ValueError(f"{p} compared {e['checkpoint']} on {same}, not {checkpoint} on the images here: "
                             "include only comparisons of the same checkpoint, images and calibration")
    folder = Path(out_dir or next_version("logs/compare"))
    check_writable(folder, "the comparison folder (--out_dir)")
    rows: list[dict[str, Any]] = [r for e in earlier for r in e["rows"]]
    ann: dict[str, float] = next((e["ann"] for e in earlier if e.get("ann")), {})
    for spec in specs:
        for T in Ts:
            row: dict[str, Any] = {"method": spec.label, "T": T}
            try:
                converter = build_converter(spec, T)
                row["origin"] = converter.origin
            except ValueError as e:  # a T the method has no parameters for
                log.warning("%s at T = %d: %s", spec.label, T, e)
                rows.append({**row, "skipped": str(e)})
                continue
            log.info("compare: %s at T = %d", spec.label, T)
            results, timing = _evaluate(converter, checkpoint, data, accelerator, timing_images, timing_repeats)
            f = results["figures"]
            ann = {"top1": f["ref/top1"], "samples": f["samples"]}
            for v in results["variants"]:
                rows.append({**row, "variant": v, **_row(results, v), "sim_over_ann": timing[v]["ratio"],
                             "sim_s": timing[v]["snn_s"], "ann_s": timing[v]["ann_s"],
                             "declared_payload": results.get("payload_declared")})
            # the rows so far, after every run: a long comparison stopped early keeps what it measured
            write_json({"checkpoint": checkpoint, "data": data, "ann": ann, "rows": rows, "partial": True},
                       folder / "comparison.json")
    out = {"checkpoint": checkpoint, "data": data, "Ts": list(Ts), "ann": ann, "rows": rows,
           "methods": [{"label": s.label, "config": s.config, "class_path": s.class_path, "init_args": s.init_args}
                       for s in specs], "timing": {"images": timing_images, "repeats": timing_repeats}}
    table = comparison_table(out)
    out["answers"] = peer_answers(rows)
    answers = peer_answers_table(out["answers"])
    (folder / "comparison.md").write_text(table + "\n" + (f"\n{answers}\n" if answers else ""))
    out["table"] = table
    out["plots"] = plot_comparison(out, folder)
    write_json(out, folder / "comparison.json")
    log.info("comparison on %s, %d images (ANN top-1 %.2f %%):\n%s%s", checkpoint, int(ann.get("samples", 0)),
             100 * ann.get("top1", float("nan")), table, f"\n\n{answers}" if answers else "")
    log.info("wrote %s", folder)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.2f}"  # NaN (no such readout) is None in the JSON


def comparison_table(out: Mapping[str, Any]) -> str:
    """The markdown table of :func:`compare`'s rows (percent for accuracies)."""
    header = ["method", "T", "top-1 t=1 (%)", "top-1 at T (%)", "agreement (%)", "payload bits (largest value)",
              "spikes / event", "energy / ANN, per event", "energy / ANN, per unit spike", "simulation / ANN"]
    body: list[list[Any]] = []
    ann = out.get("ann") or {}
    if ann:
        body.append(["ANN", "-", _pct(ann["top1"]), _pct(ann["top1"]), "100.00", "-", "-", "1.000", "1.000", "1.0"])
    for r in out["rows"]:
        if "skipped" in r:
            body.append([r["method"], r["T"], "-", "-", "-", "-", "-", "-", "-", f"n/a: {r['skipped'][:60]}"])
            continue
        body.append([r["method"], r["T"], _pct(r["top1_t1"]), _pct(r["top1"]), _pct(r["agreement"]),
                     f"{r['payload_bits']:.0f} ({r['max_units']:.0f})", f"{r['spikes_per_event']:.2f}",
                     f"{r['energy_event']:.3f}", f"{r['energy_spike']:.3f}", f"{r['sim_over_ann']:.1f}"])
    return format_table(body, header)


#: a csdlab row meets a peer row when it is at least as good in every one of these (same rule each)
_AT_MOST = ("payload_bits", "energy_event", "energy_spike", "sim_over_ann")


def meets(row: Mapping[str, Any], peer: Mapping[str, Any]) -> bool:
    """``row`` is at least as accurate as ``peer`` with no larger payload, no more energy under either
    counting rule and no longer simulation (its own side-by-side ratio)."""
    return row["top1"] >= peer["top1"] and all(row[k] <= peer[k] for k in _AT_MOST)


def peer_answers(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For every row of a peer method (a converter whose ``origin`` is not csdlab), the csdlab row that
    meets it (:func:`meets`) at the least energy per event, or ``None``: the claim a comparison is run
    to check, stated row by row. Rows without an ``origin`` (older comparisons) count as csdlab's."""
    def ident(r: Mapping[str, Any]) -> dict[str, Any]:
        return {k: r[k] for k in ("method", "T", "variant") if k in r}

    done = [r for r in rows if "skipped" not in r]
    ours = [r for r in done if r.get("origin", "csdlab") == "csdlab"]
    out = []
    for peer in (r for r in done if r.get("origin", "csdlab") != "csdlab"):
        met = [r for r in ours if meets(r, peer)]
        best = min(met, key=lambda r: (r["energy_event"], r["energy_spike"])) if met else None
        out.append({"peer": ident(peer), "met_by": None if best is None else ident(best)})
    return out


def peer_answers_table(answers: list[Mapping[str, Any]]) -> str:
    """Markdown: each peer row and the csdlab row that meets it (empty string: no peer rows)."""
    if not answers:
        return ""
    body = [[f"{a['peer']['method']} T = {a['peer']['T']}",
             "not met" if a["met_by"] is None else f"{a['met_by']['method']} T = {a['met_by']['T']}"]
            for a in answers]
    return format_table(body, ["peer row", ("csdlab row at least as accurate, no more bits, energy (both rules) "
                                            "or simulation time")])


def plot_comparison(out: Mapping[str, Any], folder: str | Path) -> list[Path]:
    """Accuracy vs energy (per event: solid, per unit spike: dashed, one colour per method, a point
    per T) and accuracy vs payload bits (a point per method and T, labelled with T)."""
    folder = Path(folder)
    rows = [r for r in out["rows"] if "skipped" not in r]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ann = (out.get("ann") or {}).get("top1")
    fig, ax = _figure(6.5, 4.2)
    for i, m in enumerate(methods):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["T"])
        colour = f"C{i % 10}"
        ax.plot([r["energy_event"] for r in rs], [100 * r["top1"] for r in rs], "o-", color=colour,
                label=f"{m} (per event)")
        ax.plot([r["energy_spike"] for r in rs], [100 * r["top1"] for r in rs], "x--", color=colour, alpha=0.6,
                label=f"{m} (per unit spike)")
        for r in rs:
            ax.annotate(f"T{r['T']}", (r["energy_event"], 100 * r["top1"]), fontsize=7, xytext=(3, 2),
                        textcoords="offset points")
    if ann is not None:
        ax.axhline(100 * ann, color="k", lw=0.8, ls=":", label="ANN")
    ax.set_xscale("log")
    ax.set(xlabel="E_SNN / E_ANN (log)", ylabel="top-1 at T (%)", title="accuracy vs energy, both counting rules")
    ax.legend(fontsize=6)
    paths = [_save(fig, folder / "accuracy_vs_energy.png")]
    fig, ax = _figure(6.5, 4.2)
    for i, m in enumerate(methods):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["T"])
        ax.scatter([r["payload_bits"] for r in rs], [100 * r["top1"] for r in rs], s=[12 + 8 * r["T"] for r in rs],
                   color=f"C{i % 10}", alpha=0.7, label=m)
        for r in rs:
            ax.annotate(f"T{r['T']}", (r["payload_bits"], 100 * r["top1"]), fontsize=7, xytext=(3, 2),
                        textcoords="offset points")
    if ann is not None:
        ax.axhline(100 * ann, color="k", lw=0.8, ls=":", label="ANN")
    ax.set(xlabel="payload bits per event (measured)", ylabel="top-1 at T (%)",
           title="accuracy vs payload and T (marker size: T)")
    ax.legend(fontsize=6)
    paths.append(_save(fig, folder / "accuracy_vs_payload.png"))
    return paths
