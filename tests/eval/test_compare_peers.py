"""``convert.py compare`` on the Fashion-MNIST ViT: SpikingJelly's STA recipe at the payloads it uses
(T = 1, 2, 4), csdlab's ECMT burst neurons at T = 1, on the first 500 test images, the same
calibration. Pins the claim of the README's comparison: every STA row is met by a csdlab row at
least as accurate, with no more payload bits, no more energy under either counting rule, and a
shorter simulation (each row's own side-by-side ratio).

Slow: ``pytest -m slow``. Skipped where Debian's dataset-fashion-mnist is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from csdlab.eval.compare import compare
from csdlab.lit.data import DEBIAN_FMNIST
from tests.checkpoints import REPO

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")]

CONVERT = REPO / "configs" / "convert"
BURSTS = [f"{CONVERT / 'fmnist_vit_ecmt_burst.yaml'}:burst=4;percentile=99",
          f"{CONVERT / 'fmnist_vit_ecmt_burst.yaml'}:burst=8;percentile=99.9",
          f"{CONVERT / 'fmnist_vit_ecmt_burst.yaml'}:burst=16;percentile=99.9"]
#: top-1 on these 500 images (ANN 89.00 %), measured with this test's calls. Spread measured by running
#: this test with torch / MKL / oneDNN restricted to avx512 (1 thread), avx2 (2 threads) and sse4.2
#: (1 thread), the conditions of benchmarks/pin_spread.py: every top-1 and energy identical. TOL
#: allows 3 images for CPUs unlike these (the deep twin moved by 3 at a level boundary).
MEASURED = {("fmnist_vit_sta", 1): 0.848, ("fmnist_vit_sta", 2): 0.870, ("fmnist_vit_sta", 4): 0.882,
            ("fmnist_vit_ecmt_burst [burst=4,percentile=99]", 1): 0.848,
            ("fmnist_vit_ecmt_burst [burst=8,percentile=99.9]", 1): 0.884,
            ("fmnist_vit_ecmt_burst [burst=16,percentile=99.9]", 1): 0.892}
TOL = 0.006  # 3 images


def test_every_sta_row_is_met_by_a_csdlab_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the configs name assets/ relative to the repository root
    common = {"checkpoint": str(REPO / "assets" / "fmnist_vit_tiny.ckpt"), "limit": 500, "accelerator": "cpu",
              "timing_repeats": 7}  # medians of 7: one row's timing must survive a load spike on a shared CPU
    compare([str(CONVERT / "fmnist_vit_sta.yaml")], Ts=[1, 2, 4], out_dir=str(tmp_path / "sta"), **common)
    out = compare(BURSTS, Ts=[1], out_dir=str(tmp_path / "all"), include=[str(tmp_path / "sta" / "comparison.json")],
                  **common)
    assert out["ann"]["samples"] == 500 and out["ann"]["top1"] == pytest.approx(0.89, abs=1e-6)
    rows = {(r["method"], r["T"]): r for r in out["rows"]}
    assert {k[0] for k in rows if rows[k]["origin"] == "spikingjelly"} == {"fmnist_vit_sta"}
    for key, value in MEASURED.items():
        assert rows[key]["top1"] == pytest.approx(value, abs=TOL), key
    # STA sends bursts: more than one unit spike per event, more bits as T grows (thresholds / T)
    sta_bits = [rows[("fmnist_vit_sta", t)]["payload_bits"] for t in (1, 2, 4)]
    assert sta_bits == sorted(sta_bits) and sta_bits[0] >= 5
    # the claim, row by row (the comparison states it the same way)
    assert len(out["answers"]) == 3
    for a in out["answers"]:
        assert a["met_by"] is not None, f"STA T = {a['peer']['T']} is not met by any csdlab row"
        assert a["met_by"]["method"].startswith("fmnist_vit_ecmt_burst")
    assert "not met" not in (tmp_path / "all" / "comparison.md").read_text()
