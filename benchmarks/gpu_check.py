"""Every benchmark's GPU figure in one command (issue 17): at most 8 minutes on one H100.

Runs, on one device, each benchmark's own measuring function with the sizes of the README's
performance table, plus an ECMT evaluation of ``vit_base_patch16_224``, then ``pytest -m gpu``;
writes one JSON (``--out``) and prints one table. Every ratio is of two things timed side by side
in one run (interleaved rounds, medians after warm-up, ``torch.cuda.synchronize()`` around every
timed call on a GPU):

* ``ecmt_step_over_ann``: ECMT SNN time per step / ANN forward, the evaluation's counters on
  (``ecmt_speed.speed``; the trained Fashion-MNIST ViT when the Fashion-MNIST files are found,
  else ``vit_small_patch16_224`` on random images; the JSON says which);
* ``mbe_eval_over_ann``: one whole MBE evaluation / one ANN forward (``mbe_speed.measure``);
* ``csdformer_snn_over_t_qann``: CSDformer SNN at D = 3 with counting / (T x QANN)
  (``snn_speed.measure``);
* ``qat_step_over_float_step``: QAT training step / float step (``qat_overhead.measure``);
* ``vit_ecmt_{fp32,bf16}_step_over_ann`` and ``..._memory_over_ann``: ECMT T = 8 evaluation of
  ``vit_base_patch16_224`` at batch 64 (random weights, thresholds calibrated on random images),
  counters on: time per step / ANN forward, and peak CUDA memory / the ANN forward's (both above
  the memory held before the call, i.e. without the weights), in float32 and in bfloat16.

``--cpu`` runs the same code on the CPU with tiny sizes (small batches, a tiny ViT instead of
ViT-B/16, few repeats, ``CSDLAB_COMPILE=0``) in well under 2 minutes: the default test suite runs
it (``tests/test_gpu_check.py``) so the script cannot rot. Its figures are a smoke test, not results.

    python benchmarks/gpu_check.py --out gpu_check.json        # on a GPU machine
    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, also when imported

import ecmt_speed  # noqa: E402
import mbe_speed  # noqa: E402
import qat_overhead  # noqa: E402
import snn_speed  # noqa: E402
from _timing import interleaved, medians, peak_mib, sync  # noqa: E402

from csdlab.convert.ecmt import ECMTConverter  # noqa: E402

log = logging.getLogger("gpu_check")
ROOT = Path(__file__).resolve().parents[1]

#: the ratios the JSON always holds (tests/test_gpu_check.py checks them)
RATIO_KEYS = ("ecmt_step_over_ann", "mbe_eval_over_ann", "csdformer_snn_over_t_qann", "qat_step_over_float_step",
              "vit_ecmt_fp32_step_over_ann", "vit_ecmt_fp32_memory_over_ann", "vit_ecmt_bf16_step_over_ann",
              "vit_ecmt_bf16_memory_over_ann")

# sizes: the README's performance table on a GPU; tiny ones with --cpu
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {"ecmt_batch": 64, "ecmt_T": 10, "ecmt_repeats": 5, "calib_batches": 8,
            "mbe_T": 16, "mbe_batch": 256, "mbe_repeats": 10,
            "snn_batch": 64, "snn_repeats": 10, "qat_batch": 128, "qat_repeats": 30,
            "vit": "vit_base_patch16_224", "vit_kwargs": {}, "vit_batch": 64, "vit_T": 8, "vit_repeats": 5,
            "vit_calib": 16, "warmup": 2},
    "cpu": {"ecmt_batch": 4, "ecmt_T": 4, "ecmt_repeats": 2, "calib_batches": 1,
            "mbe_T": 8, "mbe_batch": 8, "mbe_repeats": 2,
            "snn_batch": 4, "snn_repeats": 2, "qat_batch": 16, "qat_repeats": 2,
            "vit": "vit_tiny_patch16_224", "vit_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2},
            "vit_batch": 4, "vit_T": 8, "vit_repeats": 2, "vit_calib": 4, "warmup": 1},
}


def fashion_mnist_found(data_dir: str) -> bool:
    """Whether ``ecmt_speed`` can read Fashion-MNIST offline (the GPU machine may lack the files)."""
    try:
        next(ecmt_speed.fmnist_batches(data_dir, 1, "test"))
    except Exception as err:  # noqa: BLE001 - any failure: measure on random images instead
        log.info("Fashion-MNIST not readable (%s): ECMT speed on vit_small_patch16_224, random images",
                 str(err).splitlines()[0][:120])
        return False
    return True


def ecmt(device: torch.device, size: dict[str, Any], data_dir: str) -> dict[str, Any]:
    model = "fmnist" if fashion_mnist_found(data_dir) else (
        "vit_small_patch16_224" if device.type == "cuda" else "vit_tiny_patch16_224")
    batch = size["ecmt_batch"]
    args = ecmt_speed.build_parser().parse_args([
        "--models", model, "--batches", str(batch), "--T", str(size["ecmt_T"]), "--repeats", str(size["ecmt_repeats"]),
        "--calib-batches", str(size["calib_batches"]), "--data-dir", data_dir, "--threads", "0",
        "--device", str(device)])
    res = ecmt_speed.speed(args, model, device)[batch]
    return {"model": model, "batch": batch, "T": size["ecmt_T"], "step_over_ann": res,
            "ratio": res["on"]}


def mbe(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    args = mbe_speed.build_parser().parse_args([
        "--T", str(size["mbe_T"]), "--batch", str(size["mbe_batch"]), "--repeats", str(size["mbe_repeats"]),
        "--device", str(device), "--threads", str(torch.get_num_threads())])
    return {"T": size["mbe_T"], "batch": size["mbe_batch"], **mbe_speed.measure(args)}


def csdformer(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    args = snn_speed.build_parser().parse_args([
        "--batch", str(size["snn_batch"]), "--repeats", str(size["snn_repeats"]), "--warmup", str(size["warmup"]),
        "--device", str(device)])
    return {"batch": size["snn_batch"], **snn_speed.measure(args)}


def qat(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    args = qat_overhead.build_parser().parse_args([
        "--batch", str(size["qat_batch"]), "--repeats", str(size["qat_repeats"]), "--warmup", str(size["warmup"]),
        "--device", str(device)])
    return {"batch": size["qat_batch"], **qat_overhead.measure(args)}


def vit_ecmt(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    """ECMT T = 8 evaluation of a random-weight ViT, counters on, in float32 and bfloat16."""
    torch.manual_seed(0)
    name, T, batch = size["vit"], size["vit_T"], size["vit_batch"]
    ann = timm.create_model(name, pretrained=False, **size["vit_kwargs"]).eval().to(device)
    img = ann.patch_embed.img_size
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(size["vit_calib"], 3, *img, generator=g).to(device)]
    conv = ECMTConverter(T=T)
    t0 = time.perf_counter()
    conv.calibrate(ann, calib, lambda t: t)  # thresholds from random images, on the device
    sync(device)
    out: dict[str, Any] = {"model": name, "T": T, "batch": batch, "calibration_s": time.perf_counter() - t0}
    x32 = torch.randn(batch, 3, *img, generator=torch.Generator().manual_seed(2)).to(device)
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        snn = conv.convert(ann)[f"T{T}"].to(device, dtype)
        net = ann.to(dtype)
        x = x32.to(dtype)
        out["images_per_pass"] = snn.images_per_pass

        def counted(snn: Any = snn, x: torch.Tensor = x) -> None:
            with ecmt_speed.eval_counting(snn):
                snn(x)

        fns = {"ann": lambda net=net, x=x: net(x), "snn": counted}
        with torch.no_grad():
            med = medians(interleaved(fns, size["vit_repeats"], device, size["warmup"]))
            mem = {k: peak_mib(fn, device) for k, fn in fns.items()}
        out[label] = {"ann_s": med["ann"], "snn_s": med["snn"], "ann_peak_mib": mem["ann"],
                      "snn_peak_mib": mem["snn"], "step_over_ann": med["snn"] / T / med["ann"],
                      "memory_over_ann": mem["snn"] / mem["ann"]}
        del snn
        ann = ann.float()
    return out


def gpu_tests(timeout: int) -> dict[str, Any]:
    """``pytest -m gpu`` in a fresh process (it skips, saying why, where no GPU exists)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-p", "no:cacheprovider", str(ROOT / "tests" / "gpu")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": f"timed out after {timeout} s", "seconds": timeout}
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if " in " in ln and ("passed" in ln or "skipped" in ln
                                                                       or "failed" in ln or "error" in ln)), "")
    skipped = sorted({ln.split(": ", 1)[-1] for ln in lines if ln.startswith("SKIPPED")})
    return {"returncode": run.returncode, "summary": summary.strip("= "), "skip_reasons": skipped,
            "seconds": time.perf_counter() - t0, "tail": lines[-30:] if run.returncode else []}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(cpu: bool, data_dir: str, test_timeout: int, sections: list[str]) -> dict[str, Any]:
    """Every section; returns the JSON document."""
    device = torch.device("cpu" if cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA GPU here (torch.cuda.is_available() is False); "
                         "run it on a GPU machine, or with --cpu for the tiny smoke-test sizes")
    if cpu:
        os.environ["CSDLAB_COMPILE"] = "0"  # no minutes of kernel compilation in a smoke test
    size = SIZES["cpu" if cpu else "gpu"]
    doc: dict[str, Any] = {"mode": "cpu" if cpu else "gpu", "device": device_name(device),
                           "torch": torch.__version__, "sizes": size, "sections": {}, "ratios": {},
                           "seconds": {}}
    jobs = {"ecmt": lambda: ecmt(device, size, data_dir), "mbe": lambda: mbe(device, size),
            "csdformer": lambda: csdformer(device, size), "qat": lambda: qat(device, size),
            "vit_ecmt": lambda: vit_ecmt(device, size), "pytest_gpu": lambda: gpu_tests(test_timeout)}
    for name in sections:
        log.info("== %s", name)
        t0 = time.perf_counter()
        doc["sections"][name] = jobs[name]()
        doc["seconds"][name] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.empty_cache()
    s = doc["sections"]
    pairs = {"ecmt_step_over_ann": ("ecmt", "ratio"), "mbe_eval_over_ann": ("mbe", "ratio"),
             "csdformer_snn_over_t_qann": ("csdformer", "ratio"), "qat_step_over_float_step": ("qat", "ratio")}
    for key, (sec, field) in pairs.items():
        if sec in s:
            doc["ratios"][key] = s[sec][field]
    if "vit_ecmt" in s:
        for label in ("fp32", "bf16"):
            for what in ("step_over_ann", "memory_over_ann"):
                doc["ratios"][f"vit_ecmt_{label}_{what}"] = s["vit_ecmt"][label][what]
    return doc


def table(doc: dict[str, Any]) -> str:
    s = doc["sections"]
    rows = [("figure", "ratio", "configuration")]
    described = {
        "ecmt_step_over_ann": lambda: f"{s['ecmt']['model']}, T = {s['ecmt']['T']}, batch {s['ecmt']['batch']}, "
                                      f"counters on (off: {s['ecmt']['step_over_ann']['off']:.3f})",
        "mbe_eval_over_ann": lambda: f"Fashion-MNIST ViT, T = {s['mbe']['T']}, N = 8, batch {s['mbe']['batch']}",
        "csdformer_snn_over_t_qann": lambda: f"csdformer_tiny, T = 4, D = 3, batch {s['csdformer']['batch']}, counters on",
        "qat_step_over_float_step": lambda: f"csdformer_tiny, batch {s['qat']['batch']}, "
                                            f"compiled LSQ kernels: {s['qat']['compiled_kernels']}",
    }
    for key, value in doc["ratios"].items():
        if key.startswith("vit_ecmt_"):
            v = s["vit_ecmt"]
            label = key.split("_")[2]
            what = "time per step / ANN forward" if "step" in key else "peak memory / ANN forward's"
            cfg = (f"{v['model']}, T = {v['T']}, batch {v['batch']} ({v['images_per_pass']} images per pass), "
                   f"{label}, counters on: {what}")
        else:
            cfg = described[key]()
        rows.append((key, f"{value:.3f}", cfg))
    if "pytest_gpu" in s:
        t = s["pytest_gpu"]
        rows.append(("pytest -m gpu", "rc=" + str(t["returncode"]), "; ".join([t["summary"], *t["skip_reasons"]])))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"gpu_check ({doc['mode']} mode) on {doc['device']}, torch {doc['torch']}, "
             f"{sum(doc['seconds'].values()):.0f} s"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the CI smoke test)")
    p.add_argument("--out", default="gpu_check.json", help="where the JSON goes")
    p.add_argument("--data-dir", default="/tmp/csdlab_data", help="Fashion-MNIST root (ecmt_speed's)")
    p.add_argument("--test-timeout", type=int, default=240, help="seconds allowed to pytest -m gpu")
    p.add_argument("--sections", type=lambda v: v.split(","),
                   default=["ecmt", "mbe", "csdformer", "qat", "vit_ecmt", "pytest_gpu"])
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("csdlab").setLevel(logging.WARNING)
    doc = run(a.cpu, a.data_dir, a.test_timeout, a.sections)
    bad = {k: v for k, v in doc["ratios"].items() if not (isinstance(v, float) and math.isfinite(v) and v > 0)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(table(doc))  # noqa: T201 - the report
    print(f"JSON: {out}")  # noqa: T201
    tests_failed = "pytest_gpu" in a.sections and doc["sections"]["pytest_gpu"]["returncode"] != 0
    if bad or tests_failed:
        raise SystemExit(f"gpu_check.py: not positive finite ratios {bad}; pytest -m gpu returned "
                         f"{doc['sections'].get('pytest_gpu', {}).get('returncode')}")


if __name__ == "__main__":
    main()
