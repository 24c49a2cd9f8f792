"""ConversionCallback during fit / test: the evaluation path's figures logged under conversion/."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from csdlab.callbacks.conversion import ConversionCallback
from csdlab.lit.data import ImageDataModule
from csdlab.lit.module import ClassificationModule

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
    callback = ConversionCallback(delays=[0, 3])
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
    with pytest.raises(ValueError, match="delays must be integers >= 0"):
        ConversionCallback(delays=[-1])
    with pytest.raises(ValueError, match="non-empty"):
        ConversionCallback(delays=[])


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
