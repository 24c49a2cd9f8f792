"""Command-line plumbing shared by the entry points (no maths here).

* :func:`run_cli` runs an entry point's ``main(argv)`` and turns the errors a user can fix (a
  missing file, a bad value, a config typo) into one line naming the problem and the fix; the
  traceback is kept for ``--debug`` or ``CSDLAB_DEBUG=1``.
* :class:`TrainCLI` / :func:`train_main`: ``train.py``, a LightningCLI with csdlab's defaults.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from csdlab.lit.checkpoint import AtomicCheckpointIO, LastEpochCheckpoint
from csdlab.lit.module import check_checkpoint_hparams, read_checkpoint

__all__ = ["DEBUG_ENV", "TrainCLI", "run_cli", "train_main", "quiet_dependencies", "convert_main"]

log = logging.getLogger(__name__)

#: set to 1 to see the full traceback of an error the command line reports in one line
DEBUG_ENV = "CSDLAB_DEBUG"


# -- errors in one line ---------------------------------------------------------------------------
def _raised_in_csdlab(e: BaseException) -> bool:
    """True when the innermost frame of ``e``'s traceback is csdlab code (a deliberate error
    message, not a bug deep inside a dependency)."""
    tb = e.__traceback__
    name = ""
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        tb = tb.tb_next
    return name == "csdlab" or name.startswith("csdlab.")


def _user_error(e: BaseException) -> bool:
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(e, (ArgumentError, MisconfigurationException, OSError)):
        return True  # bad options, a config Lightning refuses, a missing / unwritable / full path
    return isinstance(e, (ValueError, RuntimeError, ImportError)) and _raised_in_csdlab(e)


def _debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def configure_logging(debug: bool = False) -> None:
    """Entry points only: csdlab's ``log.info`` lines go to stderr (``DEBUG`` with ``--debug``)."""
    logger = logging.getLogger("csdlab")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run ``main(argv)`` as a command: errors a user can fix print one line, not a traceback.

    Reported in one line (``prog: error: <message>``): jsonargparse errors (unknown option, bad
    value, missing config file), Lightning's configuration errors, ``OSError`` (missing file, full
    disk, permission), and ``ValueError`` / ``RuntimeError`` / ``ImportError`` raised by csdlab
    itself (their messages name the fix). Anything else is a bug and keeps its traceback.

    Args:
        main: the entry point; takes the argument list (``--debug`` removed).
        argv: the arguments (default ``sys.argv[1:]``). ``--debug`` anywhere, or ``CSDLAB_DEBUG=1``,
            re-raises the error with its full traceback.
        prog: program name for the message (default ``sys.argv[0]``'s file name).

    Returns:
        The exit status: 0 on success, 1 for a reported error, 2 for a command-line error, or the
        status a ``SystemExit`` carried (``--help`` exits 0).
    """
    from jsonargparse import ArgumentError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    prog = prog or Path(sys.argv[0]).name or "csdlab"
    configure_logging(debug)
    try:
        main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as e:
        if debug or not _user_error(e):
            raise
        message = str(e).strip() or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
            message = f"{message}: {e.filename}"
        first, *rest = message.splitlines()
        sys.stderr.write(f"{prog}: error: {first}\n")
        for line in rest[:8]:  # jsonargparse lists the nested reasons below its first line
            sys.stderr.write(f"  {line}\n")
        hint = "`--help` lists the options; " if isinstance(e, ArgumentError) else ""
        sys.stderr.write(f"({hint}add --debug or set {DEBUG_ENV}=1 for the traceback)\n")
        return 2 if isinstance(e, ArgumentError) else 1
    return 0


# -- warnings a user cannot act on --------------------------------------------------------------
def quiet_dependencies() -> None:
    """Silence dependency warnings and tips that ask nothing of a csdlab user (process-wide; for
    entry points only). Each filter names what it hides."""
    for category in (DeprecationWarning, FutureWarning):  # from torch, timm, jsonargparse, wandb
        warnings.filterwarnings("ignore", category=category)
    for pattern in (
        r".*does not have many workers.*",  # csdlab's tensor datasets need no worker processes
        r".*The number of training batches .* is smaller than the logging interval.*",  # tiny datasets
        r".*Checkpoint directory .* exists and is not empty.*",  # resuming writes into the same folder
        r".*GPU available but not used.*",
        r".*LightningCLI's args parameter is intended.*",
        r".*srun.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning's advertisements ("💡 Tip: ... litlogger") and internal progress notes
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _drop_tips not in rank_zero.filters:
        rank_zero.addFilter(_drop_tips)
    # W&B's banner and exit notes come after the result line and repeat what the run log says
    # (csdlab logs where the offline run is and how to upload it); WANDB_SILENT=false shows them
    os.environ.setdefault("WANDB_SILENT", "true")


def _drop_tips(record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not (msg.startswith("💡 Tip") or msg.startswith("Loading `train_dataloader` to estimate"))


# -- training ---------------------------------------------------------------------------------------
def _check_writable(directory: str | Path, what: str) -> None:
    """Create ``directory`` and write a probe file into it, or raise naming the folder.

    W&B falls back to the system temporary folder when its ``save_dir`` is not writable, so a run
    would "succeed" and its files vanish: refuse instead."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise ValueError(f"{what} {d} is not writable ({e.strerror or e}); make it writable or point "
                         f"the run elsewhere (--trainer.default_root_dir, the logger's save_dir, "
                         f"--checkpoint.dirpath)") from e


class TrainCLI(LightningCLI):
    """LightningCLI with csdlab's defaults.

    * ``checkpoint``: a :class:`~csdlab.lit.checkpoint.LastEpochCheckpoint` (``best.ckpt`` by
      ``val/top1``, ``last.ckpt`` = the last epoch, so ``--ckpt_path last`` resumes it);
      checkpoints are written atomically (:class:`~csdlab.lit.checkpoint.AtomicCheckpointIO`);
    * a rich progress bar (``--progress_bar.refresh_rate 0`` hides it);
    * ``test`` on the best checkpoint after ``fit``, ending with one line that gives the result;
    * a pretrained model (``model.pretrained: true``) is fed images normalised the way its weights
      expect (its timm ``pretrained_cfg``) unless ``data.mean`` / ``data.std`` are given.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LastEpochCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/top1", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.filename": "best"})
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="run `test` on the best checkpoint when `fit` ends")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config  # run=False: no subcommand
        # LightningCLI next replaces the model config by a --ckpt_path's hyper-parameters; the config
        # is authoritative here, so a checkpoint of another architecture is an error, not a silent swap.
        ckpt_path = cfg.get("ckpt_path")
        if (ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and "://" not in str(ckpt_path)
                and not Path(ckpt_path).is_file()):
            raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist; give a .ckpt file, or `last` "
                                    f"to resume the run in --checkpoint.dirpath")
        if ckpt_path and Path(ckpt_path).is_file():
            saved = read_checkpoint(ckpt_path)
            saved = saved.get("hyper_parameters", {}) if isinstance(saved, dict) else {}
            check_checkpoint_hparams(saved, cfg["model"], ckpt_path)
        if sub == "fit":
            trainer = cfg.get("trainer", {})
            for key in ("max_epochs", "max_steps"):
                if trainer.get(key) == 0:
                    raise ValueError(f"--trainer.{key} 0 trains nothing (and leaves no checkpoint to test): set "
                                     f"it >= 1, or evaluate a checkpoint with `train.py test --ckpt_path FILE`")
        model, data = cfg.get("model", {}), cfg.get("data", {})
        if model.get("pretrained") and data.get("mean") is None and data.get("std") is None:
            from csdlab.lit.data import pretrained_data_args

            pre = pretrained_data_args(model["model_name"], model.get("model_kwargs"))
            for key, value in pre.items():
                if data.get(key) is None:
                    data[key] = value
            log.info("pretrained %s: images normalised as its weights expect (mean=%s, std=%s)",
                     model["model_name"], pre["mean"], pre["std"])

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for logger in trainer.loggers:
            # Lightning's WandbLogger passes anonymous=None, which W&B >= 0.19 warns about on every run
            init = getattr(logger, "_wandb_init", None)
            if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
                del init["anonymous"]
        return trainer

    def before_fit(self) -> None:
        self._check_output_dirs()
        self._weights_only_by_default()

    def before_validate(self) -> None:
        self._check_output_dirs()
        self._weights_only_by_default()

    def before_test(self) -> None:
        self._check_output_dirs()
        self._weights_only_by_default()

    def _check_output_dirs(self) -> None:
        if not self.trainer.is_global_zero:
            return
        _check_writable(self.trainer.default_root_dir, "--trainer.default_root_dir")
        for logger in self.trainer.loggers:
            save_dir = getattr(logger, "save_dir", None)
            if save_dir:
                _check_writable(save_dir, f"the {type(logger).__name__}'s save_dir")
        ckpt = self.trainer.checkpoint_callback
        if self.subcommand == "fit" and ckpt is not None and ckpt.dirpath:
            _check_writable(ckpt.dirpath, "--checkpoint.dirpath")

    def _weights_only_by_default(self) -> None:
        # checkpoints are loaded with torch.load(weights_only=True) unless the user says otherwise
        cfg = self.config_init[self.subcommand]
        if cfg.get("weights_only") is None:
            cfg["weights_only"] = True

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True) or self.trainer.fast_dev_run:
            return
        ckpt = self.trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None else ""
        if not best:
            log.warning("no best checkpoint was saved (nothing monitored?): testing the final weights")
        # verbose=False: the conversion figures would make a 150-row table; the RESULT line follows
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True,
                          verbose=False)
        self._report_result(best)

    def _report_result(self, best: str) -> None:
        """The one line a user looks for, after Lightning's tables."""
        if not self.trainer.is_global_zero:
            return
        metrics = self.trainer.callback_metrics
        top1 = metrics.get("test/top1")
        if top1 is None:
            return
        n = int(metrics["test/images"]) if "test/images" in metrics else len(getattr(self.datamodule, "test_set", []))
        ckpt = self.trainer.checkpoint_callback
        score = getattr(ckpt, "best_model_score", None)
        monitor = getattr(ckpt, "monitor", None)
        where = f"best checkpoint {best}" if best else "final weights"
        if best and score is not None and monitor:
            where += f", {monitor} = {float(score):.4f}"
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and os.environ.get("WANDB_MODE") == "offline":
                run_dir = Path(logger.experiment.dir).parent  # .../offline-run-<date>-<id>/files
                log.info("W&B run saved offline in %s; upload it with `wandb sync %s`", run_dir, run_dir)
        log.info("RESULT test/top1 = %.4f on %d test images (%s)", float(top1), n, where)


def train_main(args: Sequence[str] | None = None, run: bool = True,
               trainer_defaults: dict[str, Any] | None = None) -> TrainCLI:
    """``train.py {fit,validate,test} --config configs/train/NAME.yaml``.

    Args:
        args: the command line (default ``sys.argv[1:]``).
        run: run the subcommand (False: only parse and instantiate).
        trainer_defaults: extra Trainer defaults (``callbacks`` are added to the config's).
    """
    from csdlab.lit import ClassificationModule, ImageDataModule

    quiet_dependencies()
    # W&B stays offline (files under logs/, `wandb sync` later) unless the user sets WANDB_MODE=online.
    os.environ.setdefault("WANDB_MODE", "offline")
    return TrainCLI(ClassificationModule, ImageDataModule, args=args, run=run,
                    save_config_kwargs={"overwrite": True},
                    parser_kwargs={"exit_on_error": False},
                    trainer_defaults={"default_root_dir": "logs", **(trainer_defaults or {})})


def convert_main(argv: Sequence[str] | None = None) -> None:
    """``convert.py test --config configs/convert/NAME.yaml`` (see :mod:`csdlab.eval.cli`), or
    ``convert.py mbe-fit [--Ts [..]] [--Ns [..]] [--out_dir DIR]``: regenerate the MBE neurons'
    fitted parameters (:func:`csdlab.snn.mbe_fit.fit_all`; without ``--out_dir`` the package's own
    tables, bit for bit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_dependencies()
    if argv[:1] == ["mbe-fit"]:
        from jsonargparse import CLI

        from csdlab.snn.mbe_fit import fit_all

        CLI(fit_all, args=argv[1:], parser_mode="yaml", exit_on_error=False)
        return
    from csdlab.eval.cli import make_convert_cli

    os.environ.setdefault("WANDB_MODE", "offline")
    make_convert_cli(argv)
