"""Per-image early exit on the deep testbed (12 blocks), the whole Fashion-MNIST test set, through
convert.py: the issue's target (within 0.5 points of the ANN at a mean of <= 4 steps per image)
and the README figure.

Slow (5,000 calibration and 10,000 test images at T = 16: 59 min here with the 2 cores shared, load ~11):
``pytest -m slow``. Skipped where Debian's dataset-fashion-mnist is absent.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from csdlab.cli import make_convert_cli
from csdlab.lit.data import DEBIAN_FMNIST
from tests.checkpoints import REPO

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")]

DEEP = REPO / "assets" / "fmnist_vit_deep.ckpt"
#: the figures measured on the stage-1 deep checkpoint (sha256 prefix), whole test set; a new
#: checkpoint keeps the target assertions and needs its own figures here
MEASURED = {"1a4cab88c574": {"top1": 0.8890, "mean_steps": 3.316, "energy_ratio": 0.2530}}
#: two standard deviations of the test figures over 10 other draws of the 5,000 calibration images
#: from the 6,000 held-out ones (top-1 88.82-89.08 %, 3.14-3.89 steps, energy 0.238-0.303;
#: docs/early_exit.md): a drift in the calibration larger than a different sample of images moves
#: it beyond these; the run itself repeats to the image
TOL = {"top1": 0.002, "mean_steps": 0.5, "energy_ratio": 0.045}


def test_ecmt_deep_early_exit_within_half_a_point_at_four_steps(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the config names assets/ relative to the repository root
    cli = make_convert_cli(["test", "--config", str(REPO / "configs" / "convert" / "fmnist_vit_deep_ecmt.yaml"),
                            "--model.early_exit", "auto", "--data.data_dir", str(tmp_path / "data"),
                            "--report.out_dir", str(tmp_path / "out"), "--trainer.default_root_dir", str(tmp_path),
                            "--trainer.accelerator", "cpu", "--progress_bar.refresh_rate", "0",
                            "--trainer.logger", "false"])
    r = cli.model.results
    f = r["figures"]
    assert f["samples"] == 10_000
    assert r["early_exit"]["T16"]["calibration"]["images"] == [5000.0]  # held-out training images
    # the target
    assert f["ref/top1"] - f["exit/T16/top1"] <= 0.005
    assert f["exit/T16/mean_steps"] <= 4.0
    # cheaper than the fixed-T readout that first comes within 0.5 points
    fixed = next(t for t in range(1, 17) if f["ref/top1"] - f[f"snn/T16/top1_t{t}"] <= 0.005)
    assert f["exit/T16/mean_steps"] < fixed and f["exit/T16/energy_ratio"] < f[f"energy/T16/ratio_t{fixed}"]
    sha = hashlib.sha256(DEEP.read_bytes()).hexdigest()[:12]
    if sha in MEASURED:
        for key, value in MEASURED[sha].items():
            assert f[f"exit/T16/{key}"] == pytest.approx(value, abs=TOL[key]), key
