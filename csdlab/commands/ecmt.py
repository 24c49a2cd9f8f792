"""``convert.py ecmt``: training-free ECMT conversion of a timm ViT, calibrated and measured."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from csdlab.lit.data import ImageDataModule
from csdlab.lit.ecmt_eval import ECMTData, ECMTEvaluation
from csdlab.lit.module import build_model, load_classifier
from csdlab.report import format_table, plot_bars, plot_curves, write_json

__all__ = ["ecmt", "results_table", "firing_table", "load_vit"]

log = logging.getLogger(__name__)


def load_vit(model: str | None, pretrained: bool, checkpoint: str | None,
             model_kwargs: dict[str, Any] | None) -> tuple[nn.Module, str, dict[str, Any]]:
    """The float ViT to convert: a csdlab checkpoint, a timm state dict, or timm's pretrained weights.

    Returns:
        The model (eval mode), its timm name, and the data hyper-parameters stored in a csdlab
        checkpoint (empty otherwise).
    """
    if checkpoint is not None:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(ckpt, dict) and "hyper_parameters" in ckpt:  # a train.py checkpoint
            net, hp = load_classifier(checkpoint, expected_model=model)
            return net, hp["model_name"], dict(ckpt.get("datamodule_hyper_parameters") or {})
        if model is None:
            raise ValueError(f"{checkpoint} is a plain state dict: name its timm architecture with --model "
                             "(and --model_kwargs if it is not the default configuration)")
        net = build_model(model, model_kwargs)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{checkpoint} does not match {model} {model_kwargs or {}}: {e}") from e
        return net.eval(), model, {}
    if model is None or not pretrained:
        raise ValueError("give --checkpoint PATH, or --model NAME --pretrained (timm hub weights)")
    return build_model(model, model_kwargs, pretrained=True).eval(), model, {}


def results_table(r: dict[str, Any]) -> str:
    """The README table: one row per t (SNN accuracy, gap to the ANN, logit error, energy)."""
    rows = [["ANN", "-", r["ann_acc"], 0.0, "0", "1.000"]]
    for t, (acc, err, e) in enumerate(zip(r["snn_acc"], r["logit_error"], r["energy_ratio"]), start=1):
        rows.append(["SNN", t, acc, acc - r["ann_acc"], f"{err:.4f}", f"{e:.3f}"])
    return format_table(rows, ["model", "t", "top-1 (%)", "vs ANN (pt)", "mean abs logit error", "energy vs ANN"])


def firing_table(r: dict[str, Any]) -> str:
    """Firing rate (spikes per neuron per step, over all T steps) of each MT site, split into the
    base levels ``+th1`` / ``-th2`` and the higher levels ``+-th 2^k, k >= 1``."""
    rows = []
    for site, total in r["firing_rate"].items():
        per_level = r.get("firing_rate_per_level", {}).get(site)
        if per_level is None:  # a spawning strategy returns the per-site totals only
            rows.append([site, f"{total:.4f}", "-", "-", "-"])
            continue
        rate, n = per_level["rate"], len(per_level["rate"]) // 2
        higher = sum(rate[1:n]) + sum(rate[n + 1:])
        rows.append([site, f"{total:.4f}", f"{rate[0]:.4f}", f"{rate[n]:.4f}", f"{higher:.4f}"])
    return format_table(rows, ["MT site", "firing rate", "at +th1", "at -th2", "at higher levels"])


def _from_callback_metrics(metrics: dict[str, Any], T: int) -> dict[str, Any]:
    # spawning strategies ran the module in child processes: only the logged figures come back
    m = {k: float(v) for k, v in metrics.items()}
    return {"ann_acc": m["ann/acc"], "snn_acc": [m[f"snn/acc_t{t}"] for t in range(1, T + 1)],
            "logit_error": [m[f"snn/logit_err_t{t}"] for t in range(1, T + 1)],
            "energy_ratio": [m[f"snn/energy_ratio_t{t}"] for t in range(1, T + 1)],
            "firing_rate": {k.removeprefix("firing/"): v for k, v in m.items() if k.startswith("firing/")}}


def _plots(r: dict[str, Any], out: Path) -> list[Path]:
    ts = list(range(1, len(r["snn_acc"]) + 1))
    paths = [plot_curves({"SNN": (ts, r["snn_acc"])}, out / "accuracy_vs_t.png", xlabel="time step t",
                         ylabel="top-1 (%)", title="ECMT: accuracy vs t", hlines={"ANN": r["ann_acc"]}),
             plot_curves({"logit error": (ts, r["logit_error"]), "energy vs ANN": (ts, r["energy_ratio"])},
                         out / "error_energy_vs_t.png", xlabel="time step t", ylabel="value",
                         title="mean abs logit error, energy ratio"),
             plot_bars(r["firing_rate"], out / "firing_rate_per_site.png", ylabel="spikes / neuron / step",
                       title="MT firing rate per site")]
    if "firing_rate_per_level" in r:
        per_level = torch.tensor([v["rate"] for v in r["firing_rate_per_level"].values()]).mean(0)
        labels = next(iter(r["firing_rate_per_level"].values()))["levels"]
        paths.append(plot_bars(dict(zip(labels, per_level.tolist())), out / "firing_rate_per_level.png",
                               ylabel="spikes / neuron / step", title="MT firing rate per level (mean of sites)"))
    return paths


def ecmt(model: str | None = None, pretrained: bool = False, checkpoint: str | None = None,
         model_kwargs: dict[str, Any] | None = None, data: str = "fashion_mnist", data_dir: str = "data",
         img_size: int | None = None, split: str = "test", T: int = 8, levels: int = 8, percentile: float = 99.0, calib_batches: int = 8,
         softmax_threshold: float | None = 0.0125, gelu_thresholds: tuple[float, float] | None = None,
         batch_size: int = 128, num_workers: int = 0, limit: int | None = None, accelerator: str = "auto",
         devices: int | str = 1, num_nodes: int = 1, strategy: str = "auto", seed: int = 0,
         wandb: bool = False, wandb_project: str = "csdlab", out_dir: str = "logs/ecmt") -> dict[str, Any]:
    """Convert a float timm ViT into an ECMT SNN (METHODS 2) and measure it against the ANN.

    Calibration (``validate``) and evaluation (``test``) run through a Lightning ``Trainer``, so
    devices and nodes split the data (DDP) and every figure is reduced across ranks. Rank 0 prints
    the table and writes ``figures.json`` and plots under ``out_dir``.

    Args:
        model: timm model name (needed with ``pretrained`` or a plain state dict; checked against
            a csdlab checkpoint's model otherwise).
        pretrained: load timm's hub weights for ``model``.
        checkpoint: a ``train.py`` Lightning checkpoint or a plain timm state dict.
        model_kwargs: ``timm.create_model`` keyword arguments for a plain state dict or ``pretrained``.
        data: dataset (``digits``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``imagenet``).
        data_dir: dataset root.
        img_size: input resolution (default: the checkpoint's training resolution, else the model's).
        split: evaluation split, ``test`` or ``val``.
        T: time steps; accuracy, logit error and energy are reported at every ``t = 1..T``.
        levels: MT levels per sign n.
        percentile: p of the threshold percentiles (``th1`` = p-th, ``th2`` = -(100-p)-th).
        calib_batches: training batches for calibration.
        softmax_threshold: fixed post-softmax thresholds (METHODS 2.2: 0.0125); None: percentile.
        gelu_thresholds: fixed post-GELU ``(th1, th2)``, e.g. ``[0.25, 0.08]``; None: percentile.
        batch_size: per-device batch size.
        num_workers: data-loading workers.
        limit: evaluate only the first ``limit`` samples (quick checks).
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        devices: devices per node.
        num_nodes: nodes.
        strategy: Lightning strategy (``auto``, ``ddp``, ...).
        seed: seed of the calibration batch order.
        wandb: log the figures to Weights & Biases (offline unless ``WANDB_MODE=online``).
        wandb_project: W&B project.
        out_dir: output folder (under ``logs/``).

    Returns:
        The figures: accuracies in %, per-t lists, thresholds and firing rates per site and level.
    """
    net, name, data_hp = load_vit(model, pretrained, checkpoint, model_kwargs)
    # the resolution the model was trained at, so its patch grid and position embedding fit
    model_size = getattr(getattr(net, "patch_embed", None), "img_size", None)
    img_size = img_size or data_hp.get("img_size") or (model_size[0] if model_size else None)
    dm = ImageDataModule(dataset=data, data_dir=data_dir, img_size=img_size,
                         batch_size=batch_size, num_workers=num_workers,
                         val_fraction=data_hp.get("val_fraction", 0.1), seed=seed, augment=False)
    if getattr(net, "num_classes", dm.num_classes) != dm.num_classes:
        raise ValueError(f"{name} has {net.num_classes} classes but {data} has {dm.num_classes}")
    module = ECMTEvaluation(net, dm.num_classes, T=T, levels=levels, percentile=percentile,
                            softmax_threshold=softmax_threshold, gelu_thresholds=gelu_thresholds)
    logger: Any = False
    if wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project=wandb_project, save_dir="logs", name=f"ecmt-{name}-T{T}-n{levels}")
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                        logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        use_distributed_sampler=False, default_root_dir=out_dir)
    datamodule = ECMTData(dm, calib_batches=calib_batches, split=split, limit=limit)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = dict(module.results) or _from_callback_metrics(trainer.callback_metrics, T)
    if trainer.is_global_zero:
        out = Path(out_dir)
        table = results_table(results)
        log.info("ECMT %s on %s/%s, T=%d, n=%d, p=%g, world size %d:\n%s", name, data, split, T, levels,
                 percentile, trainer.world_size, table)
        print(table)  # the command's product: the README table on stdout
        print(firing_table(results))
        plots = _plots(results, out)
        write_json({"model": name, "checkpoint": checkpoint, "data": data, "split": split, "T": T,
                    "levels": levels, "percentile": percentile, "calib_batches": calib_batches,
                    "softmax_threshold": softmax_threshold, "gelu_thresholds": gelu_thresholds,
                    "world_size": trainer.world_size, "figures": results, "plots": plots},
                   out / "figures.json")
        if wandb:
            logger.log_image("ecmt/plots", [str(p) for p in plots])
    return results
