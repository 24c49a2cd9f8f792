"""Lightning callback: convert the model being trained into its SNN and measure it (issue 3, item 4).

On the last validation of ``fit`` (and every ``every_n_epochs`` epochs if set) and on every
``test``, a copy of ``pl_module.model`` is converted once per delay D and scored on the same
batches as the QANN. Figures are logged through ``pl_module.log_dict`` (so W&B or any logger gets
them; torchmetrics reduces them across ranks), under ``conversion/{val,test}/...``:
``snn/top1_D{D}``, ``snn/agreement_D{D}``, ``snn/max_logit_diff_D{D}``, firing rates per layer,
``energy/ratio_D{D}``; plots of accuracy vs D / vs time step and of the firing rates go to
``<log_dir>/conversion/`` and, for a ``WandbLogger``, to W&B as images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from csdlab.convert.csdformer import SpikingCSDformer, convert_csdformer
from csdlab.lit.snn_eval import ConversionEvaluator, neuron_layers
from csdlab.report import plot_bars, plot_curves

__all__ = ["ConversionCallback", "plot_conversion"]

log = logging.getLogger(__name__)


def plot_conversion(results: dict[str, float], delays: Sequence[int], time_steps: int, out_dir: str | Path,
                    prefix: str = "") -> list[Path]:
    """Accuracy vs delay D, accuracy vs time step t (one curve per D), firing rate per layer at the
    largest D; ``results`` as computed by :class:`ConversionEvaluator`. Returns the image paths."""
    out_dir = Path(out_dir)
    qann = {"QANN": 100 * results["qann/top1"]}
    ds = sorted(delays)
    paths = [
        plot_curves({"SNN": (ds, [100 * results[f"snn/top1_D{d}"] for d in ds])}, out_dir / f"{prefix}acc_vs_delay.png",
                    xlabel="delay D", ylabel="top-1 (%)", title=f"SNN accuracy vs delay (T={time_steps})",
                    hlines=qann),
        plot_curves({f"D={d}": (range(1, time_steps + 1),
                                [100 * results[f"snn/top1_D{d}_t{t}"] for t in range(1, time_steps + 1)])
                     for d in ds}, out_dir / f"{prefix}acc_vs_time.png", xlabel="output slot t",
                    ylabel="top-1 (%)", title="readout averaged over slots 1..t", hlines=qann),
    ]
    key = f"snn/firing_rate_D{ds[-1]}/"
    rates = {k.removeprefix(key): v for k, v in results.items() if k.startswith(key)}
    paths.append(plot_bars(rates, out_dir / f"{prefix}firing_rate.png", ylabel="spikes / neuron / step",
                           title=f"firing rate per layer (D={ds[-1]})"))
    return paths


class ConversionCallback(Callback):
    """Converts ``pl_module.model`` (a quantized CSDformer) and logs SNN-vs-QANN figures.

    Args:
        delays: the delays D to evaluate, one SNN each.
        every_n_epochs: also run after every n-th validation epoch (0: only at the end of fit).
        time_steps: T (default: the model's quantization levels L).
        plots: write the plots (rank 0) and send them to W&B when a ``WandbLogger`` is attached.
    """

    def __init__(self, delays: Sequence[int] = (0, 1, 2, 3), every_n_epochs: int = 0,
                 time_steps: int | None = None, plots: bool = True) -> None:
        super().__init__()
        if not delays or any(int(d) < 0 for d in delays):
            raise ValueError(f"delays must be a non-empty list of integers >= 0, got {delays!r}")
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0 = only at the end of fit), got {every_n_epochs}")
        self.delays = sorted(set(int(d) for d in delays))
        self.every_n_epochs = every_n_epochs
        self.time_steps = time_steps
        self.plots = plots
        self._snns: dict[int, SpikingCSDformer] | None = None
        self._evaluator: ConversionEvaluator | None = None
        self.last_results: dict[str, float] = {}

    @staticmethod
    def _model(pl_module: L.LightningModule) -> nn.Module:
        model = getattr(pl_module, "model", None)
        if model is None:
            raise ValueError(f"ConversionCallback needs pl_module.model (the timm model); "
                             f"{type(pl_module).__name__} has none")
        return model

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # fail at the start of the run, not after hours of training
        convert_csdformer(self._model(pl_module), self.time_steps, self.delays[0])

    def _should_run(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING:
            return True  # a stand-alone trainer.validate() always measures
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        return last or (self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0)

    def _start(self, pl_module: L.LightningModule) -> None:
        qann = self._model(pl_module)
        self._snns = {d: convert_csdformer(qann, self.time_steps, d) for d in self.delays}
        first = self._snns[self.delays[0]]
        self._evaluator = ConversionEvaluator(qann.num_classes, self.delays, first.time_steps,
                                              [n for n, _ in neuron_layers(first)]).to(pl_module.device)

    def _update(self, pl_module: L.LightningModule, batch: tuple[Tensor, Tensor]) -> None:
        if self._evaluator is None:
            return
        x, y = batch
        model = self._model(pl_module)
        was_training = model.training
        model.eval()
        self._evaluator.update(x, y, model, self._snns)
        model.train(was_training)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._evaluator is None:
            return
        results = self._evaluator.compute()
        time_steps = self._evaluator.time_steps
        self._snns = self._evaluator = None  # never kept as a submodule of pl_module
        self.last_results = results
        pl_module.log_dict({f"conversion/{stage}/{k}": v for k, v in results.items()}, sync_dist=True)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast under DDP: every rank asks
        if self.plots and trainer.is_global_zero:
            root = Path(log_dir) / "conversion"
            paths = plot_conversion(results, self.delays, time_steps, root,
                                    prefix=f"{stage}_epoch{trainer.current_epoch}_")
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    for p in paths:
                        logger.log_image(key=f"conversion/{stage}/{p.stem.split('_', 2)[-1]}", images=[str(p)])

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_run(trainer):
            self._start(pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(pl_module, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")
