"""QAT overhead: training-step time of csdformer_tiny with LSQ quantizers vs the float (ReLU) model.

Both models are timed side by side in one run (interleaved rounds, median per step), on the same
batches, so machine load affects both alike. Last line: ``ratio=<QAT / float>``.

    python benchmarks/qat_overhead.py [--steps 30] [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import csdlab  # noqa: F401


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per model")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=28)
    a = p.parse_args()
    torch.manual_seed(0)
    kw = dict(num_classes=10, img_size=a.img_size, in_chans=1, pool_stages=[2, 3])
    models = {act: timm.create_model("csdformer_tiny", act=act, **kw).train() for act in ("relu", "lsq")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    x = torch.randn(a.batch, 1, a.img_size, a.img_size)
    y = torch.randint(0, 10, (a.batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(k: str) -> float:
        t0 = time.perf_counter()
        opts[k].zero_grad(set_to_none=True)
        loss_fn(models[k](x), y).backward()
        opts[k].step()
        return time.perf_counter() - t0

    for k in models:  # warm-up (and LSQ step-size init)
        for _ in range(3):
            step(k)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(a.steps):
        for k in models:  # interleaved: both see the same machine load
            times[k].append(step(k))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"csdformer_tiny, batch {a.batch}, {a.img_size}x{a.img_size}, {a.steps} steps each, "
          f"{torch.get_num_threads()} threads")
    print(f"float (relu) step: {med['relu'] * 1e3:.1f} ms   QAT (lsq, L=4) step: {med['lsq'] * 1e3:.1f} ms")
    print(f"ratio={med['lsq'] / med['relu']:.3f}")


if __name__ == "__main__":
    main()
