"""train.py end to end: configs, the quick start, resuming a killed run, DDP replicas, and the
errors a user meets on the command line (one line, the fix named)."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import Callback

from csdlab.cli import TrainCLI, run_cli, train_main
from csdlab.lit import ClassificationModule, ImageDataModule, load_classifier
from csdlab.lit.checkpoint import AtomicCheckpointIO, LastEpochCheckpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "train").glob("*.yaml"))
QUICK = str(ROOT / "configs" / "train" / "quickstart.yaml")


def _cli_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", QUICK, "--trainer.logger", "false", "--progress_bar.refresh_rate", "0",
            "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ckpt"), *extra]


def _fast_args(tmp_path: Path, *extra: str) -> list[str]:
    """The quick start without the conversion callback, 5 batches per epoch: seconds per run."""
    return _cli_args(tmp_path, "--trainer.callbacks", "[]", "--trainer.limit_train_batches", "5",
                     "--trainer.enable_model_summary", "false", *extra)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_parses(path):
    cli = TrainCLI(ClassificationModule, ImageDataModule, run=False, args=["--config", str(path)])
    assert cli.model.num_classes == cli.datamodule.num_classes
    ckpt = cli.trainer.checkpoint_callback
    assert type(ckpt) is LastEpochCheckpoint and (ckpt.monitor, ckpt.save_top_k, ckpt.save_last) == ("val/top1", 1, True)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_short_quickstart_learns_digits(tmp_path, caplog):
    """8 epochs of the quick start (the full 30-epoch run is the slow test below)."""
    caplog.set_level("INFO", logger="csdlab")
    cli = train_main(_cli_args(tmp_path, "--trainer.max_epochs", "8"))
    top1 = float(cli.trainer.callback_metrics["test/top1"])
    assert top1 >= 0.85
    model, hp = load_classifier(tmp_path / "ckpt" / "best.ckpt", expected_model="csdformer_tiny")
    assert hp["model_kwargs"]["act"] == "lsq"
    # the result is one line, the last one csdlab logs
    assert caplog.records[-1].getMessage() == (
        f"RESULT test/top1 = {top1:.4f} on 359 test images (best checkpoint {tmp_path / 'ckpt' / 'best.ckpt'}, "
        f"val/top1 = {float(cli.trainer.checkpoint_callback.best_model_score):.4f})")


@pytest.mark.slow
def test_quickstart_reaches_95_percent(tmp_path):
    cli = train_main(_cli_args(tmp_path))
    assert cli.trainer.callback_metrics["test/top1"] >= 0.95
    assert cli.trainer.checkpoint_callback.best_model_score >= 0.95  # best val/top1


def test_config_relative_logs_stay_in_the_test_folder(tmp_path):
    """The quick start's own `logs/quickstart` (relative) lands in the test's folder (conftest)."""
    repo_logs = sorted((ROOT / "logs").rglob("*")) if (ROOT / "logs").exists() else []
    args = ["fit", "--config", QUICK, "--trainer.logger", "false", "--progress_bar.refresh_rate", "0",
            "--trainer.callbacks", "[]", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--test_after_fit", "false"]
    train_main(args)
    assert (tmp_path / "logs" / "quickstart" / "checkpoints" / "last.ckpt").is_file()
    assert (sorted((ROOT / "logs").rglob("*")) if (ROOT / "logs").exists() else []) == repo_logs


# -- resuming -------------------------------------------------------------------------------------
class _ValHistory(Callback):
    def __init__(self) -> None:
        self.top1: dict[int, float] = {}

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.top1[trainer.current_epoch] = float(trainer.callback_metrics["val/top1"])


class _Killed(RuntimeError):
    pass


class _KillAfterEpoch(Callback):
    """Raises as epoch `epoch + 1` starts, once every callback has finished epoch `epoch` (the
    checkpoint callback writes its files last), as a job killed between two epochs would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch + 1:
            raise _Killed(f"killed after epoch {self.epoch}")


def test_resume_after_a_killed_epoch_that_is_not_the_best(tmp_path):
    epochs = 5
    history = _ValHistory()
    train_main(_fast_args(tmp_path / "straight", "--trainer.max_epochs", str(epochs), "--test_after_fit", "false"),
               trainer_defaults={"callbacks": [history]})
    top1 = [history.top1[e] for e in range(epochs)]
    # the first epoch after which val/top1 is not a new best (ModelCheckpoint needs a strict gain)
    kill = next(e for e in range(1, epochs - 1) if top1[e] <= max(top1[:e]))
    best_epoch = max(range(kill + 1), key=lambda e: (top1[e], -e))

    run = tmp_path / "killed"
    with pytest.raises(_Killed, match=f"killed after epoch {kill}"):
        train_main(_fast_args(run, "--trainer.max_epochs", str(epochs), "--test_after_fit", "false"),
                   trainer_defaults={"callbacks": [_KillAfterEpoch(kill)]})
    last = torch.load(run / "ckpt" / "last.ckpt", weights_only=True)
    best = torch.load(run / "ckpt" / "best.ckpt", weights_only=True)
    # last.ckpt is the killed epoch, not the best one (Lightning's save_last=True kept the best)
    assert (last["epoch"], best["epoch"]) == (kill, best_epoch) and kill != best_epoch
    assert not torch.equal(last["state_dict"]["model.head.weight"], best["state_dict"]["model.head.weight"])

    resumed = _ValHistory()
    train_main(_fast_args(run, "--trainer.max_epochs", str(epochs), "--test_after_fit", "false",
                          "--ckpt_path", "last"), trainer_defaults={"callbacks": [resumed]})
    assert list(resumed.top1) == list(range(kill + 1, epochs))  # resumed after the killed epoch
    assert [resumed.top1[e] for e in resumed.top1] == top1[kill + 1:]
    for name in ("last.ckpt", "best.ckpt"):
        a = torch.load(tmp_path / "straight" / "ckpt" / name, weights_only=True)
        b = torch.load(run / "ckpt" / name, weights_only=True)
        assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]), name
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for k in a["state_dict"]:
            torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=f"{name} {k}")
    best_straight = torch.load(tmp_path / "straight" / "ckpt" / "best.ckpt", weights_only=True)
    assert best_straight["epoch"] == max(range(epochs), key=lambda e: (top1[e], -e))  # earliest of ties


def test_ddp_two_cpu_processes_train_identical_replicas(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *_cli_args(
        tmp_path, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "3", "--test_after_fit", "false",
        "--trainer.callbacks+=csdlab.callbacks.ReplicaConsistency")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "replicas.json").read_text())
    assert report["world_size"] == 2
    assert report["max_abs_diff"] == 0.0
    model, _ = load_classifier(tmp_path / "ckpt" / "last.ckpt")
    assert report["num_params"] == sum(p.numel() for p in model.parameters())


# -- bad input: one line, the fix named ----------------------------------------------------------
def _run(args: list[str], capsys) -> tuple[int, list[str]]:
    code = run_cli(train_main, args, prog="train.py")
    return code, capsys.readouterr().err.strip().splitlines()


def test_checkpoint_of_another_model_is_refused_before_training(tmp_path, capsys):
    train_main(_fast_args(tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                          "--test_after_fit", "false"))
    args = _cli_args(tmp_path, "--model.model_kwargs", "{num_classes: 10, img_size: 16, in_chans: 1, "
                     "pool_stages: [2, 3], embed_dim: 128}", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
    with pytest.raises(ValueError, match="was trained with model_kwargs"):
        train_main(args)
    code, err = _run(args, capsys)
    assert code == 1 and err[0].startswith("train.py: error: ") and "was trained with model_kwargs" in err[0]


def test_text_file_as_ckpt_path_is_named(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello\n")
    code, err = _run(_cli_args(tmp_path, "--ckpt_path", str(tmp_path / "notes.txt")), capsys)
    assert code == 1
    assert err[0].startswith(f"train.py: error: {tmp_path / 'notes.txt'} is not a PyTorch checkpoint")
    assert len(err) == 2 and "--debug" in err[1]  # no traceback
    code, err = _run(_cli_args(tmp_path, "--ckpt_path", str(tmp_path / "missing.ckpt")), capsys)
    assert code == 1 and "missing.ckpt does not exist" in err[0] and "`last`" in err[0]


def test_max_epochs_zero_is_named(tmp_path, capsys):
    code, err = _run(_fast_args(tmp_path, "--trainer.max_epochs", "0"), capsys)
    assert code == 1
    assert err[0] == ("train.py: error: --trainer.max_epochs 0 trains nothing (and leaves no checkpoint to test): "
                      "set it >= 1, or evaluate a checkpoint with `train.py test --ckpt_path FILE`")
    assert not (tmp_path / "ckpt").exists()


def test_typo_in_config_path_prints_the_error_first():
    """Through the real entry point: the first line is the error, not 100 lines of usage."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", "configs/typo.yaml"],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert lines[0].startswith("train.py: error: ") and "typo.yaml" in lines[0] and "does not exist" in lines[0]
    assert len(lines) <= 3, proc.stderr


def test_bad_option_value_is_one_error_not_the_usage(tmp_path, capsys):
    code, err = _run(_cli_args(tmp_path, "--trainer.max_epochs", "many"), capsys)
    assert code == 2 and err[0].startswith("train.py: error: ") and "max_epochs" in err[0]
    assert not any(line.startswith("usage:") for line in err)


def test_debug_flag_and_variable_keep_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(ArgumentError, match="typo.yaml"):
        run_cli(train_main, ["fit", "--config", "typo.yaml", "--debug"])
    monkeypatch.setenv("CSDLAB_DEBUG", "1")
    with pytest.raises(ValueError, match="max_epochs 0 trains nothing"):
        run_cli(train_main, _fast_args(tmp_path, "--trainer.max_epochs", "0"))


def test_bugs_keep_their_traceback():
    """Only deliberate errors are shortened: a ValueError from outside csdlab is a bug here."""
    with pytest.raises(ValueError, match="invalid literal for int"):
        run_cli(lambda argv: int("x"), [])
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        run_cli(lambda argv: 1 / 0, [])
    assert run_cli(lambda argv: None, []) == 0


def test_unwritable_log_folder_fails_before_training(tmp_path, capsys):
    """W&B would fall back to the system temporary folder: refuse, naming the folder."""
    (tmp_path / "file").write_text("not a folder")
    save_dir = tmp_path / "file" / "logs"  # cannot be created, even by root
    args = _fast_args(tmp_path, "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
                      "--trainer.logger.save_dir", str(save_dir), "--trainer.max_epochs", "1")
    code, err = _run(args, capsys)
    assert code == 1
    assert err[0].startswith(f"train.py: error: the WandbLogger's save_dir {save_dir} is not writable")
    assert not (tmp_path / "ckpt").exists()  # nothing trained


def test_pretrained_model_gets_its_own_normalisation(tmp_path, monkeypatch):
    """`model.pretrained: true` feeds vit_small's weights 0.5/0.5 images, not the dataset's stats."""
    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_pretrained", lambda *a, **k: None)  # offline: no weights needed
    args = ["--model.model_name", "vit_tiny_patch16_224", "--model.pretrained", "true",
            "--model.model_kwargs", "{num_classes: 10}", "--data.dataset", "cifar10", "--trainer.logger", "false"]
    cli = train_main(args, run=False)
    hp = cli.datamodule.hparams
    assert (hp.mean, hp.std, hp.crop_pct) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9)
    cli = train_main([*args, "--data.mean", "[0.4, 0.4, 0.4]", "--data.std", "[0.2, 0.2, 0.2]"], run=False)
    assert (cli.datamodule.hparams.mean, cli.datamodule.hparams.std) == ((0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    cli = train_main([*args[:2], *args[4:]], run=False)  # from scratch: the dataset's statistics
    assert cli.datamodule.hparams.mean == (0.4914, 0.4822, 0.4465)


# -- the base both command lines share -----------------------------------------------------------
def test_progress_bar_can_be_switched_off(tmp_path):
    """`--trainer.enable_progress_bar false` removes csdlab's rich bar instead of failing on it."""
    args = [a for a in _fast_args(tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                                  "--test_after_fit", "false", "--trainer.enable_progress_bar", "false")
            if a not in ("--progress_bar.refresh_rate", "0")]
    cli = train_main(args)
    assert cli.trainer.progress_bar_callback is None
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


class _LogEveryBatch(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logging.getLogger("csdlab.test").info("line %d printed while the bar is live", batch_idx)


def test_log_lines_print_above_a_live_progress_bar(tmp_path, monkeypatch):
    """In a terminal, rich redirects stderr while its bar is live; csdlab's handler writes to the
    stderr of the moment, so each line comes out whole above the bar (not through it, not lost)."""
    import io

    from lightning.pytorch.callbacks import RichProgressBar

    from csdlab.cli import configure_logging

    logger = logging.getLogger("csdlab")
    monkeypatch.setattr(logger, "handlers", [])
    configure_logging()
    terminal = io.StringIO()
    bar = RichProgressBar(console_kwargs={"force_terminal": True, "file": terminal, "width": 120})
    module = ClassificationModule("csdformer_tiny", {"num_classes": 10, "img_size": 16, "in_chans": 1,
                                                     "pool_stages": [2, 3], "embed_dim": 32})
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[bar, _LogEveryBatch()])
    trainer.fit(module, ImageDataModule("digits", batch_size=32))
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in terminal.getvalue().splitlines()]
    for i in range(3):
        assert f"line {i} printed while the bar is live" in lines


class _CtrlC(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise KeyboardInterrupt


def test_ctrl_c_stops_the_caller_and_leaves_sigint_heard(tmp_path):
    """Lightning turns Ctrl-C into a graceful shutdown, ignores SIGINT and exits with SystemExit(1),
    which a test session would survive (and go on with the next test): the CLI re-raises it."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train_main(_fast_args(tmp_path, "--trainer.max_epochs", "1", "--test_after_fit", "false"),
                   trainer_defaults={"callbacks": [_CtrlC()]})
    assert signal.getsignal(signal.SIGINT) is before
    assert run_cli(lambda argv: train_main(_fast_args(tmp_path, "--trainer.max_epochs", "1"),
                                           trainer_defaults={"callbacks": [_CtrlC()]}), []) == 130


def test_no_private_lightning_api():
    """csdlab uses Lightning through its public API only (private names change between releases)."""
    private = re.compile(r"from lightning[\w.]* import _\w|\._accelerator_connector|_given_hyperparameters|"
                         r"\._wandb_init|_prepare_subcommand_parser|\._run_subcommand|\._subcommand_parsers")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "csdlab").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert hits == []


def test_eval_imports_nothing_above_it():
    """csdlab.eval (the measurements and their report) imports neither the callbacks nor the CLI."""
    upward = re.compile(r"^\s*(from|import) csdlab\.(callbacks|cli)\b")
    hits = [f"{p.name}:{i}" for p in (ROOT / "csdlab" / "eval").glob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if upward.search(line)]
    assert hits == []
