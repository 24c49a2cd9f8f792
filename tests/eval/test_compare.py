"""convert.py compare on a tiny ViT: one table of every method at every T, the same images, two plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from csdlab.cli import make_convert_cli
from csdlab.eval.compare import compare, parse_method, peer_answers, peer_answers_table


def _config(path: Path, class_path: str, **init_args) -> str:
    path.write_text(yaml.safe_dump({"model": {"converter": {"class_path": class_path, "init_args": init_args}},
                                    "data": {"dataset": "digits", "batch_size": 32, "calib_batches": 2}}))
    return str(path)


def test_compare_two_methods_on_a_tiny_vit(digits_vit: Path, tmp_path: Path) -> None:
    ecmt = _config(tmp_path / "ecmt.yaml", "csdlab.convert.ecmt.ECMTConverter", T=4, levels=8)
    burst = _config(tmp_path / "burst.yaml", "csdlab.convert.ecmt_burst.ECMTBurstConverter", T=4, burst=16)
    cli = make_convert_cli(["compare", "--methods", f"[{ecmt}, {burst}:burst=4]", "--checkpoint", str(digits_vit),
                            "--Ts", "[1, 2]", "--limit", "64", "--out_dir", str(tmp_path / "out"),
                            "--timing_images", "8", "--timing_repeats", "1", "--accelerator", "cpu"])
    out = cli.result
    rows = out["rows"]
    assert [(r["method"], r["T"]) for r in rows] == [("ecmt", 1), ("ecmt", 2), ("burst [burst=4]", 1),
                                                     ("burst [burst=4]", 2)]
    assert out["ann"]["samples"] == 64 and 0 < out["ann"]["top1"] <= 1  # fractions
    for r in rows:
        assert 0 <= r["top1"] <= 1 and 0 <= r["agreement"] <= 1
        assert r["energy_spike"] >= r["energy_event"] > 0 and r["sim_over_ann"] > 0
        assert r["spikes_per_event"] >= 1
    ecmt_rows, burst_rows = rows[:2], rows[2:]
    assert all(r["max_units"] <= 128 and r["payload_bits"] <= 5 for r in ecmt_rows)  # 8 power-of-two levels
    assert all(r["max_units"] <= 4 and r["payload_bits"] <= 4 for r in burst_rows)  # bursts of <= 4: 9 values
    assert all(r["origin"] == "csdlab" for r in rows) and out["answers"] == []  # no peer: nothing to meet
    assert rows[0]["top1_t1"] == rows[0]["top1"]  # T = 1: the first readout is the last
    # ECMT's calibration does not depend on T: the first step of T = 2 is T = 1
    assert rows[1]["top1_t1"] == rows[0]["top1"]
    written = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert written["rows"][0]["top1"] == rows[0]["top1"]
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| burst [burst=4] | 2 |" in md and "| ANN |" in md
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["accuracy_vs_energy.png",
                                                                       "accuracy_vs_payload.png"]
    # methods run as separate processes join one table; other images are refused
    joined = compare([], include=[str(tmp_path / "out" / "comparison.json")], limit=64, out_dir=str(tmp_path / "j"))
    assert joined["rows"] == json.loads(json.dumps(rows)) and joined["ann"] == out["ann"]
    with pytest.raises(ValueError, match="include only comparisons of the same checkpoint"):
        compare([], include=[str(tmp_path / "out" / "comparison.json")], limit=100, out_dir=str(tmp_path / "k"))


def test_bad_method_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no convert config"):
        parse_method(str(tmp_path / "missing.yaml"))
    cfg = _config(tmp_path / "e.yaml", "csdlab.convert.ecmt.ECMTConverter")
    with pytest.raises(ValueError, match="write key=value"):
        parse_method(f"{cfg}:levels")
    assert parse_method(f"{cfg}:levels=16;percentile=99.5").init_args == {"levels": 16, "percentile": 99.5}


def _r(method: str, T: int, top1: float, bits: float, ev: float, sp: float, sim: float, origin: str = "csdlab") -> dict:
    return {"method": method, "T": T, "variant": f"T{T}", "origin": origin, "top1": top1, "payload_bits": bits,
            "energy_event": ev, "energy_spike": sp, "sim_over_ann": sim}


def test_peer_rows_are_met_only_on_every_figure_at_once() -> None:
    peer1 = _r("sta", 1, 0.85, 5, 0.22, 0.33, 4.4, origin="spikingjelly")
    peer2 = _r("sta", 2, 0.87, 6, 0.25, 0.62, 5.6, origin="spikingjelly")
    rows = [peer1, peer2,
            _r("burst4", 1, 0.85, 4, 0.15, 0.26, 1.7),   # meets peer1 (ties on accuracy)
            _r("burst8", 1, 0.884, 5, 0.16, 0.41, 1.6),  # more energy per unit spike than peer1: meets peer2 only
            _r("cheap", 1, 0.86, 6, 0.10, 0.20, 5.7),    # slower than both peers: meets neither
            _r("mbe", 2, 0.90, 1, 0.42, 0.42, 3.0),      # binary but more energy: meets neither
            {"method": "mbe", "T": 1, "skipped": "no T = 1 table"}]
    answers = peer_answers(rows)
    assert [(a["peer"]["T"], a["met_by"]) for a in answers] == [
        (1, {"method": "burst4", "T": 1, "variant": "T1"}), (2, {"method": "burst8", "T": 1, "variant": "T1"})]
    # a peer nobody meets is said so, not dropped
    answers = peer_answers([peer1, _r("worse", 1, 0.84, 4, 0.1, 0.1, 1.0)])
    assert answers[0]["met_by"] is None and "not met" in peer_answers_table(answers)
    assert peer_answers_table([]) == ""
