"""Small train.py-style checkpoints on the embedded digits data (seconds to build); the session
fixtures ``digits_qann`` / ``digits_vit`` are registered in ``tests/conftest.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from csdlab.lit.data import ImageDataModule
from csdlab.lit.module import ClassificationModule

REPO = Path(__file__).resolve().parents[1]
DIGITS_CSDFORMER = {"num_classes": 10, "img_size": 16, "in_chans": 1, "pool_stages": [2, 3], "embed_dim": 32,
                    "act": "lsq", "levels": 4}
DIGITS_VIT = {"num_classes": 10, "img_size": 16, "in_chans": 1, "patch_size": 4, "embed_dim": 32, "depth": 2,
              "num_heads": 2}


def make_checkpoint(path: Path, model_name: str, kwargs: dict, steps: int = 30) -> Path:
    """A checkpoint as train.py writes it, of a model trained for a few Adam steps on digits
    (enough for non-trivial activations: LSQ steps, BN statistics, a better-than-chance head)."""
    torch.manual_seed(0)
    module = ClassificationModule(model_name, kwargs)
    dm = ImageDataModule("digits", batch_size=64)
    dm.setup()
    module.model.train()
    opt = torch.optim.Adam(module.model.parameters(), lr=3e-3)
    batches = iter(dm.train_dataloader())
    for _ in range(steps):
        x, y = next(batches, None) or next(iter(dm.train_dataloader()))
        loss = torch.nn.functional.cross_entropy(module.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.model.eval()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": {"dataset": "digits", "img_size": None, "seed": 0,
                                                "val_fraction": 0.1}}, path)
    return path


@pytest.fixture(scope="session")
def digits_qann(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "qann.ckpt", "csdformer_tiny", DIGITS_CSDFORMER)


@pytest.fixture(scope="session")
def digits_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "vit.ckpt", "vit_tiny_patch16_224", DIGITS_VIT)
