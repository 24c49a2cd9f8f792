"""``convert.py``: conversion runs configured like training runs (LightningCLI + YAML).

``python convert.py test --config configs/convert/NAME.yaml [--model.converter.T 10 ...]``: the
model group is :class:`ConversionEvaluation` (``model.converter`` picks the method), the data
group :class:`ConversionData`, trainer options (devices, strategy, precision, logger, progress
bar) come from the config or the command line. No logic here beyond wiring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from csdlab.callbacks.report import ConversionReport
from csdlab.eval.data import ConversionData
from csdlab.eval.module import ConversionEvaluation

__all__ = ["ConvertCLI"]


class ConvertCLI(LightningCLI):
    """LightningCLI for conversion evaluations: ``test`` only, with the report callback and a
    progress bar built in (``--report.out_dir``, ``--progress_bar.refresh_rate 0`` hides it)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"test": {"model", "dataloaders", "datamodule"}}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.set_defaults({"verbose": False})  # the report logs its own tables, not 150 raw keys
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ConversionReport, "report")
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")
        # the data settings the model expects (recorded dataset and normalisation) go to the data
        parser.link_arguments("model.data_config", "data.model_data", apply_on="instantiate")


def make_convert_cli(args: Sequence[str] | None = None, run: bool = True) -> ConvertCLI:
    """Build (and by default run) the conversion CLI."""
    return ConvertCLI(ConversionEvaluation, ConversionData, args=args, run=run, seed_everything_default=0,
                      save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False},
                      trainer_defaults={"default_root_dir": "logs/convert", "use_distributed_sampler": False,
                                        "enable_checkpointing": False, "logger": False,
                                        "enable_model_summary": False})
