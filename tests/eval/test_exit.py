"""Per-image early exit on hand-built readouts whose exit steps are known in advance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from csdlab.eval.exit import EXIT_RULES, EarlyExit, ExitGrid, exit_indices, exit_scores
from csdlab.eval.metrics import ConversionMetrics
from tests.eval.test_metrics import _Reference, _Snn


def _one_hot_readout(classes: list[list[int]], scale: list[list[float]] | None = None) -> torch.Tensor:
    """``[R, B, 3]`` readout whose argmax at row r, image b is ``classes[b][r]`` with margin
    ``scale[b][r]`` (default 1)."""
    rows, images = len(classes[0]), len(classes)
    out = torch.zeros(rows, images, 3)
    for b in range(images):
        for r in range(rows):
            out[r, b, classes[b][r]] = 1.0 if scale is None else scale[b][r]
    return out


def test_stable_score_is_the_run_length_of_the_argmax() -> None:
    readout = _one_hot_readout([[0, 1, 1, 1, 2], [2, 2, 2, 2, 2]])
    assert exit_scores(readout, "stable").T.tolist() == [[1, 1, 2, 3, 1], [1, 2, 3, 4, 5]]
    # stable for k steps: image 0 first reaches k = 2 at row 2, k = 3 at row 3, never k = 4
    idx = exit_indices(exit_scores(readout, "stable"), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert idx.tolist() == [[0, 0], [2, 1], [3, 2], [4, 3], [4, 4]]


def test_margin_and_confidence_scores() -> None:
    readout = torch.tensor([[[3.0, 1.0, 0.5]], [[0.0, 2.0, 1.5]]])  # [R=2, B=1, K=3]
    assert exit_scores(readout, "margin")[:, 0].tolist() == pytest.approx([2.0, 0.5])
    p = torch.tensor([3.0, 1.0, 0.5]).softmax(0).max()
    assert exit_scores(readout, "confidence")[0, 0] == pytest.approx(float(p))
    # margin 2 at row 0: exits there for a threshold <= 2; above it, no row passes: the last row
    assert exit_indices(exit_scores(readout, "margin"), torch.tensor([0.5, 2.0, 2.1])).tolist() == [[0], [0], [1]]


def test_bad_rule_and_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="early_exit must be one of"):
        EarlyExit("fastest")
    with pytest.raises(ValueError, match="accuracy fraction"):
        EarlyExit(tolerance=0.5 * 100)
    with pytest.raises(ValueError, match="exit rule must be one of"):
        exit_scores(torch.zeros(2, 1, 3), "entropy")
    with pytest.raises(ValueError, match=r"\[readout steps, images, classes\]"):
        exit_scores(torch.zeros(2, 3), "margin")


def test_calibration_picks_the_least_steps_within_tolerance() -> None:
    # 4 calibration images, 4 readout steps, true class 0 for all; the reference is right on all.
    # Images 0, 1 are right from t = 1 (margin 2); image 2 turns right at t = 2 (margins 1 then 2);
    # image 3 is wrong until t = 4 (margin 0.5 at t = 1..3, right with margin 2 at t = 4).
    classes = [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [2, 2, 2, 0]]
    scale = [[2, 2, 2, 2], [2, 2, 2, 2], [1, 2, 2, 2], [0.5, 0.5, 0.5, 2]]
    readout = _one_hot_readout(classes, scale)
    ref = torch.zeros(4, 3)
    ref[:, 0] = 1.0
    y = torch.zeros(4, dtype=torch.long)
    steps = [1, 2, 3, 4]
    # stable rule at tolerance 0: k must let image 3 run to t = 4; k = 4 does (it is never stable
    # for 4 steps before), exits are t = 4, 4, 4, 4: 4 steps. No fewer-step stable setting is exact.
    grid = EarlyExit("stable", tolerance=0.0).calibrate([readout], [ref], [y], steps)
    assert grid.rules[grid.chosen] == "stable" and grid.thresholds[grid.chosen] == 4.0
    assert grid.calibration["mean_steps"][grid.chosen] == 4.0 and grid.calibration["top1"][grid.chosen] == 1.0
    # margin rule: a threshold in (1, 2] exits images 0, 1 at t = 1, image 2 at t = 2, image 3 at
    # t = 4: (1 + 1 + 2 + 4) / 4 = 2 steps, all right
    grid = EarlyExit("margin", tolerance=0.0).calibrate([readout], [ref], [y], steps)
    assert grid.calibration["mean_steps"][grid.chosen] == 2.0 and grid.calibration["top1"][grid.chosen] == 1.0
    assert 1.0 < grid.thresholds[grid.chosen] <= 2.0
    # a tolerance of one image in four: all at t = 1 loses images 2 and 3 (too many); a margin
    # threshold in (0.5, 1] loses only image 2 (exits t = 1, 1, 1, 4): 1.75 steps, 3 of 4 right
    grid = EarlyExit("auto", tolerance=0.25).calibrate([readout], [ref], [y], steps)
    assert grid.calibration["mean_steps"][grid.chosen] == 1.75 and grid.calibration["top1"][grid.chosen] == 0.75
    # calibration in two batches gives the same choice
    two = EarlyExit("margin", tolerance=0.0).calibrate([readout[:, :2], readout[:, 2:]], [ref[:2], ref[2:]],
                                                       [y[:2], y[2:]], steps)
    assert two.calibration["mean_steps"][two.chosen] == 2.0


def test_metrics_with_exit_on_a_hand_built_network() -> None:
    # _Snn: step 1 a fixed guess (class 2), step 2 the reference's logits; 6 ACs per step in all
    x = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    y = torch.tensor([0, 1, 2, 2])
    snn = _Snn()
    # stable k = 1: everyone exits at t = 1; k = 2: the guess and the reference agree only on
    # image 3 (class 2 at both steps), so image 3 exits at t = 2 and the rest run to t = 2 anyway
    grid = ExitGrid(["stable", "stable"], [1.0, 2.0], chosen=0)
    m = ConversionMetrics(3, {"T2": snn}, exits={"T2": grid})
    m.update(x[:2], y[:2], _Reference(), {"T2": snn})
    m.update(x[2:], y[2:], _Reference(), {"T2": snn})
    f = m.compute()
    assert f["exit/T2/top1"] == pytest.approx(f["snn/T2/top1_t1"]) == pytest.approx(0.5)
    assert f["exit/T2/mean_steps"] == 1.0 and f["exit/T2/steps_t1"] == 1.0 and f["exit/T2/steps_t2"] == 0.0
    assert f["exit/T2/agreement"] == pytest.approx(0.25)  # the guess agrees with the reference on image 3
    # energy: batch 1 spends 4 ACs at step 1 (2 images, 2 + 2 events), batch 2 spends 2: 6 ACs for
    # 4 images at t = 1 against 36 ANN MACs
    assert f["exit/T2/energy_ratio"] == pytest.approx(f["energy/T2/ratio_t1"]) == pytest.approx(6 * 0.9 / (36 * 4.6))
    assert f["exit/T2/stable/threshold_s1"] == 2.0 and f["exit/T2/stable/mean_steps_s1"] == 2.0
    assert f["exit/T2/stable/top1_s1"] == pytest.approx(0.75)
    assert f["exit/T2/stable/energy_ratio_s1"] == pytest.approx(f["energy/T2/ratio"])


class _Twice(_Snn):
    """The reference's logits at both steps (ops as :class:`_Snn`: the non-zero pixels, per step)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        super().forward(images)
        return torch.stack([images, images])


def test_exit_energy_charges_each_image_its_own_steps() -> None:
    # one batch of two images with 1 and 3 non-zero pixels: 4 ACs per step for the batch, 2 per
    # image on average. Margin >= 3: image 0 (margin 5) exits at t = 1, image 1 (margin 2) at t = 2:
    # charged 2 + (2 + 2) = 6 ACs, against 8 for both steps of both images
    x = torch.tensor([[0.0, 0.0, 5.0], [3.0, 1.0, 1.0]])
    y = torch.tensor([2, 0])
    snn = _Twice()
    m = ConversionMetrics(3, {"T2": snn}, exits={"T2": ExitGrid(["margin"], [3.0], chosen=0)})
    m.update(x, y, _Reference(), {"T2": snn})
    f = m.compute()
    assert f["exit/T2/mean_steps"] == 1.5 and f["exit/T2/steps_t1"] == f["exit/T2/steps_t2"] == 0.5
    assert f["exit/T2/top1"] == 1.0
    assert f["energy/T2/ratio"] == pytest.approx(8 * 0.9 / (2 * 9 * 4.6))
    assert f["exit/T2/energy_ratio"] == pytest.approx(6 * 0.9 / (2 * 9 * 4.6))


def test_exit_for_an_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown variants"):
        ConversionMetrics(3, {"T2": _Snn()}, exits={"T8": ExitGrid(["stable"], [1.0], chosen=0)})


# -- through convert.py ---------------------------------------------------------------------------
def _convert(ckpt: Path, out: Path, converter: str, *extra: str) -> Any:
    from csdlab.cli import make_convert_cli

    return make_convert_cli(["test", "--model.converter", converter, "--model.checkpoint", str(ckpt),
                             "--data.batch_size", "64", "--data.limit", "64", "--data.data_dir", str(out / "data"),
                             "--data.calib_batches", "1", "--trainer.accelerator", "cpu",
                             "--progress_bar.refresh_rate", "0", "--report.out_dir", str(out),
                             "--trainer.default_root_dir", str(out), *extra])


def test_ecmt_early_exit_through_convert(digits_vit: Path, tmp_path: Path) -> None:
    cli = _convert(digits_vit, tmp_path, "ECMTConverter", "--model.converter.T", "4", "--model.early_exit", "auto",
                   "--model.exit_tolerance", "0.01", "--data.exit_images", "128")
    r = cli.model.results
    f, g = r["figures"], r["early_exit"]["T4"]
    assert g["calibration"]["images"] == [128.0]
    assert 1.0 <= f["exit/T4/mean_steps"] <= 4.0
    assert sum(f[f"exit/T4/steps_t{t}"] for t in range(1, 5)) == pytest.approx(1.0)
    assert f["exit/T4/mean_steps"] == pytest.approx(sum(t * f[f"exit/T4/steps_t{t}"] for t in range(1, 5)))
    # the curve ends at the fixed-T readout: stable for k = T steps runs every image to the end
    assert f["exit/T4/stable/mean_steps_s3"] == 4.0 and f["exit/T4/stable/top1_s3"] == f["snn/T4/top1"]
    assert f["exit/T4/stable/energy_ratio_s3"] == pytest.approx(f["energy/T4/ratio"])
    assert f["exit/T4/stable/mean_steps_s0"] == 1.0 and f["exit/T4/stable/top1_s0"] == f["snn/T4/top1_t1"]
    written = json.loads((tmp_path / "figures.json").read_text())
    assert "early_exit" in written["tables"] and written["early_exit"]["T4"]["chosen_rule"] in EXIT_RULES
    assert {"exit_accuracy_vs_steps_T4.png", "exit_accuracy_vs_energy_T4.png", "exit_steps_T4.png"} <= {
        p.name for p in tmp_path.glob("*.png")}


def test_early_exit_needs_a_per_step_readout(digits_vit: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="read out only after their last step: drop --model.early_exit"):
        _convert(digits_vit, tmp_path, "MBEConverter", "--model.converter.Ts", "[2]", "--model.early_exit", "auto")


def test_exit_images_never_come_from_the_scored_split(digits_vit: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--data.exit_split train"):
        _convert(digits_vit, tmp_path, "ECMTConverter", "--data.split", "val", "--model.early_exit", "auto")


def test_csdformer_early_exit_through_convert(digits_qann: Path, tmp_path: Path) -> None:
    cli = _convert(digits_qann, tmp_path, "csdlab.convert.csdformer.CSDformerConverter",
                   "--model.converter.delays", "[0, 3]", "--model.early_exit", "stable", "--data.exit_images", "64")
    r = cli.model.results
    f = r["figures"]
    assert set(r["early_exit"]) == {"D0", "D3"} and r["early_exit"]["D3"]["chosen_rule"] == "stable"
    # D3 reproduces the QANN exactly at its last step: stable for k = T steps is the fixed-T readout
    T = r["variants"]["D3"]["time_steps"]
    assert f[f"exit/D3/stable/top1_s{T - 1}"] == f["snn/D3/top1"] == f["ref/top1"]
    assert 1.0 <= f["exit/D3/mean_steps"] <= T
