"""QAT overhead: training-step time of csdformer_tiny with LSQ quantizers vs the float (ReLU) model.

The model of ``configs/fmnist_csdformer_tiny.yaml`` (28x28, 1 channel, pool stages 2 and 3, L = 4),
one AdamW step (zero_grad, forward, cross-entropy, backward, step) on the same fixed batch. All
candidates are timed side by side in one run (interleaved rounds, medians), so load from other
processes hits them alike:

* ``float``: ReLU model, eager (how training runs it);
* ``qat``: LSQ model as training runs it by default (compiled quantizer kernels, eager elsewhere;
  eager quantizers where compiling is impossible);
* ``qat-eager``: LSQ model with ``CSDLAB_COMPILE``-style eager quantizers, for reference;
* with ``--compile-model``: ``float-compiled`` and ``qat-compiled``, the whole model under
  ``torch.compile`` (both sides get the same treatment; compiling takes minutes on a CPU).

Last line: ``ratio=<qat / float>`` (the default training paths).

    python benchmarks/qat_overhead.py [--repeats 30] [--batch 128] [--threads 2] [--compile-model]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

import csdlab.models  # noqa: F401  (registers csdformer_*)
from _timing import add_common_args, interleaved, medians, print_ratio, setup
from csdlab.quant.lsq import compile_enabled, set_compile

log = logging.getLogger("qat_overhead")


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, repeats=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--compile-model", action="store_true", help="also time both models under torch.compile")
    return p


def measure(a: argparse.Namespace) -> dict[str, Any]:
    """Median step time of every candidate (``benchmarks/gpu_check.py`` calls this); ``ratio``:
    qat / float (the default training paths)."""
    device = setup(a)
    kw = dict(num_classes=10, img_size=a.img_size, in_chans=1, pool_stages=[2, 3], levels=4)
    x = torch.randn(a.batch, 1, a.img_size, a.img_size, device=device)
    y = torch.randint(0, 10, (a.batch,), device=device)

    def build(act: str, compile_kernels: bool = True) -> nn.Module:
        torch.manual_seed(a.seed)  # same initial weights for every candidate of a kind
        model = timm.create_model("csdformer_tiny", act=act, **kw).to(device).train()
        set_compile(model, compile_kernels)
        return model

    steps = {"float": training_step(build("relu"), x, y),
             "qat": training_step(build("lsq"), x, y),
             "qat-eager": training_step(build("lsq", compile_kernels=False), x, y)}
    if a.compile_model:
        # the quantizers' own kernels are inlined into the model's graph under torch.compile
        steps["float-compiled"] = training_step(torch.compile(build("relu")), x, y)
        steps["qat-compiled"] = training_step(torch.compile(build("lsq")), x, y)
    for name, step in steps.items():  # first step: LSQ step-size init, kernel compilation
        t0 = time.perf_counter()
        step()
        log.info("first step %-15s %6.1f s", name, time.perf_counter() - t0)
    med = medians(interleaved(steps, a.repeats, device, a.warmup))
    return {"device": str(device), "seconds": med, "compiled_kernels": compile_enabled(),
            "ratio": med["qat"] / med["float"]}


def main() -> None:
    a = build_parser().parse_args()
    res = measure(a)
    med = res["seconds"]
    log.info("csdformer_tiny (fmnist config), batch %d, %dx%d, %s, %d threads, %d interleaved rounds",
             a.batch, a.img_size, a.img_size, res["device"], torch.get_num_threads(), a.repeats)
    log.info("quantizer kernels compiled: %s", res["compiled_kernels"])
    for name, sec in med.items():
        log.info("%-15s step %8.1f ms", name, 1e3 * sec)
    log.info("eager:    qat / float = %.3f   qat-eager / float = %.3f",
             med["qat"] / med["float"], med["qat-eager"] / med["float"])
    if a.compile_model:
        log.info("compiled: qat-compiled / float-compiled = %.3f   (float-compiled / float = %.3f)",
                 med["qat-compiled"] / med["float-compiled"], med["float-compiled"] / med["float"])
    print_ratio(res["ratio"])


if __name__ == "__main__":
    main()
