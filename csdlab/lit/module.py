"""LightningModule that trains any timm classifier (CSDformer float/QAT, plain timm ViTs)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ClassificationModule", "load_classifier", "build_model", "read_checkpoint"]

log = logging.getLogger(__name__)

# timm is imported where it is used: `train.py --help` builds its parser from this module's
# signatures and should not wait for timm (or the csdformer registry) to load.


def build_model(model_name: str, model_kwargs: dict[str, Any] | None = None, pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` with a clear error for an unknown name."""
    import timm

    import csdlab.models  # noqa: F401  registers csdformer_* with timm

    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown model {model_name!r}; csdlab models: {timm.list_models('csdformer*')}, "
                         f"similar timm names: {close}")
    return timm.create_model(model_name, pretrained=pretrained, **(model_kwargs or {}))


class ClassificationModule(L.LightningModule):
    """Image classification with timm's optimizer factory, cosine schedule, Mixup and label smoothing.

    Args:
        model_name: a timm registry name (``csdformer_tiny``, ``vit_tiny_patch16_224``, ...).
        model_kwargs: keyword arguments for ``timm.create_model`` (``num_classes``, ``img_size``,
            ``in_chans``, ``act``, ``levels``, ...).
        pretrained: load timm's pretrained weights (needs the model hub).
        optimizer: timm optimizer name for ``create_optimizer_v2`` (``adamw``, ``sgd``, ``lamb``...).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (timm skips biases, norms and LSQ step sizes).
        warmup_epochs: linear warm-up length, in epochs (fractions allowed).
        min_lr: final learning rate of the cosine decay.
        warmup_lr: learning rate at the start of the warm-up.
        label_smoothing: label smoothing factor (ignored when Mixup/CutMix is on; Mixup smooths).
        mixup_alpha: Mixup alpha (0 disables).
        cutmix_alpha: CutMix alpha (0 disables).
        mixup_switch_prob: probability of CutMix instead of Mixup when both are enabled.
        init_from: a csdlab training checkpoint of the same model (name and kwargs) whose weights
            start this run (loaded when ``fit`` sets up); optimizer, schedule and epoch counter start afresh. For a second
            training stage (a fine-tune with a new schedule); to continue an interrupted run use
            ``--ckpt_path last`` instead.
    """

    def __init__(self, model_name: str = "csdformer_tiny", model_kwargs: dict[str, Any] | None = None,
                 pretrained: bool = False, optimizer: str = "adamw", lr: float = 5e-4,
                 weight_decay: float = 0.05, warmup_epochs: float = 0.0, min_lr: float = 1e-5,
                 warmup_lr: float = 1e-6, label_smoothing: float = 0.0, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, mixup_switch_prob: float = 0.5,
                 init_from: str | None = None) -> None:
        super().__init__()
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        # init_from is not a property of the model: a checkpoint loaded later must not re-read it
        self.save_hyperparameters(ignore=["init_from"])
        self.model = build_model(model_name, model_kwargs, pretrained)
        self.init_from = init_from  # loaded when fit starts (setup), so a config parses anywhere
        self.num_classes = self.model.num_classes
        from csdlab.lit.data import model_input_size

        size = model_input_size(self.model)
        if size is not None:  # lets Lightning's model summary count FLOPs (else it prints "Total FLOPs: 0")
            self.example_input_array = torch.zeros(1, *size)
        n = self.num_classes
        self.mixup = (Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=mixup_switch_prob,
                            label_smoothing=label_smoothing, num_classes=n)
                      if mixup_alpha > 0 or cutmix_alpha > 0 else None)
        self.train_loss = SoftTargetCrossEntropy() if self.mixup else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss()
        self.metrics = nn.ModuleDict({
            f"{stage}_{k}": MulticlassAccuracy(n, top_k=min(k, n), average="micro")
            for stage in ("val", "test") for k in (1, 5)
        })
        # how many images a (possibly limited) test covered, summed over processes
        self.test_images = SumMetric()

    def _load_initial_weights(self, path: str) -> None:
        ckpt = read_checkpoint(path)
        saved = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        if not saved or "state_dict" not in ckpt:
            raise ValueError(f"init_from={path} is not a csdlab training checkpoint (no hyper-parameters / "
                             f"state_dict); pass a checkpoint written by train.py")
        check_checkpoint_hparams(saved, self.hparams, path)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        self.model.load_state_dict(state, strict=True)
        log.info("weights initialised from %s (epoch %s)", path, ckpt.get("epoch"))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_from is not None:
            # before the optimizer is built; a resumed run (--ckpt_path) then overrides these weights
            self._load_initial_weights(self.init_from)
            self.init_from = None
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        n_data = getattr(dm, "num_classes", None)
        if n_data is not None and n_data != self.num_classes:
            raise ValueError(f"the data has {n_data} classes but the model {self.hparams.model_name!r} has "
                             f"{self.num_classes}; set model.model_kwargs.num_classes: {n_data}")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        loss = self.train_loss(self.model(x), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self.model(x)
        self.log(f"{stage}/loss", self.eval_loss(logits, y), sync_dist=True)
        for k in (1, 5):
            metric = self.metrics[f"{stage}_{k}"]
            metric.update(logits, y)
            self.log(f"{stage}/top{k}", metric, prog_bar=k == 1)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")
        self.test_images.update(torch.tensor(float(len(batch[1])), device=self.device))
        self.log("test/images", self.test_images)

    def configure_optimizers(self) -> dict[str, Any]:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        hp = self.hparams
        opt = create_optimizer_v2(self.model, opt=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        per_epoch = max(total // max(self.trainer.max_epochs or 1, 1), 1)
        warmup = int(hp.warmup_epochs * per_epoch)
        # Per-step cosine so that short runs (a few epochs on a CPU) still anneal smoothly.
        sched = CosineLRScheduler(opt, t_initial=max(total - warmup, 1), lr_min=hp.min_lr,
                                  warmup_t=warmup, warmup_lr_init=hp.warmup_lr,
                                  warmup_prefix=True, t_in_epochs=False)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_hparams(checkpoint.get("hyper_parameters", {}), self.hparams)


def check_checkpoint_hparams(saved: Mapping[str, Any], current: Mapping[str, Any], path: str | Path = "checkpoint") -> None:
    """Raise if a checkpoint was trained with another model than the one configured now."""
    for key in ("model_name", "model_kwargs"):
        if key in saved and saved[key] != current.get(key):
            raise ValueError(
                f"{path} was trained with {key}={saved[key]!r}, this run uses {current.get(key)!r}; "
                f"use the config the checkpoint was trained with (or start without --ckpt_path)")


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that say what the file is.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a PyTorch checkpoint (a text file, a truncated write, a
            pickle of arbitrary objects); the message names the file and what torch reported.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path (or train one with train.py fit)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch reports a text file as IndexError / UnpicklingError, a truncated one as RuntimeError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a PyTorch checkpoint (torch.load: {type(e).__name__}: {reason[:200]}); "
                         f"pass a .ckpt written by train.py") from e


def load_classifier(path: str | Path, expected_model: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the timm model of a csdlab Lightning checkpoint and load its weights (strict).

    Args:
        path: a checkpoint written by ``train.py`` (Lightning ``.ckpt``).
        expected_model: if given, the checkpoint must hold this timm model name.

    Returns:
        The model in eval mode and the checkpoint's hyper-parameters.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "model_name" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a csdlab training checkpoint (no model_name hyper-parameter / state_dict); "
                         f"pass a checkpoint written by train.py")
    if expected_model is not None and hp["model_name"] != expected_model:
        raise ValueError(f"{path} holds a {hp['model_name']!r} model, expected {expected_model!r}")
    model = build_model(hp["model_name"], hp.get("model_kwargs"))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the architecture {hp['model_name']} {hp.get('model_kwargs')}: {e}") from e
    return model.eval(), dict(hp)
