"""One Ctrl-C during a test that runs Lightning stops the session (tests/interrupt.py)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SESSION = '''
import lightning as L
import torch


class Interrupted(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        raise KeyboardInterrupt  # what a Ctrl-C raises in the main thread

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1))


def test_a_run_interrupted_by_ctrl_c():
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(Interrupted())


def test_after_it():
    open("AFTER_RAN", "w").close()
'''


def test_ctrl_c_in_a_lightning_run_ends_the_session(tmp_path):
    (tmp_path / "test_session.py").write_text(SESSION)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.interrupt", "-p", "no:cacheprovider",
                        "test_session.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "interrupted (Ctrl-C) during test_session.py::test_a_run_interrupted_by_ctrl_c" in out
    assert not (tmp_path / "AFTER_RAN").exists(), "the session went on after Ctrl-C"
