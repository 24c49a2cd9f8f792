"""Training curves: stages joined with continuous epochs, a CSV and a PNG written."""

import csv

import pytest

from csdlab.lit.curves import join_stages, plot_training


def _log(path, epochs, val):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "train/lr", "val/top1"])
        for e in range(epochs):
            w.writerow([e, 10 * e + 5, 1.0 / (e + 1), 1e-3, ""])
            w.writerow([e, 10 * e + 9, "", "", val + e / 100])
    return path


def test_stages_continue_and_plot(tmp_path):
    rows = join_stages([_log(tmp_path / "a.csv", 3, 0.80), _log(tmp_path / "b.csv", 2, 0.85)])
    vals = [(int(r["epoch"]), r["stage"], r["val/top1"]) for r in rows if r["val/top1"]]
    assert [v[:2] for v in vals] == [(0, "1"), (1, "1"), (2, "1"), (3, "2"), (4, "2")]
    assert [float(v[2]) for v in vals] == pytest.approx([0.80, 0.81, 0.82, 0.85, 0.86])
    csv_path, png = plot_training(rows, tmp_path / "out" / "curve")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with open(csv_path, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows) == 10


def test_a_file_that_is_not_a_lightning_log_is_named(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="x.csv is not a Lightning CSV log"):
        join_stages([tmp_path / "x.csv"])
