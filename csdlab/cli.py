"""The command lines: ``train.py`` and ``convert.py``, two LightningCLIs on one base (no maths here).

* :func:`run_cli` runs an entry point's ``main(argv)`` and turns the errors a user can fix (a
  missing file, a bad value, a config typo) into one line naming the problem and the fix; the
  traceback is kept for ``--debug`` or ``CSDLAB_DEBUG=1``.
* :class:`CsdlabCLI`: what both share: output folders checked writable before anything runs,
  atomic checkpoint files, W&B offline by default (and where its run went), a rich progress bar
  that ``--trainer.enable_progress_bar false`` removes, log lines printed above the live bar, and a
  Ctrl-C that stops the program (Lightning turns it into ``SystemExit(1)`` otherwise).
* :class:`TrainCLI` / :func:`train_main`: ``train.py``.
* :class:`ConvertCLI` / :func:`convert_main`: ``convert.py test`` (a conversion evaluation,
  :mod:`csdlab.eval`), ``convert.py mbe-fit`` (:func:`mbe_fit`) and ``convert.py compare``
  (:mod:`csdlab.eval.compare`: several methods on one checkpoint, one table).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from csdlab.eval.plots import check_writable
from csdlab.lit.checkpoint import AtomicCheckpointIO, LastEpochCheckpoint
from csdlab.lit.module import check_checkpoint_hparams, read_checkpoint

__all__ = ["DEBUG_ENV", "CsdlabCLI", "TrainCLI", "ConvertCLI", "run_cli", "train_main", "convert_main",
           "make_convert_cli", "mbe_fit", "quiet_dependencies"]

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


class CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to ``sys.stderr`` as it is when each record is emitted.

    While a rich progress bar is live in a terminal, rich replaces ``sys.stderr`` by a proxy that
    prints each line above the bar; a plain ``StreamHandler`` keeps the stream it was created with,
    so its lines would be drawn through the bar (garbled, or erased by the next refresh)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(debug: bool = False) -> None:
    """Entry points only: csdlab's ``log.info`` lines go to stderr (``DEBUG`` with ``--debug``),
    above a live progress bar (:class:`CurrentStderrHandler`)."""
    logger = logging.getLogger("csdlab")
    if not any(isinstance(h, CurrentStderrHandler) for h in logger.handlers):
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


@contextmanager
def interrupts_propagate() -> Iterator[None]:
    """Let Ctrl-C stop the program.

    Lightning answers a ``KeyboardInterrupt`` inside ``fit`` / ``test`` with a graceful shutdown,
    then ignores SIGINT and raises ``SystemExit(1)``: a caller that runs several trainings (a test
    session) would go on with the next one and no longer hear Ctrl-C. Here that ``SystemExit`` is
    raised again as the ``KeyboardInterrupt`` it was, with the SIGINT handler restored."""
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        yield
    except SystemExit as e:
        if isinstance(e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from e.__context__
        raise
    finally:
        if main_thread and handler is not None and signal.getsignal(signal.SIGINT) != handler:
            signal.signal(signal.SIGINT, handler)


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


# -- the base of both command lines ----------------------------------------------------------------
class CsdlabArgumentParser(LightningArgumentParser):
    """LightningArgumentParser that keeps its subcommands action (``convert.py`` adds ``mbe-fit``)."""

    subcommands_action: Any = None

    def add_subcommands(self, *args: Any, **kwargs: Any) -> Any:
        self.subcommands_action = super().add_subcommands(*args, **kwargs)
        return self.subcommands_action


class _NoProgressBar(Callback):
    """Stands in for the rich progress bar when ``--trainer.enable_progress_bar false``."""


class CsdlabCLI(LightningCLI):
    """What ``train.py`` and ``convert.py`` share.

    * a rich progress bar (``--progress_bar.refresh_rate 0`` hides it, ``--trainer.enable_progress_bar
      false`` removes it);
    * every folder the run writes to (``default_root_dir``, the loggers' ``save_dir``, the checkpoint
      folder) is created and checked writable before anything is computed;
    * checkpoints are written atomically (:class:`~csdlab.lit.checkpoint.AtomicCheckpointIO`) and
      loaded with ``weights_only=True`` unless the user says otherwise;
    * W&B is offline unless ``WANDB_MODE`` says otherwise; the run log says where the offline run
      went and how to upload it.
    """

    #: Trainer arguments this command line does not offer (conversion: the training loop's)
    trainer_skip: frozenset[str] = frozenset()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet_dependencies()
        # W&B stays offline (files under logs/, `wandb sync` later) unless the user sets WANDB_MODE=online
        os.environ.setdefault("WANDB_MODE", "offline")
        kwargs.setdefault("parser_class", CsdlabArgumentParser)
        with interrupts_propagate():
            super().__init__(*args, **kwargs)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if not self.trainer_skip:
            return super().add_core_arguments_to_parser(parser)
        parser.add_class_arguments(self.trainer_class, "trainer", fail_untyped=False, instantiate=False,
                                   sub_configs=True, skip=set(self.trainer_skip))
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items()
                             if k != "callbacks" and k not in self.trainer_skip})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the bar's look (theme, console) is not a run setting: kept out of --help
        parser.add_class_arguments(RichProgressBar, "progress_bar", fail_untyped=False, sub_configs=True,
                                   skip={"theme", "console_kwargs"})
        parser.callback_keys.append("progress_bar")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if cfg.get("trainer", {}).get("enable_progress_bar") is False:
            cfg["progress_bar"] = _NoProgressBar()  # Lightning refuses a progress bar callback then
        fixed = {k: v for k, v in self.trainer_defaults.items() if k in self.trainer_skip}
        trainer = super().instantiate_trainer(**fixed, **kwargs)
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
            import wandb

            # W&B reads WANDB_SILENT here, before the run starts: its notes (e.g. that the `anonymous`
            # setting Lightning always passes has no effect) stay quiet unless WANDB_SILENT=false
            wandb.setup()
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
        check_writable(self.trainer.default_root_dir, "--trainer.default_root_dir")
        for logger in self.trainer.loggers:
            save_dir = getattr(logger, "save_dir", None)
            if save_dir:
                check_writable(save_dir, f"the {type(logger).__name__}'s save_dir")
        ckpt = self.trainer.checkpoint_callback
        if self.subcommand == "fit" and ckpt is not None and ckpt.dirpath:
            check_writable(ckpt.dirpath, "--checkpoint.dirpath")

    def _weights_only_by_default(self) -> None:
        # checkpoints are loaded with torch.load(weights_only=True) unless the user says otherwise
        cfg = self.config_init[self.subcommand]
        if "weights_only" in cfg and cfg.get("weights_only") is None:
            cfg["weights_only"] = True

    def after_fit(self) -> None:
        self._finish_wandb_runs()

    def after_validate(self) -> None:
        self._finish_wandb_runs()

    def after_test(self) -> None:
        self._finish_wandb_runs()

    def _finish_wandb_runs(self) -> None:
        """Close each W&B run (a later run in the same process starts its own) and say where an
        offline one went (W&B's own exit notes are silenced, :func:`quiet_dependencies`)."""
        if not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                if os.environ.get("WANDB_MODE") == "offline":
                    run_dir = Path(run.dir).parent  # .../offline-run-<date>-<id>/files
                    log.info("W&B run saved offline in %s; upload it with `wandb sync %s`", run_dir, run_dir)
                run.finish()


# -- training ---------------------------------------------------------------------------------------
class TrainCLI(CsdlabCLI):
    """``train.py``: a LightningCLI for :class:`~csdlab.lit.ClassificationModule` with csdlab's defaults.

    * ``checkpoint``: a :class:`~csdlab.lit.checkpoint.LastEpochCheckpoint` (``best.ckpt`` by
      ``val/top1``, ``last.ckpt`` = the last epoch, so ``--ckpt_path last`` resumes it);
    * ``test`` on the best checkpoint after ``fit``, ending with one line that gives the result;
    * a pretrained model (``model.pretrained: true``) is fed images normalised the way its weights
      expect (its timm ``pretrained_cfg``) unless ``data.mean`` / ``data.std`` are given;
    * everything :class:`CsdlabCLI` gives both command lines.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(LastEpochCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/top1", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.filename": "best"})
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

    def after_fit(self) -> None:
        result = None
        if self.config[self.subcommand].get("test_after_fit", True) and not self.trainer.fast_dev_run:
            ckpt = self.trainer.checkpoint_callback
            best = ckpt.best_model_path if ckpt is not None else ""
            if not best:
                log.warning("no best checkpoint was saved (nothing monitored?): testing the final weights")
            # verbose=False: the conversion figures would make a 150-row table; the RESULT line follows
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True,
                              verbose=False)
            result = self._result_line(best)
        self._finish_wandb_runs()
        if result:
            log.info("%s", result)  # the one line a user looks for: the last one

    def _result_line(self, best: str) -> str | None:
        if not self.trainer.is_global_zero:
            return None
        metrics = self.trainer.callback_metrics
        top1 = metrics.get("test/top1")
        if top1 is None:
            return None
        n = int(metrics["test/images"]) if "test/images" in metrics else len(getattr(self.datamodule, "test_set", []))
        ckpt = self.trainer.checkpoint_callback
        score = getattr(ckpt, "best_model_score", None)
        monitor = getattr(ckpt, "monitor", None)
        where = f"best checkpoint {best}" if best else "final weights"
        if best and score is not None and monitor:
            where += f", {monitor} = {float(score):.4f}"
        return f"RESULT test/top1 = {float(top1):.4f} on {n} test images ({where})"


def train_main(args: Sequence[str] | None = None, run: bool = True,
               trainer_defaults: dict[str, Any] | None = None) -> TrainCLI:
    """``train.py {fit,validate,test} --config configs/train/NAME.yaml``.

    Args:
        args: the command line (default ``sys.argv[1:]``).
        run: run the subcommand (False: only parse and instantiate).
        trainer_defaults: extra Trainer defaults (``callbacks`` are added to the config's).
    """
    from csdlab.lit import ClassificationModule, ImageDataModule

    return TrainCLI(ClassificationModule, ImageDataModule, args=args, run=run,
                    save_config_kwargs={"overwrite": True},
                    parser_kwargs={"exit_on_error": False},
                    trainer_defaults={"default_root_dir": "logs", **(trainer_defaults or {})})


# -- conversion -------------------------------------------------------------------------------------
#: the converters ``--model.converter`` accepts by class name alone (``ECMTConverter``)
CONVERTER_MODULES = ("csdlab.convert.csdformer", "csdlab.convert.ecmt", "csdlab.convert.ecmt_burst", "csdlab.convert.mbe",
                     "csdlab.convert.sta")

#: Trainer arguments of the training loop: a conversion evaluation only runs ``test``
TRAINING_ONLY = frozenset({
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches", "limit_val_batches",
    "limit_predict_batches", "overfit_batches", "val_check_interval", "check_val_every_n_epoch",
    "num_sanity_val_steps", "enable_checkpointing", "accumulate_grad_batches", "gradient_clip_val",
    "gradient_clip_algorithm", "reload_dataloaders_every_n_epochs", "detect_anomaly", "model_registry",
    "use_distributed_sampler", "enable_autolog_hparams"})

TEST_SUMMARY = ("Convert a trained network with the method --model.converter names and measure every spiking "
                "variant against it on the evaluation split.")
TEST_DESCRIPTION = ("Convert the network (--model.checkpoint, or --model.model_name with --model.pretrained "
                    "true) with the method --model.converter names, score the reference network and every "
                    "spiking variant on the evaluation split, and write the tables, figures.json and plots "
                    "into the run's folder (logs/convert/<config>/version_N unless --report.out_dir).")
MBE_FIT_DESCRIPTION = ("Fit the MBE neurons' parameters (every primitive for every T and N) and write "
                       "mbe_T{T}_N{N}.json files into a new folder (logs/mbe_fit/version_N unless --out_dir); "
                       "--replace_shipped true replaces the tables shipped in csdlab/snn/mbe_tables/.")
MBE_FIT = "mbe-fit"
COMPARE_DESCRIPTION = ("Compare converters on one checkpoint and the same test images, each at T = 1, 2, 4, 8, 16: "
                       "one table (comparison.md, comparison.json: top-1, agreement, measured payload, energy "
                       "per event and per unit spike, simulation time / ANN side by side) and two plots, in a "
                       "new folder (logs/compare/version_N unless --out_dir).")
COMPARE = "compare"


def _register_converters() -> None:
    """Import every converter module: jsonargparse resolves a class name given alone
    (``--model.converter ECMTConverter``, ``--model.converter.help MBEConverter``) among the imported
    subclasses of :class:`~csdlab.eval.api.Converter`."""
    import importlib

    for name in CONVERTER_MODULES:
        importlib.import_module(name)


def mbe_fit(out_dir: str | None = None, replace_shipped: bool = False, Ts: list[int] = [2, 3, 4, 8, 10, 12, 16],  # noqa: B006
            Ns: list[int] = [4, 8]) -> dict[str, Any]:  # noqa: B006
    """Fit the MBE neurons' parameters and write one ``mbe_T{T}_N{N}.json`` per (T, N).

    The fit reproduces the shipped tables' quality, not their bytes (rounding differs across CPUs).

    Args:
        out_dir: folder for the tables (default: a new ``logs/mbe_fit/version_N``); convert with
            them through ``--model.converter.table_dir``.
        replace_shipped: write into the package's own folder (``csdlab/snn/mbe_tables/``),
            replacing the tables every MBE conversion uses by default.
        Ts: time steps T to fit.
        Ns: numbers of bases N to fit.
    """
    from csdlab.eval.report import next_version
    from csdlab.snn.mbe import table_path
    from csdlab.snn.mbe_fit import fit_all

    if replace_shipped and out_dir is not None:
        raise ValueError("give either --out_dir or --replace_shipped true, not both")
    folder = table_path(Ts[0], Ns[0]).parent if replace_shipped else Path(out_dir or next_version("logs/mbe_fit"))
    check_writable(folder, "the table folder")
    log.info("MBE fit: T in %s, N in %s, into %s", list(Ts), list(Ns), folder)
    summary = fit_all(folder, Ts=Ts, Ns=Ns)
    if replace_shipped:
        log.info("replaced the shipped tables in %s", folder)
    else:
        log.info("wrote %d tables into %s; convert with them: --model.converter.table_dir %s",
                 len(summary["files"]), folder, folder)
    return summary


class ConversionTrainer(Trainer):
    """The Trainer of ``convert.py``: Lightning's, with ``test`` described as what it does here."""

    @functools.wraps(Trainer.test)
    def test(self, *args: Any, **kwargs: Any) -> Any:
        return super().test(*args, **kwargs)

    # the subcommand's one-line help is the first line of this docstring; the arguments are Trainer.test's
    _doc = inspect.cleandoc(Trainer.test.__doc__ or "")
    test.__doc__ = TEST_SUMMARY + ("\n\n" + _doc[_doc.index("Args:"):] if "Args:" in _doc else "")
    del _doc


class _SaveRunConfig(SaveConfigCallback):
    """``config.yaml`` into the run's own folder, next to ``figures.json`` (never over another run's)."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        from csdlab.eval.report import ConversionReport

        report = next((c for c in trainer.callbacks if isinstance(c, ConversionReport)), None)
        if report is None or report.folder is None:
            return super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and not self.already_saved:
            self.parser.save(self.config, report.folder / self.config_filename, skip_none=False, overwrite=True,
                             multifile=self.multifile)
        self.already_saved = True


class ConvertCLI(CsdlabCLI):
    """``convert.py``: ``test`` runs a conversion evaluation (:class:`~csdlab.eval.ConversionEvaluation`,
    :class:`~csdlab.eval.ConversionData`, the report callback :class:`~csdlab.eval.report.ConversionReport`
    and everything :class:`CsdlabCLI` gives); ``mbe-fit`` runs :func:`mbe_fit`; ``compare`` runs
    :func:`csdlab.eval.compare.compare` (one ``test``-style evaluation per method and T, one table).

    Every run writes into its own folder: ``<default_root_dir>/version_N`` (the CSV logger's), with
    ``config.yaml``, ``figures.json``, the plots and the W&B run (offline by default).
    """

    trainer_skip = TRAINING_ONLY

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"test": {"model", "dataloaders", "datamodule", "ckpt_path", "weights_only"}}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            fit = self.init_parser(description=MBE_FIT_DESCRIPTION, exit_on_error=False)
            fit.add_function_arguments(mbe_fit, as_positional=False)
            subcommands = self.parser.subcommands_action
            # the report logs its own tables, not Lightning's 150-row table of raw keys
            subcommands.choices["test"].set_defaults({"verbose": False})
            subcommands.add_subcommand(MBE_FIT, fit, help=MBE_FIT_DESCRIPTION)
            from csdlab.eval.compare import compare

            cmp = self.init_parser(description=COMPARE_DESCRIPTION, exit_on_error=False)
            cmp.add_function_arguments(compare, as_positional=False)
            subcommands.add_subcommand(COMPARE, cmp, help=COMPARE_DESCRIPTION)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        from csdlab.eval.report import ConversionReport

        parser.add_lightning_class_args(ConversionReport, "report")
        # the data settings the model expects (recorded dataset and normalisation) go to the data
        parser.link_arguments("model.data_config", "data.model_data", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        if self.subcommand in (MBE_FIT, COMPARE):
            # not a Trainer method: nothing of Lightning to build here; run it and leave nothing to run
            from csdlab.eval.compare import compare

            fn = mbe_fit if self.subcommand == MBE_FIT else compare
            self.model = self.datamodule = self.trainer = None
            cfg = self.config[self.subcommand]
            self.result = fn(**{k: cfg[k] for k in inspect.signature(fn).parameters if k in cfg})
            self.subcommand = None
            return
        super().instantiate_classes()



def make_convert_cli(args: Sequence[str] | None = None, run: bool = True) -> ConvertCLI:
    """Build (and by default run) ``convert.py``'s command line."""
    from csdlab.eval import ConversionData, ConversionEvaluation

    _register_converters()
    root = "logs/convert"
    return ConvertCLI(
        ConversionEvaluation, ConversionData, trainer_class=ConversionTrainer, args=args, run=run,
        seed_everything_default=0,
        save_config_callback=_SaveRunConfig, save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # a conversion never optimises: no --optimizer / --lr_scheduler
        load_from_checkpoint_support=False,  # nothing of a conversion run is reloaded from a checkpoint
        parser_kwargs={"exit_on_error": False, "description": (
            "Convert a trained network into spiking networks and measure them (test), or fit the MBE "
            "neurons' parameters (mbe-fit)."), "test": {"description": TEST_DESCRIPTION, "exit_on_error": False}},
        trainer_defaults={
            "default_root_dir": root, "enable_model_summary": False,
            # the CSV logger versions the run folder (version_N); W&B gets the figures and plots
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": root, "name": ""}},
                       {"class_path": "lightning.pytorch.loggers.WandbLogger",
                        "init_args": {"project": "csdlab", "save_dir": root}}],
            # ConversionData splits the images between processes itself: every image once, no
            # padding. Lightning's DistributedSampler pads the last batches with repeated images
            # (so 1 and N processes would score different sets), hence not used.
            "use_distributed_sampler": False, "enable_checkpointing": False})


def convert_main(argv: Sequence[str] | None = None) -> None:
    """``convert.py test --config configs/convert/NAME.yaml`` or ``convert.py mbe-fit [...]``."""
    make_convert_cli(list(sys.argv[1:] if argv is None else argv))
