"""SpikingJelly's STA recipe on a checkpoint: payload, simulation time vs the ANN, and SpikingJelly's
own op counters beside csdlab's (issue 16).

For every T: calibrate on the training batches ``convert.py`` uses (same data settings), then on
``--limit`` test images measure

* **payload**: the largest burst one neuron sent in one step, overall and per site, in bits
  (``ceil(log2(k + 1)) + 1``: magnitude and sign), and the mean spikes per burst;
* **top-1** of the readout after every t, **agreement** with the ANN;
* **operations**: csdlab's ``OpCounter`` (per event and per spike; energy by csdlab's rule) and
  SpikingJelly's ``MACCounter`` / ``ACCounter`` / ``SynOpCounter`` on the recipe's graph (they
  count a matrix product as synaptic only when an input is binary 0/1, so STA's bursts count as
  MACs there);
* **simulation time / ANN**: SNN forward of one batch vs the ANN forward of the same batch,
  interleaved repeats, medians (this thread's wall clock).

    python benchmarks/sta_measure.py [--checkpoint assets/fmnist_vit_tiny.ckpt] [--Ts 1,2,4,8] [--limit 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import add_common_args, interleaved, medians, print_ratio, setup  # noqa: E402

from csdlab.convert.sta import STAConverter  # noqa: E402
from csdlab.eval.counters import OpCounter, ann_macs, energy_ratio  # noqa: E402
from csdlab.eval.data import ConversionData  # noqa: E402
from csdlab.eval.load import load_reference  # noqa: E402


def spikingjelly_counts(net: torch.nn.Module, seq: torch.Tensor) -> dict[str, float]:
    """SpikingJelly 2.0's dispatch counters on one multi-step run of the recipe's graph."""
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.op_counter import ACCounter, DispatchCounterMode, MACCounter, SynOpCounter

    counters = {"macs": MACCounter(), "acs": ACCounter(), "synops": SynOpCounter()}
    functional.reset_net(net)
    with torch.no_grad(), DispatchCounterMode(list(counters.values()), strict=False):
        net(seq)
    functional.reset_net(net)
    return {k: float(c.get_total()) for k, c in counters.items()}


def main() -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__), repeats=5)
    p.add_argument("--checkpoint", default="assets/fmnist_vit_tiny.ckpt")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--Ts", default="1,2,4,8")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--threshold-scale", type=float, default=1.0)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    device = setup(args)
    model, data_cfg = load_reference(args.checkpoint)
    model = model.to(device).eval()
    data = ConversionData(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size, limit=args.limit,
                          calib_batches=args.calib_batches, model_data=data_cfg)
    data.prepare_data()
    data.setup()
    test = [(x.to(device), y.to(device)) for x, y in data.test_dataloader()]
    with torch.no_grad():
        ann_logits = [model(x) for x, _ in test]
    ann_top1 = sum(int((a.argmax(-1) == y).sum()) for a, (_, y) in zip(ann_logits, test)) / args.limit
    per_image_macs = ann_macs(model, test[0][0][:1])
    results: dict = {"ann_top1": ann_top1, "ann_macs_per_image": per_image_macs, "Ts": {}}
    print(f"ANN top-1 {100 * ann_top1:.2f} % on {args.limit} images; {per_image_macs:.4g} MACs per image")
    for T in [int(t) for t in args.Ts.split(",")]:
        conv = STAConverter(T=T, threshold_scale=args.threshold_scale)
        conv.calibrate(model, (x.to(device) for x in data.calibration_batches()), lambda t: t)
        snn = conv.convert(model)[f"T{T}"].to(device)
        snn_spike = STAConverter(T=T, threshold_scale=args.threshold_scale, count="spike")
        snn_spike.thresholds = conv.thresholds
        snn_spike = snn_spike.convert(model)[f"T{T}"].to(device)
        correct = torch.zeros(T)
        agree = 0
        ops = {}
        for rule, s in (("event", snn), ("spike", snn_spike)):
            counter = OpCounter(s, s.analog_layers(), steps=T, time_flattened=True, uncounted=s.uncounted_modules())
            with torch.no_grad(), counter:
                for (x, y), a in zip(test, ann_logits):
                    out = s(x)
                    if rule == "event":
                        correct += (out.argmax(-1) == y).sum(1).float()
                        agree += int((out[-1].argmax(-1) == a.argmax(-1)).sum())
            macs, acs = counter.per_step.sum(1).tolist()
            ops[rule] = {"macs": macs / args.limit, "acs": acs / args.limit,
                         "energy_ratio": energy_ratio(macs, acs, per_image_macs * args.limit)}
        payload = snn.payload()
        x0 = test[0][0]
        seq = x0.new_zeros(T, *x0.shape)
        seq[0] = x0
        sj = {k: v / len(x0) for k, v in spikingjelly_counts(snn.net, seq).items()}
        sj["energy_ratio"] = energy_ratio(sj["macs"], sj["acs"], per_image_macs)
        with torch.no_grad():
            times = medians(interleaved({"ann": lambda: model(x0), "snn": lambda: snn(x0)}, args.repeats, device,
                                        args.warmup))
        fig = {"top1_t": {t + 1: float(c) / args.limit for t, c in enumerate(correct)},
               "agreement": agree / args.limit, "ops": ops, "spikingjelly_ops": sj,
               "payload": {k: v for k, v in payload.items() if k != "sites"},
               "payload_sites": {n: {"max_count": v["max_count"], "spikes_per_event": v["spikes_per_event"]}
                                 for n, v in payload["sites"].items()},
               "time_s": times, "time_ratio": times["snn"] / times["ann"]}
        results["Ts"][T] = fig
        print(f"T={T}: top-1 per t {[round(100 * v, 2) for v in fig['top1_t'].values()]}, agreement "
              f"{100 * fig['agreement']:.1f} %, payload max {payload['max_count']} ({payload['bits']} bits), "
              f"{payload['spikes_per_event']:.1f} spikes per burst; energy/ANN per event "
              f"{ops['event']['energy_ratio']:.3f}, per spike {ops['spike']['energy_ratio']:.3f}; SpikingJelly "
              f"counters per image: {sj['macs']:.4g} MACs, {sj['acs']:.4g} ACs, {sj['synops']:.4g} SynOps "
              f"(energy/ANN {sj['energy_ratio']:.3f}); time SNN/ANN {fig['time_ratio']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    last = results["Ts"][max(results["Ts"])]
    print_ratio(last["time_ratio"])


if __name__ == "__main__":
    main()
