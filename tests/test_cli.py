"""Training end to end: the CLI, resuming a killed run, DDP replicas, configs, bad checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from csdlab.cli import TrainCLI, train_main
from csdlab.lit import ClassificationModule, ImageDataModule, load_classifier

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def _cli_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", QUICK, "--trainer.logger", "false", "--progress_bar.refresh_rate", "0",
            "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ckpt"), *extra]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_parses(path):
    cli = TrainCLI(ClassificationModule, ImageDataModule, run=False, args=["--config", str(path)])
    assert cli.model.num_classes == cli.datamodule.num_classes


def test_short_quickstart_learns_digits(tmp_path):
    """8 epochs of the quick start (the full 30-epoch run is the slow test below)."""
    cli = train_main(_cli_args(tmp_path, "--trainer.max_epochs", "8"))
    assert cli.trainer.callback_metrics["test/top1"] >= 0.85
    model, hp = load_classifier(tmp_path / "ckpt" / "best.ckpt", expected_model="csdformer_tiny")
    assert hp["model_kwargs"]["act"] == "lsq"


@pytest.mark.slow
def test_quickstart_reaches_95_percent(tmp_path):
    cli = train_main(_cli_args(tmp_path))
    assert cli.trainer.callback_metrics["test/top1"] >= 0.95
    assert cli.trainer.checkpoint_callback.best_model_score >= 0.95  # best val/top1


class _KillAfter(Callback):
    """Stops training after `epochs` epochs, as a killed job would (its last checkpoint is on disk)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _fit(tmp_path: Path, max_epochs: int, kill_after: int | None = None, ckpt_path: str | None = None):
    L.seed_everything(0)
    dm = ImageDataModule("digits", batch_size=64)
    model = ClassificationModule("csdformer_tiny", dict(num_classes=10, img_size=16, in_chans=1, pool_stages=[2, 3]),
                                 lr=2e-3, warmup_epochs=1)
    callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    if kill_after:
        callbacks.append(_KillAfter(kill_after))
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(model, dm, ckpt_path=ckpt_path, weights_only=True)
    return model


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    straight = _fit(tmp_path / "a", max_epochs=3)
    _fit(tmp_path / "b", max_epochs=3, kill_after=1)
    resumed = _fit(tmp_path / "b", max_epochs=3, ckpt_path="last")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(a["model.head.weight"], _fit(tmp_path / "c", max_epochs=1).state_dict()["model.head.weight"])


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
    assert len(report) and report["num_params"] == sum(p.numel() for p in model.parameters())


def test_checkpoint_of_another_model_is_refused(tmp_path):
    other = ClassificationModule("csdformer_tiny", dict(num_classes=10, img_size=16, in_chans=1, pool_stages=[2, 3]))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(other)
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    with pytest.raises(ValueError, match="holds a 'csdformer_tiny' model, expected 'csdformer_4_384'"):
        load_classifier(tmp_path / "tiny.ckpt", expected_model="csdformer_4_384")
    # resuming `fit` from it with another architecture fails before any training
    args = _cli_args(tmp_path, "--model.model_kwargs", "{num_classes: 10, img_size: 16, in_chans: 1, "
                     "pool_stages: [2, 3], embed_dim: 128}", "--ckpt_path", str(tmp_path / "tiny.ckpt"))
    with pytest.raises(ValueError, match="was trained with model_kwargs"):
        train_main(args)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a csdlab training checkpoint"):
        load_classifier(tmp_path / "foreign.pt")
