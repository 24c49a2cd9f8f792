"""ConversionCallback during fit / test, and convert.py csdformer in 1 vs 2 DDP processes (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from csdlab.callbacks.conversion import ConversionCallback
from csdlab.convert.csdformer import load_snn
from csdlab.lit.data import ImageDataModule
from csdlab.lit.module import ClassificationModule

REPO = Path(__file__).resolve().parents[1]
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
    assert float(m["conversion/val/snn/agreement_D3"]) == 1.0
    assert float(m["conversion/val/snn/max_logit_diff_D3"]) < 1e-4
    assert float(m["conversion/val/snn/top1_D3"]) == pytest.approx(float(m["conversion/val/qann/top1"]))
    assert float(m["conversion/val/snn/max_logit_diff_D0"]) > 1e-3
    assert 0 < float(m["conversion/val/snn/firing_rate_D3"]) < 1
    assert 0 < float(m["conversion/val/energy/ratio_D3"]) < 2
    assert any(k.startswith("conversion/val/snn/firing_rate_D3/blocks.0.attn.act_q") for k in m)
    plots = sorted(p.name for p in (tmp_path / "conversion").glob("*.png"))
    assert plots == ["val_epoch0_acc_vs_delay.png", "val_epoch0_acc_vs_time.png", "val_epoch0_firing_rate.png"]
    trainer.test(module, dm)
    assert float(trainer.callback_metrics["conversion/test/snn/agreement_D3"]) == 1.0


def test_callback_rejects_float_model(tmp_path: Path) -> None:
    module = ClassificationModule("csdformer_tiny", {**DIGITS_MODEL, "act": "relu"})
    with pytest.raises(ValueError, match="float CSDformer"):
        _trainer(tmp_path, ConversionCallback()).validate(module, ImageDataModule("digits", batch_size=32))
    with pytest.raises(ValueError, match="delays"):
        ConversionCallback(delays=[-1])


def _checkpoint(tmp_path: Path, model_name: str = "csdformer_tiny", kwargs: dict | None = None) -> Path:
    """A train.py-style checkpoint of a freshly initialised model (LSQ steps from one batch)."""
    torch.manual_seed(0)
    module = ClassificationModule(model_name, kwargs or DIGITS_MODEL)
    if kwargs is None:
        dm = ImageDataModule("digits", batch_size=64)
        dm.setup()
        module.model.train()
        with torch.no_grad():
            module.model(next(iter(dm.train_dataloader()))[0])  # LSQ init + BN statistics
    path = tmp_path / f"{model_name}.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": {"dataset": "digits", "img_size": None, "seed": 0,
                                                "val_fraction": 0.1}}, path)
    return path


def test_command_rejects_other_checkpoints(tmp_path: Path) -> None:
    from csdlab.commands.csdformer import csdformer

    ckpt = _checkpoint(tmp_path, "vit_tiny_patch16_224", {"img_size": 32, "num_classes": 10, "in_chans": 1})
    with pytest.raises(ValueError, match="needs a quantized CSDformer"):
        csdformer(str(ckpt), accelerator="cpu")
    with pytest.raises(ValueError, match="float CSDformer"):
        csdformer(str(_checkpoint(tmp_path, kwargs={**DIGITS_MODEL, "act": "relu"})), accelerator="cpu")


RUN = """
import json, sys
from csdlab.commands.csdformer import csdformer
r = csdformer(sys.argv[1], delays=[0, 3], delay=3, batch_size=64, accelerator="cpu", devices=int(sys.argv[2]),
              strategy="ddp" if sys.argv[2] == "2" else "auto", out_dir=sys.argv[3])
open(sys.argv[3] + "/rank_result.json", "w").write(json.dumps(r))
"""


def _run(tmp_path: Path, ckpt: Path, devices: int) -> dict:
    script = tmp_path / "run_convert.py"  # DDP re-launches this script for rank 1
    script.write_text(RUN)
    out = tmp_path / f"out{devices}"
    out.mkdir()
    env = {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(script), str(ckpt), str(devices), str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "figures.json").read_text())


def test_command_ddp_two_processes_match_one(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    one, two = _run(tmp_path, ckpt, 1), _run(tmp_path, ckpt, 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    f1, f2 = one["figures"], two["figures"]
    assert f1.keys() == f2.keys()
    for k in f1:
        assert f2[k] == pytest.approx(f1[k], rel=1e-5, abs=1e-6), k
    assert f1["snn/agreement_D3"] == 1.0
    # the saved SNN loads and runs
    snn = load_snn(one["snn_state"])
    assert snn(torch.rand(2, 1, 16, 16)).shape == (2, 10)


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
