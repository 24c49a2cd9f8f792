"""CSDformer SNN simulation speed against the QANN, measured side by side in one run (issues 3, 9).

For D = 0 and D = 3 (T = L = 4): ``SNN time for one batch / (T x QANN time for the same batch)``.
A dense simulation cannot go much below 1.0: every layer sees T input steps. The SNN is timed
alone and *with the evaluation's spike counting*: forward hooks doing the work of
``csdlab.eval.metrics.FiringCounter`` (events of every neuron layer: its ``count_events`` if it
has one, else ``count_nonzero`` of its output) and ``csdlab.energy.OpCounter`` (every spike-fed
Conv2d / Linear: non-zero input events x actual fan-out, per time step; a module with
``count_ops`` counts itself; the analog first conv and head: dense MACs). The synaptic events are
counted twice over, in separate candidates: with ``csdlab.snn.counting.synaptic_events`` (exact,
one comparison pass and one reduction) and with ``csdlab.energy.synaptic_events`` where that
exists (else a copy of its occupancy-convolution form). All candidates are interleaved round by
round (``benchmarks/_timing.py``), medians reported; the last line is
``ratio=<SNN at D = 3 with counting (csdlab.snn.counting) / (T x QANN)>``.

    python benchmarks/snn_speed.py [--model csdformer_tiny] [--batch 64] [--repeats 10] [--threads 1]

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the peak bytes of live tensor
storages created during the forward pass (``LiveTensorPeak``, allocator-independent; under it the
DIF neurons run their eager loop, which allocates the same tensors as the compiled one).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import csdlab.models  # noqa: F401  (registers csdformer_*)
from _timing import LiveTensorPeak, add_common_args, interleaved, medians, peak_mib, print_ratio, setup
from csdlab.convert.csdformer import SpikingCSDformer, convert_csdformer
from csdlab.quant import ActQuantizer
from csdlab.snn.counting import synaptic_events
from csdlab.snn.neurons import DelayedIFNode

try:  # the evaluation's own function, where this checkout has it
    from csdlab.energy import synaptic_events as energy_synaptic_events
except ImportError:
    energy_synaptic_events = None

__all__ = ["LiveTensorPeak", "EvalCounters", "build_qann"]  # LiveTensorPeak: ecmt_speed imports it from here

log = logging.getLogger("snn_speed")


def occupancy_synaptic_events(module: nn.Module, x: Tensor) -> Tensor:
    """Per-row (dim 0) non-zero input events x actual fan-out, computed as the evaluation's
    ``csdlab.energy.synaptic_events`` computed it when this benchmark was written (event mask in
    float64 sums, a ones-kernel convolution for the conv occupancy); used where csdlab.energy has
    no ``synaptic_events``."""
    mask = x != 0
    if isinstance(module, nn.Linear):
        return mask.flatten(1).sum(1, dtype=torch.float64) * module.out_features
    mask = mask.to(torch.float32)
    ones = torch.ones(module.groups, module.in_channels // module.groups, *module.kernel_size, device=x.device)
    occupancy = F.conv2d(mask, ones, None, module.stride, module.padding, module.dilation, module.groups)
    return occupancy.flatten(1).sum(1, dtype=torch.float64) * (module.out_channels // module.groups)


class EvalCounters:
    """The evaluation's counting hooks on a :class:`SpikingCSDformer` while entered: firing counts
    per neuron layer and MACs / ACs per layer and time step (the work, not the bookkeeping, of
    ``FiringCounter`` and ``OpCounter``)."""

    def __init__(self, snn: SpikingCSDformer,
                 synaptic: Callable[[nn.Module, Tensor], Tensor] = synaptic_events) -> None:
        self.snn = snn
        self.synaptic = synaptic
        self.steps = snn.time_steps
        self.sites = [m for m in snn.modules() if isinstance(m, DelayedIFNode)]
        self.analog = {id(snn.first_conv), id(snn.head)}
        self.firing = torch.zeros(2, len(self.sites), dtype=torch.float64)
        self.ops: dict[int, Tensor] = {}
        self._handles: list[Any] = []

    def _fire_hook(self, i: int) -> Callable[..., None]:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            if hasattr(mod, "count_events"):
                events, steps = mod.count_events(inputs, output)
            else:
                events, steps = torch.count_nonzero(output), output.numel()
            self.firing[0, i] += events
            self.firing[1, i] += steps
        return hook

    def _op_hook(self, mod: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        ops = self.ops.setdefault(id(mod), torch.zeros(2, self.steps, dtype=torch.float64))
        if hasattr(mod, "count_ops"):
            macs, acs = mod.count_ops(inputs, output)
            ops[0, -1] += float(macs)  # a scalar count goes to the last step, as OpCounter does
            ops[1, -1] += float(acs)
        elif id(mod) in self.analog:
            fan_in = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
            ops[0] += output.numel() * fan_in / self.steps
        else:  # [T*B] per-row counts -> [T] per-step counts
            ops[1] += self.synaptic(mod, inputs[0]).view(self.steps, -1).sum(1).cpu()

    def _watch(self, module: nn.Module) -> None:
        for child in module.children():
            if hasattr(child, "count_ops") or isinstance(child, (nn.Conv2d, nn.Linear)):
                self._handles.append(child.register_forward_hook(self._op_hook))
                if hasattr(child, "count_ops"):
                    continue
            self._watch(child)

    def __enter__(self) -> EvalCounters:
        self._handles = [m.register_forward_hook(self._fire_hook(i)) for i, m in enumerate(self.sites)]
        self._watch(self.snn)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def build_qann(name: str, batch: int, device: torch.device) -> tuple[nn.Module, Tensor]:
    """Random weights, LSQ steps initialised from one batch (as at the start of QAT)."""
    model = timm.create_model(name).to(device)
    x = torch.randn(batch, model.in_chans, model.img_size, model.img_size, device=device)
    model.eval()
    for q in model.modules():
        if isinstance(q, ActQuantizer):
            q.train()
    with torch.no_grad():
        model(x)
    return model.eval(), x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, repeats=10)
    parser.add_argument("--model", default="csdformer_tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 3])
    args = parser.parse_args()
    device = setup(args)
    if 3 not in args.delays:
        raise ValueError(f"--delays must include 3 (the ratio line is D = 3), got {args.delays}")
    qann, x = build_qann(args.model, args.batch, device)
    snns = {d: convert_csdformer(qann, delay=d) for d in args.delays}
    T = snns[3].time_steps

    def counted(d: int, synaptic: Callable[[nn.Module, Tensor], Tensor]) -> Callable[[], Any]:
        counters = EvalCounters(snns[d], synaptic)

        def run() -> Any:
            with counters:
                return snns[d](x)
        return run

    fns: dict[str, Callable[[], Any]] = {"qann": lambda: qann(x)}
    for d in args.delays:
        fns[f"snn D={d}"] = lambda d=d: snns[d](x)
        fns[f"snn D={d} +count"] = counted(d, synaptic_events)
    fns["snn D=3 +count (energy)"] = counted(3, energy_synaptic_events or occupancy_synaptic_events)
    with torch.no_grad():
        med = medians(interleaved(fns, args.repeats, device, args.warmup))
        mem = {"qann": peak_mib(fns["qann"], device)}
        for d in args.delays:
            mem[f"snn D={d}"] = peak_mib(fns[f"snn D={d}"], device)

    log.info("%s, batch %d, %s, %d threads, T=%d, %d interleaved rounds", args.model, args.batch, device,
             torch.get_num_threads(), T, args.repeats)
    log.info("QANN forward               %9.2f ms   peak %7.1f MiB", 1e3 * med["qann"], mem["qann"])
    for d in args.delays:
        sim, cnt = med[f"snn D={d}"], med[f"snn D={d} +count"]
        log.info("SNN D=%d simulation only    %9.2f ms   time / (T x QANN) = %.3f   peak %7.1f MiB (%.2fx the QANN's)",
                 d, 1e3 * sim, sim / (T * med["qann"]), mem[f"snn D={d}"], mem[f"snn D={d}"] / mem["qann"])
        log.info("SNN D=%d with counting      %9.2f ms   time / (T x QANN) = %.3f", d, 1e3 * cnt, cnt / (T * med["qann"]))
    energy = med["snn D=3 +count (energy)"]
    log.info("SNN D=3 with counting, synaptic events by %s: %.2f ms, time / (T x QANN) = %.3f",
             "csdlab.energy.synaptic_events" if energy_synaptic_events else "the occupancy convolution (copy)",
             1e3 * energy, energy / (T * med["qann"]))
    print_ratio(med["snn D=3 +count"] / (T * med["qann"]))


if __name__ == "__main__":
    main()
