"""ConversionCallback during fit / test: the evaluation path's figures logged under conversion/,
for any converter (CSDformer per delay, ECMT on a ViT: the figures of convert.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from csdlab.callbacks.conversion import ConversionCallback
from csdlab.cli import make_convert_cli, train_main
from csdlab.convert.csdformer import CSDformerConverter
from csdlab.lit.data import ImageDataModule
from csdlab.lit.module import ClassificationModule
from tests.checkpoints import DIGITS_VIT

DIGITS_MODEL = {"num_classes": 10, "img_size": 16, "in_chans": 1, "pool_stages": [2, 3], "embed_dim": 32,
                "act": "lsq", "levels": 4}


def _trainer(tmp_path: Path, callback: ConversionCallback, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=2,
                     limit_test_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                     callbacks=[callback], **kwargs)


def test_callback_logs_conversion_figures(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ClassificationModule("csdformer_tiny", DIGITS_MODEL, lr=2e-3)
    dm = ImageDataModule("digits", batch_size=32)
    callback = ConversionCallback(CSDformerConverter(delay=3, delays=[0, 3]))
    trainer = _trainer(tmp_path, callback)
    trainer.fit(module, dm)
    m = trainer.callback_metrics
    assert float(m["conversion/val/snn/D3/agreement"]) == 1.0
    assert float(m["conversion/val/snn/D3/max_logit_diff"]) < 1e-4
    assert float(m["conversion/val/snn/D3/top1"]) == pytest.approx(float(m["conversion/val/ref/top1"]))
    assert float(m["conversion/val/snn/D0/max_logit_diff"]) > 1e-3
    assert 0 < float(m["conversion/val/snn/D3/firing_rate"]) < 1
    assert 0 < float(m["conversion/val/energy/D3/ratio"]) < 2
    assert "conversion/val/snn/D3/firing_rate/blocks.0.attn.act_q" in m
    plots = sorted(p.name for p in (tmp_path / "conversion" / "val_epoch0").glob("*.png"))
    assert plots == ["accuracy_vs_latency.png", "accuracy_vs_t.png", "energy_vs_t.png", "firing_rate_per_site.png"]
    trainer.test(module, dm)
    assert float(trainer.callback_metrics["conversion/test/snn/D3/agreement"]) == 1.0


def test_callback_rejects_float_model(tmp_path: Path) -> None:
    module = ClassificationModule("csdformer_tiny", {**DIGITS_MODEL, "act": "relu"})
    with pytest.raises(ValueError, match="float CSDformer"):
        _trainer(tmp_path, ConversionCallback()).validate(module, ImageDataModule("digits", batch_size=32))
    with pytest.raises(ValueError, match="every_n_epochs must be >= 0"):
        ConversionCallback(every_n_epochs=-1)
    with pytest.raises(ValueError, match="calib_batches must be >= 0"):
        ConversionCallback(calib_batches=-1)


@pytest.mark.parametrize(("every", "epoch", "runs"), [
    (0, 0, False), (0, 4, True),  # only the last of 5 epochs
    (2, 1, True), (2, 2, False), (2, 4, True),
])
def test_callback_schedule(every: int, epoch: int, runs: bool) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    trainer = SimpleNamespace(sanity_checking=False, fast_dev_run=False, current_epoch=epoch, max_epochs=5,
                              state=SimpleNamespace(fn=TrainerFn.FITTING))
    assert ConversionCallback(every_n_epochs=every)._should_run(trainer) is runs
    trainer.sanity_checking = True
    assert ConversionCallback(every_n_epochs=every)._should_run(trainer) is False


def test_vit_training_config_measures_ecmt_as_convert_py_does(tmp_path: Path) -> None:
    """A training config with an ECMT ConversionCallback (class_path, as configs/convert/) trains the
    digits ViT for a few steps; its figures on the test set equal convert.py's on the checkpoint."""
    ecmt = {"class_path": "csdlab.convert.ecmt.ECMTConverter", "init_args": {"T": 3, "levels": 8}}
    config = {
        "seed_everything": 0,
        "model": {"model_name": "vit_tiny_patch16_224", "model_kwargs": DIGITS_VIT, "lr": 2e-3},
        "data": {"dataset": "digits", "batch_size": 64},
        "trainer": {"max_epochs": 1, "limit_train_batches": 4, "limit_val_batches": 2, "logger": False,
                    "accelerator": "cpu", "default_root_dir": str(tmp_path), "enable_model_summary": False,
                    "callbacks": [{"class_path": "csdlab.callbacks.ConversionCallback",
                                   "init_args": {"converter": ecmt, "calib_batches": 2}}]},
        "checkpoint": {"dirpath": str(tmp_path / "ckpt")},
        "progress_bar": {"refresh_rate": 0},
    }
    path = tmp_path / "vit_ecmt.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = train_main(["fit", "--config", str(path)])
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ConversionCallback))
    trained = callback.last_results  # the test run on the best checkpoint, after fit
    assert trained["samples"] == 359 and "snn/T3/top1_t3" in trained
    assert float(cli.trainer.callback_metrics["conversion/test/snn/T3/agreement"]) == trained["snn/T3/agreement"]

    converted = make_convert_cli([
        "test", "--model.converter", "ECMTConverter", "--model.converter.T", "3", "--model.converter.levels", "8",
        "--model.checkpoint", str(tmp_path / "ckpt" / "best.ckpt"), "--data.batch_size", "64",
        "--data.calib_batches", "2", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--progress_bar.refresh_rate", "0", "--report.out_dir", str(tmp_path / "convert")]).model.results
    torch.testing.assert_close(converted["calibration"], callback.calibration, rtol=1e-6, atol=1e-9)
    assert converted["figures"].keys() == trained.keys()
    for k, v in converted["figures"].items():
        assert trained[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
