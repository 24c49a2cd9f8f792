"""``benchmarks/gpu_check.py --cpu`` (issue 17): the one-command GPU check runs end to end with
tiny sizes on the CPU, so it cannot rot before a GPU is lent. No timing is asserted: only that it
finishes, writes its JSON with every figure as a positive finite ratio, and ran ``pytest -m gpu``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATIOS = {"ecmt_step_over_ann", "mbe_eval_over_ann", "csdformer_snn_over_t_qann", "qat_step_over_float_step",
          "vit_ecmt_fp32_step_over_ann", "vit_ecmt_fp32_memory_over_ann", "vit_ecmt_bf16_step_over_ann",
          "vit_ecmt_bf16_memory_over_ann"}


def test_gpu_check_cpu_mode_writes_every_ratio(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "cpu" and set(doc["ratios"]) == RATIOS
    for key, value in doc["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    tests = doc["sections"]["pytest_gpu"]
    assert tests["returncode"] == 0 and ("skipped" in tests["summary"] or "passed" in tests["summary"])
    assert set(doc["sections"]) == {"ecmt", "mbe", "csdformer", "qat", "vit_ecmt", "pytest_gpu"}
    assert "vit_ecmt_fp32_memory_over_ann" in run.stdout  # the printed table
