"""How far a pinned figure moves across runs: one ``convert.py test`` command, run in fresh processes
under several CPU instruction sets and thread counts, and the spread of the figures it reports.

    python benchmarks/pin_spread.py --keys snn/T8/top1_t4 exit/T8/top1 [--conditions native/1 avx2/1] -- \
        --config configs/convert/fmnist_vit_deep_ecmt.yaml --model.converter.T 8 --data.limit 2000

The slow tests pin accuracies and energies measured on one machine. A float result that repeats to
the bit on one CPU can differ on another (other vector instructions, another summation order in the
matrix products), and an image at a decision boundary then moves. This script reproduces that
variation here: every condition restricts the kernels torch, MKL and oneDNN may use
(``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``) and sets the thread count
(split reductions sum in another order). It prints each condition's figures and, per key, the
largest deviation from the first condition; a test's tolerance is that spread plus a margin.
Conditions whose instruction set the CPU lacks are skipped (torch falls back silently otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("pin_spread")
REPO = Path(__file__).resolve().parents[1]

#: name -> environment; the first is the reference the deviations are measured from
ISAS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
_NEEDS = {"avx2": "avx2", "default": "sse4_2"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` is absent: every condition then runs)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def conditions(names: list[str]) -> list[tuple[str, dict[str, str]]]:
    """(label, environment) of every ``isa/threads`` name whose instruction set this CPU has."""
    flags = cpu_flags()
    out = []
    for name in names:
        isa, _, n = name.partition("/")
        if isa not in ISAS or not n.isdigit() or int(n) < 1:
            raise ValueError(f"bad condition {name!r}: write isa/threads, isa one of {list(ISAS)}, threads >= 1")
        if flags and _NEEDS.get(isa, "") and _NEEDS[isa] not in flags:
            log.warning("skipping %s: this CPU lacks %s", name, _NEEDS[isa])
            continue
        out.append((name, {**ISAS[isa], "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}))
    return out


def run_once(args: list[str], env: dict[str, str], out: Path) -> dict[str, Any]:
    """One ``convert.py test`` in a fresh process; its ``figures.json``'s figures."""
    cmd = [sys.executable, str(REPO / "convert.py"), "test", *args, "--report.out_dir", str(out),
           "--trainer.logger", "false", "--progress_bar.refresh_rate", "0",
           "--trainer.default_root_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert.py test failed under {env}:\n{proc.stderr[-3000:]}")
    return json.loads((out / "figures.json").read_text())["figures"]


def spread(runs: dict[str, dict[str, float]], keys: list[str]) -> dict[str, float]:
    """Per key, the largest absolute deviation of any run from the first."""
    first = next(iter(runs.values()))
    return {k: max(abs(r[k] - first[k]) for r in runs.values()) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", nargs="+", required=True, help="figure keys of figures.json to compare")
    p.add_argument("--conditions", nargs="+", default=[f"{i}/{n}" for i in ISAS for n in (1, 2)],
                   help=f"isa/threads, isa from {list(ISAS)}; the first is the reference")
    p.add_argument("--json", type=Path, default=REPO / "logs" / "benchmarks" / "pin_spread.json")
    p.add_argument("convert_args", nargs=argparse.REMAINDER, help="after --: the convert.py test arguments")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = a.convert_args[1:] if a.convert_args[:1] == ["--"] else a.convert_args
    if not args:
        p.error("give the convert.py test arguments after --")
    runs: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, env) in enumerate(conditions(a.conditions)):
            log.info("run %s ...", label)
            figures = run_once(args, env, Path(tmp) / str(i))
            missing = [k for k in a.keys if k not in figures]
            if missing:
                raise KeyError(f"figures.json has no {missing}; keys like: {sorted(figures)[:12]}")
            runs[label] = {k: float(figures[k]) for k in a.keys}
            log.info("  %s", "  ".join(f"{k}={v:.4f}" for k, v in runs[label].items()))
    dev = spread(runs, a.keys)
    head = "| condition | " + " | ".join(a.keys) + " |"
    print(head)  # noqa: T201
    print("|" + "---|" * (len(a.keys) + 1))  # noqa: T201
    for label, r in runs.items():
        print(f"| {label} | " + " | ".join(f"{r[k]:.4f}" for k in a.keys) + " |")  # noqa: T201
    print("| largest deviation | " + " | ".join(f"{dev[k]:.4f}" for k in a.keys) + " |")  # noqa: T201
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"args": args, "runs": runs, "spread": dev}, indent=1))
    log.info("wrote %s", a.json)


if __name__ == "__main__":
    main()
