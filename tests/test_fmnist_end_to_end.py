"""The headline figures on the full Fashion-MNIST test set (10,000 images), from the trained assets.

Slow (minutes on 2 CPU cores): `pytest -m slow`. Skipped where Debian's dataset-fashion-mnist is absent.
"""

from pathlib import Path

import pytest

from csdlab.lit.data import DEBIAN_FMNIST

ASSETS = Path(__file__).resolve().parents[1] / "assets"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")]


def test_csdformer_snn_reproduces_the_qann_and_improves_with_delay(tmp_path):
    from csdlab.commands.csdformer import csdformer

    r = csdformer(str(ASSETS / "fmnist_csdformer_tiny_qat.ckpt"), delay=3, delays=[0, 1, 2, 3], data="fashion_mnist",
                  data_dir=str(tmp_path / "data"), accelerator="cpu", out_dir=str(tmp_path / "out"))
    assert r["qann/top1"] >= 0.88
    assert r["snn/agreement_D3"] == 1.0  # every one of the 10,000 predictions equals the QANN's
    assert r["snn/top1_D3"] == r["qann/top1"]
    accs = [r[f"snn/top1_D{d}"] for d in range(4)]
    assert accs == sorted(accs) and accs[3] - accs[0] > 0.2  # rises with D (paper Table 4)
    assert r["spike_driven"] == 1.0
    assert 0 < r["energy/ratio_D3"] < 1


def test_ecmt_vit_within_one_point_at_t8(tmp_path):
    from csdlab.commands.ecmt import ecmt

    r = ecmt(checkpoint=str(ASSETS / "fmnist_vit_tiny.ckpt"), data="fashion_mnist", data_dir=str(tmp_path / "data"),
             T=10, levels=8, percentile=99.0, batch_size=250, accelerator="cpu", out_dir=str(tmp_path / "out"))
    assert r["ann_acc"] >= 0.85
    assert r["ann_acc"] - r["snn_acc"][7] <= 0.01  # T = 8
    err = r["logit_error"]
    assert all(b <= a for a, b in zip(err, err[1:]))  # logit error falls as T grows
    assert err[-1] < 0.1 * err[0]
