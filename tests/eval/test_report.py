"""The report writer on hand-built figures with known answers: percent only in the printed
tables, fractions in the JSON, one plot per promised figure, versioned run folders."""

import json
from pathlib import Path

import pytest

from csdlab.eval.plots import jsonable
from csdlab.eval.report import next_version, steps_table, summary_table, write_report


@pytest.fixture
def results():
    figures = {"ann/top1": 0.875, "ref/top1": 0.875,
               "snn/T2/top1": 0.5, "snn/T2/agreement": 0.5625, "snn/T2/logit_error": 0.25,
               "snn/T2/max_logit_diff": 3.0, "snn/T2/firing_rate": 0.125, "energy/T2/ratio": 0.75,
               "energy/T2/ratio_spike": 1.5, "payload/T2/bits": 3.0, "payload/T2/max_units": 4.0,
               "payload/T2/spikes_per_event": 2.0,
               "snn/T2/top1_t1": 0.25, "snn/T2/top1_t2": 0.5,
               "snn/T2/logit_error_t1": 0.5, "snn/T2/logit_error_t2": 0.25,
               "energy/T2/ratio_t1": 0.375, "energy/T2/ratio_t2": 0.75,
               "snn/T2/firing_rate/blocks.0.attn": 0.0625, "snn/T2/firing_rate/head": 0.25,
               "samples": 16.0}
    return {"method": "ecmt", "figures": figures,
            "variants": {"T2": {"latency": 2, "readout_steps": [1, 2]}}}


def _rows(table):
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")]


def test_summary_prints_percent_from_fractions(results):
    header, ann, ref, snn = _rows(summary_table(results))
    assert header[:3] == ["model", "steps", "top-1 (%)"]
    assert float(ann[2]) == pytest.approx(87.5) and float(ref[2]) == pytest.approx(87.5)
    assert snn[0] == "SNN T2" and snn[1] == "2" and snn[7] == "3 (4, 2.00)"  # bits (largest value, spikes / event)
    assert [float(c) for c in snn[2:7] + snn[8:]] == pytest.approx([50.0, 56.25, 0.25, 3.0, 0.125, 0.75, 1.5])


def test_steps_table_has_one_row_per_readout(results):
    header, t1, t2 = _rows(steps_table(results))
    assert header == ["t", "top-1 (%)", "logit error", "energy vs ANN"]
    assert [float(c) for c in t1] == pytest.approx([1, 25.0, 0.5, 0.375])
    assert [float(c) for c in t2] == pytest.approx([2, 50.0, 0.25, 0.75])
    single = {**results, "variants": {"T2": {"latency": 2, "readout_steps": [2]}}}
    assert steps_table(single) is None  # one readout: nothing per step to show


def test_write_report_keeps_fractions_and_writes_every_plot(results, tmp_path):
    out = write_report(results, tmp_path, extra={"checkpoint": "x.ckpt"})
    data = json.loads((tmp_path / "figures.json").read_text())
    assert data["figures"] == jsonable(results["figures"])  # fractions, unchanged
    assert data["checkpoint"] == "x.ckpt" and set(data["tables"]) == {"summary", "per_step"}
    names = sorted(Path(p).name for p in out["plots"])
    assert names == ["accuracy_vs_t.png", "energy_vs_t.png", "firing_rate_per_site.png"]
    for p in out["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_next_version_never_reuses_a_folder(tmp_path):
    assert next_version(tmp_path).name == "version_0"
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_7").mkdir()
    (tmp_path / "version_x").mkdir()  # not a version: ignored
    assert next_version(tmp_path).name == "version_8"
