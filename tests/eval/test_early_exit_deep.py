"""The deep testbed's low-latency figures through convert.py (ECMT, the default options): the
readout at t = 4 and per-image early exit, pinned on the first 2,000 test images at T = 8 with the
early-exit setting calibrated on 2,000 held-out training images (a cheaper twin of the README's
whole-test-set T = 16 run, which calibrates on 5,000).

Slow: ``pytest -m slow``. Skipped where Debian's dataset-fashion-mnist is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from csdlab.cli import make_convert_cli
from csdlab.lit.data import DEBIAN_FMNIST
from tests.checkpoints import REPO

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")]

#: measured with this test's command on assets/fmnist_vit_deep.ckpt (ANN 91.10 % on these images)
MEASURED = {"snn/T8/top1_t4": 0.9105, "exit/T8/top1": 0.9060, "exit/T8/mean_steps": 1.482,
            "exit/T8/energy_ratio": 0.2856}
#: how far the figures move across CPUs, measured with benchmarks/pin_spread.py (this test's command in
#: fresh processes, kernels restricted to each instruction set, 1 or 2 threads; AMD EPYC):
#:   native (avx512) 1 and 2 threads: 0.9105 / 0.9060 / 1.482 / 0.2856 (identical)
#:   avx2, 1 thread:                  0.9110 / 0.9070 / 1.693 / 0.3283
#:   default (sse4.2), 1 thread:      0.9120 / 0.9070 / 1.679 / 0.3254
#: largest deviation 0.0015 / 0.0010 / 0.21 / 0.043: another summation order moves a few images at a
#: level boundary and, with them, the calibrated exit threshold (steps and energy move most).
#: Tolerances: the measured spread plus about half again.
TOL = {"snn/T8/top1_t4": 0.0025, "exit/T8/top1": 0.0025, "exit/T8/mean_steps": 0.32, "exit/T8/energy_ratio": 0.065}


def test_ecmt_deep_t4_and_early_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the config names assets/ relative to the repository root
    cli = make_convert_cli(["test", "--config", str(REPO / "configs" / "convert" / "fmnist_vit_deep_ecmt.yaml"),
                            "--model.converter.T", "8", "--model.early_exit", "auto", "--data.limit", "2000",
                            "--data.exit_images", "2000", "--data.data_dir", str(tmp_path / "data"),
                            "--report.out_dir", str(tmp_path / "out"), "--trainer.default_root_dir", str(tmp_path),
                            "--trainer.accelerator", "cpu", "--progress_bar.refresh_rate", "0",
                            "--trainer.logger", "false"])
    r = cli.model.results
    f = r["figures"]
    assert f["samples"] == 2000
    assert r["early_exit"]["T8"]["calibration"]["images"] == [2000.0]  # held-out training images
    # the targets: t = 4 within 3 points; early exit within 0.5 points at <= 4 steps, which the
    # README's whole-test run meets. On these 2,000 images exit sits on the boundary (10 images = 0.5
    # points lost), so its accuracy is held by the pin below rather than by the 0.5 line.
    assert f["ref/top1"] - f["snn/T8/top1_t4"] <= 0.03
    assert f["exit/T8/mean_steps"] <= 4.0
    # cheaper than the fixed-t readout that first comes within 0.5 points
    fixed = next(t for t in range(1, 9) if f["ref/top1"] - f[f"snn/T8/top1_t{t}"] <= 0.005)
    assert f["exit/T8/mean_steps"] <= fixed and f["exit/T8/energy_ratio"] <= f[f"energy/T8/ratio_t{fixed}"] + 1e-9
    for key, value in MEASURED.items():
        assert f[key] == pytest.approx(value, abs=TOL[key]), key
