"""``benchmarks/pin_spread.py``: one ``convert.py test`` command in fresh processes under several
instruction sets and thread counts, and the spread of its figures (how the slow tests' tolerances
are measured). Runs ECMT on the digits ViT under two conditions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import pin_spread  # noqa: E402


def test_conditions_are_checked() -> None:
    assert [c[0] for c in pin_spread.conditions(["native/2"])] == ["native/2"]
    env = dict(pin_spread.conditions(["default/1"])[0][1]) if "sse4_2" in pin_spread.cpu_flags() else None
    if env is not None:
        assert env["ATEN_CPU_CAPABILITY"] == "default" and env["OMP_NUM_THREADS"] == "1"
    for bad in ("avx9/1", "native/0", "native"):
        with pytest.raises(ValueError, match="bad condition"):
            pin_spread.conditions([bad])
    runs = {"a": {"k": 0.5}, "b": {"k": 0.49}, "c": {"k": 0.52}}
    assert pin_spread.spread(runs, ["k"])["k"] == pytest.approx(0.02)


def test_spread_of_an_ecmt_run_on_the_digits_vit(digits_vit: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "ecmt.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"converter": {"class_path": "csdlab.convert.ecmt.ECMTConverter",
                                                           "init_args": {"T": 4, "levels": 8}},
                                             "checkpoint": str(digits_vit)},
                                   "data": {"dataset": "digits", "batch_size": 64, "calib_batches": 2,
                                            "limit": 128, "data_dir": str(tmp_path / "data")},
                                   "trainer": {"accelerator": "cpu", "devices": 1}}))
    out = tmp_path / "spread.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pin_spread.py"), "--keys", "snn/T4/top1",
                          "snn/T4/agreement", "--conditions", "native/1", "default/2", "--json", str(out), "--",
                          "--config", str(cfg)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert list(doc["runs"]) == ["native/1", "default/2"]
    for r in doc["runs"].values():  # fractions (the fixture's ViT is barely trained: agreement is the figure)
        assert 0 <= r["snn/T4/top1"] <= 1 and 0.5 < r["snn/T4/agreement"] <= 1
    # other kernels move at most a few of the 128 images
    assert max(doc["spread"].values()) <= 3 / 128
    assert "largest deviation" in run.stdout
