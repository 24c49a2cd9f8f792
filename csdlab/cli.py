"""Command-line plumbing shared by the entry points (no maths here)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from csdlab.lit.module import check_checkpoint_hparams


class TrainCLI(LightningCLI):
    """LightningCLI with csdlab's defaults: checkpoints, a rich progress bar (``--progress_bar.refresh_rate 0``
    hides it), and ``test`` on the best checkpoint after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/top1", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.filename": "best"})
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="run `test` on the best checkpoint when `fit` ends")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI next replaces the model config by a --ckpt_path's hyper-parameters; the config
        # is authoritative here, so a checkpoint of another architecture is an error, not a silent swap.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and Path(ckpt_path).is_file():
            saved = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
            check_checkpoint_hparams(saved, self.config[sub]["model"], ckpt_path)

    def before_fit(self) -> None:
        self._weights_only_by_default()

    def before_validate(self) -> None:
        self._weights_only_by_default()

    def before_test(self) -> None:
        self._weights_only_by_default()

    def _weights_only_by_default(self) -> None:
        # checkpoints are loaded with torch.load(weights_only=True) unless the user says otherwise
        cfg = self.config_init[self.subcommand]
        if cfg.get("weights_only") is None:
            cfg["weights_only"] = True

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit", True) and not self.trainer.fast_dev_run:
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best", weights_only=True)


def train_main(args: Sequence[str] | None = None, run: bool = True) -> TrainCLI:
    """``train.py {fit,validate,test} --config configs/train/NAME.yaml``."""
    from csdlab.lit import ClassificationModule, ImageDataModule

    # W&B stays offline (files under logs/, `wandb sync` later) unless the user sets WANDB_MODE=online.
    os.environ.setdefault("WANDB_MODE", "offline")
    return TrainCLI(ClassificationModule, ImageDataModule, args=args, run=run,
                    save_config_kwargs={"overwrite": True},
                    trainer_defaults={"default_root_dir": "logs"})


def _underscore_options(argv: Sequence[str]) -> list[str]:
    # jsonargparse names options after Python parameters (--calib_batches); accept --calib-batches too.
    out = []
    for a in argv:
        if a.startswith("--") and not a.startswith("---"):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def convert_main(argv: Sequence[str] | None = None) -> None:
    """``convert.py {csdformer,ecmt} ...``: subcommands built from the two functions' signatures."""
    from jsonargparse import CLI

    from csdlab.commands.csdformer import csdformer
    from csdlab.commands.ecmt import ecmt

    os.environ.setdefault("WANDB_MODE", "offline")
    CLI([csdformer, ecmt], as_positional=False, args=_underscore_options(sys.argv[1:] if argv is None else argv))
