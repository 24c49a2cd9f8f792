"""MBE on the Fashion-MNIST ViT (``assets/fmnist_vit_tiny.ckpt``, ANN 87.08 %), whole test set (slow).

Measured (docs/mbe.md): T=8 86.99 %, T=10 86.95 %, T=12 86.98 %, T=16 87.06 % (N=8, GELU N=4),
identity ranges calibrated on 1,024 training images. About 4 minutes per T on 1 CPU thread.
"""

import itertools
from pathlib import Path

import pytest
import torch

from csdlab.convert.mbe import MBEConverter
from csdlab.lit.data import ImageDataModule
from csdlab.lit.module import load_classifier

ASSET = Path(__file__).resolve().parents[2] / "assets" / "fmnist_vit_tiny.ckpt"
ANN_TOP1 = 0.8708


@torch.no_grad()
def top1(T: int, data_dir: str) -> tuple[float, float]:
    """(ANN, MBE SNN at T) top-1 on the 10,000 test images; calibration on training images."""
    model, _ = load_classifier(ASSET)
    model.eval()
    dm = ImageDataModule("fashion_mnist", data_dir, batch_size=256, augment=False)
    conv = MBEConverter(Ts=[T])
    conv.check(model)
    conv.calibrate(model, (x for x, _ in itertools.islice(dm.calibration_dataloader(), 4)), lambda t: t)
    snn = conv.convert(model)[f"T{T}"]
    ann = hit = n = 0
    for x, y in dm.test_dataloader():
        ann += int((model(x).argmax(-1) == y).sum())
        hit += int((snn(x)[-1].argmax(-1) == y).sum())
        n += len(y)
    assert n == 10_000
    return ann / n, hit / n


@pytest.mark.slow
@pytest.mark.parametrize(("T", "points"), [(16, 0.5), (12, 1.0), (8, 3.0)])
def test_mbe_vit_fmnist_within(T, points, tmp_path):
    ann, snn = top1(T, str(tmp_path / "data"))
    assert abs(ann - ANN_TOP1) < 1e-4
    assert snn >= ann - points / 100, (T, snn)
