"""``convert.py csdformer``: convert a trained quantized CSDformer checkpoint and measure the SNN."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from csdlab.convert.csdformer import save_snn
from csdlab.lit.data import ImageDataModule
from csdlab.lit.module import load_classifier
from csdlab.lit.snn_eval import SNNEvalModule
from csdlab.models.csdformer import CSDformer
from csdlab.report import format_table, write_json
from csdlab.snn.checks import spike_driven_check

__all__ = ["csdformer", "results_table"]

log = logging.getLogger(__name__)


def results_table(results: dict[str, float], delays: list[int], time_steps: int) -> str:
    """The README table: ANN, QANN, then the SNN per delay (accuracy, agreement with the QANN,
    largest logit difference, firing rate, energy ratio vs the ANN)."""
    rows: list[list[Any]] = []
    if "ann/top1" in results:
        rows.append(["ANN (float)", "-", 100 * results["ann/top1"], "-", "-", "-", "-"])
    rows.append(["QANN (LSQ)", "-", 100 * results["qann/top1"], 100.0, "0", "-", "1.00 (ANN MACs)"])
    for d in delays:
        k = f"D{d}"
        rows.append([f"SNN D={d}", time_steps + d, 100 * results[f"snn/top1_{k}"],
                     100 * results[f"snn/agreement_{k}"], f"{results[f'snn/max_logit_diff_{k}']:.2e}",
                     f"{results[f'snn/firing_rate_{k}']:.3f}", f"{results[f'energy/ratio_{k}']:.3f}"])
    return format_table(rows, ["model", "steps T+D", "top-1 (%)", "agreement (%)", "max abs logit diff",
                               "firing rate", "energy vs ANN"])


def csdformer(checkpoint: str, delay: int = 3, delays: list[int] | None = None, ann_checkpoint: str | None = None,
              data: str | None = None, data_dir: str = "data", split: str = "test", batch_size: int = 256,
              num_workers: int = 0, limit_batches: int | None = None, time_steps: int | None = None,
              float64: bool = False, accelerator: str = "auto", devices: int | str = 1, num_nodes: int = 1,
              strategy: str = "auto", out_dir: str = "logs/convert_csdformer") -> dict[str, Any]:
    """Convert a quantized CSDformer checkpoint into its SNN and evaluate QANN and SNNs side by side.

    Runs through a Lightning ``Trainer`` (``validate`` / ``test``), so several devices / nodes (DDP)
    split the data and metrics are reduced across ranks. Rank 0 prints the table and writes
    ``figures.json`` (with the spike-driven check's verdict), the plots and the SNN state (``snn_D{delay}.pt``, loadable with
    ``csdlab.convert.csdformer.load_snn``) under ``out_dir``.

    Args:
        checkpoint: a ``train.py`` checkpoint of a quantized CSDformer (``act: lsq`` or ``qcfs``).
        delay: the DIF delay D of the SNN that is saved (also evaluated).
        delays: all delays to evaluate (default ``0..delay``).
        ann_checkpoint: optional float (``act: relu``) checkpoint of the same architecture, scored
            as the ANN row of the table.
        data: dataset name (default: the checkpoint's training dataset, when it records one).
        data_dir: dataset root.
        split: ``test`` or ``val``.
        batch_size: per-device batch size.
        num_workers: data-loading workers.
        limit_batches: evaluate only this many batches per device (quick checks).
        time_steps: T (default: the quantization levels L; other values are refused).
        float64: simulate QANN and SNN in float64 (removes float32 rounding at level boundaries).
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        devices: devices per node.
        num_nodes: number of nodes.
        strategy: Lightning strategy (``auto``, ``ddp``, ...).
        out_dir: where the JSON, plots and SNN state are written.

    Returns:
        The figures (fractions), as in ``figures.json``.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    delays = sorted(set(range(delay + 1) if delays is None else delays) | {delay})
    qann, hp = load_classifier(checkpoint)
    if not isinstance(qann, CSDformer):
        raise ValueError(f"{checkpoint} holds a {hp['model_name']!r} model; convert.py csdformer needs a quantized "
                         "CSDformer checkpoint (convert.py ecmt converts ViTs)")
    ann = None
    if ann_checkpoint is not None:
        ann, _ = load_classifier(ann_checkpoint, expected_model=hp["model_name"])
    data_hp = torch.load(checkpoint, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters") or {}
    dataset = data or data_hp.get("dataset")
    if dataset is None:
        raise ValueError(f"{checkpoint} does not record its dataset; pass --data (e.g. fashion_mnist)")
    # the model fixes the input size; the split seed / fraction follow training when recorded
    dm = ImageDataModule(dataset=dataset, data_dir=data_dir, img_size=qann.img_size, batch_size=batch_size,
                         num_workers=num_workers, val_fraction=data_hp.get("val_fraction", 0.1),
                         seed=data_hp.get("seed", 0), augment=False)
    if float64:
        qann, ann = qann.double(), ann.double() if ann is not None else None
    config = {"model_name": hp["model_name"], "model_kwargs": dict(hp.get("model_kwargs") or {})}
    module = SNNEvalModule(qann, delays, dm, time_steps=time_steps, ann=ann, config=config)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        use_distributed_sampler=False, default_root_dir=out_dir,
                        limit_val_batches=limit_batches, limit_test_batches=limit_batches)
    (trainer.test if split == "test" else trainer.validate)(module, verbose=False)
    # a spawning strategy ran the module in child processes: read the logged (rank-reduced) figures
    results: dict[str, Any] = dict(module.results) or {
        k.removeprefix(f"{split}/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")}
    T = module.snn(delay).time_steps
    if trainer.is_global_zero:
        from csdlab.callbacks.conversion import plot_conversion

        out = Path(out_dir)
        table = results_table(results, delays, T)
        log.info("CSDformer conversion of %s (%s split, world size %d):\n%s", checkpoint, split,
                 trainer.world_size, table)
        print(table)  # the command's product: the README table on stdout
        snn = module.snn(delay).cpu()
        images = next(iter(dm.test_dataloader() if split == "test" else dm.val_dataloader()))[0][:16]
        check = spike_driven_check(snn, lambda s: s(images.to(snn.model.head.weight.dtype)),
                                   exempt=[snn.first_conv, snn.head])
        results["spike_driven"] = float(check.ok)
        log.info("spike-driven check (D=%d, %d layers): %s%s", delay, len(check.layers),
                 "pass" if check.ok else "FAIL", "" if check.ok else f", analog inputs at {check.violations}")
        snn_path = save_snn(snn.float(), out / f"snn_D{delay}.pt")
        plots = plot_conversion(results, delays, T, out)
        write_json({"checkpoint": checkpoint, "ann_checkpoint": ann_checkpoint, "split": split,
                    "dataset": dm.hparams.dataset, "time_steps": T, "delays": delays, "float64": float64,
                    "world_size": trainer.world_size, "figures": results, "snn_state": snn_path,
                    "plots": plots}, out / "figures.json")
    return results
