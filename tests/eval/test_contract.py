"""The converter contract (csdlab/eval/api.py), checked for every registered converter, as timm tests
every model in its registry: a converter added to ``csdlab.convert`` is tested here automatically.

For each: the readout has one row per readout step; every parameterised module is counted or
declared (the counters raise otherwise); the reference network is left untouched; calibration in
two processes (simulated by two threads sharing an all-reduce) equals one process; the spike-driven
check's verdict on the converted variants equals the converter's declared ``spike_driven``; the
payload the evaluation measures stays within the converter's declared payload.
"""

from __future__ import annotations

import copy
import threading

import pytest
import timm
import torch
from torch import Tensor, nn

import csdlab.convert  # noqa: F401  registers every converter
import csdlab.models  # noqa: F401  registers csdformer_* with timm
from csdlab.eval.api import CONVERTERS, Converter, Payload
from csdlab.eval.checks import spike_driven_check
from csdlab.eval.counters import SimulationCounters
from csdlab.quant.lsq import ActQuantizer


def _vit() -> tuple[nn.Module, list[Tensor]]:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=5,
                              embed_dim=32, depth=1, num_heads=2).eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(4, 1, 16, 16, generator=g) for _ in range(4)]


def _csdformer() -> tuple[nn.Module, list[Tensor]]:
    torch.manual_seed(0)
    model = timm.create_model("csdformer_tiny", num_classes=5, img_size=16, in_chans=1, pool_stages=[2, 3],
                              embed_dim=32, act="lsq", levels=4).double()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 1, 16, 16, generator=g, dtype=torch.float64) for _ in range(4)]
    model.eval()
    for q in model.modules():
        if isinstance(q, ActQuantizer):
            q.train()  # LSQ's statistical init on one batch: every level is used
    with torch.no_grad():
        model(batches[0])
    return model.eval(), batches


MODELS = {"vit": _vit, "csdformer": _csdformer}
#: smaller settings where a converter's defaults simulate many variants (a converter not listed is
#: tested with its defaults)
QUICK = {"mbe": {"Ts": [4]}, "ecmt": {"T": 4}}


@pytest.fixture(params=sorted(CONVERTERS), ids=str)
def case(request: pytest.FixtureRequest) -> tuple[type[Converter], nn.Module, list[Tensor]]:
    cls = CONVERTERS[request.param]
    if cls.accepts not in MODELS:
        pytest.fail(f"converter {cls.__name__} accepts {cls.accepts!r}: add a model builder to this test")
    model, batches = MODELS[cls.accepts]()
    return cls, model, batches


def _calibrate_two_ranks(cls: type[Converter], model: nn.Module, batches: list[Tensor]) -> list[Converter]:
    """Two converters calibrated as two processes would be: one thread each, with their own copy of
    the model and half of the batches, meeting in an all-reduce that sums across both. Only one
    thread runs at a time (a lock released while waiting in the all-reduce): libraries that are not
    thread-safe (torch.fx tracing in SpikingJelly's recipes) see one caller at a time."""
    barrier, slots, turn = threading.Barrier(2, timeout=120), [None, None], threading.Lock()

    def make_all_reduce(rank: int):
        def all_reduce(t: Tensor) -> Tensor:
            slots[rank] = t.clone()
            turn.release()
            try:
                barrier.wait()
                total = slots[0] + slots[1]  # the same order on both ranks
                barrier.wait()
            finally:
                turn.acquire()
            return total.to(t)
        return all_reduce

    convs, errors = [cls(**QUICK.get(cls.name, {})) for _ in range(2)], []
    models = [copy.deepcopy(model) for _ in range(2)]  # one per process, as under DDP

    def run(r: int) -> None:
        with turn:
            try:
                convs[r].calibrate(models[r], batches[r::2], make_all_reduce(r))
            except BaseException as e:  # noqa: BLE001  reported below
                errors.append(e)
                barrier.abort()

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return convs


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_payload(label: str, declared: Payload, counters: SimulationCounters) -> None:
    """The measured payload (largest value, bits of the values seen) within the declaration; unit
    spikes at least the events; equal rules for binary spikes."""
    from csdlab.eval.counters import bits_of_values

    assert isinstance(declared, Payload), f"{label}: payload() must return a csdlab.eval.api.Payload"
    events, spikes, largest = counters.payload.counts
    assert float(largest.max()) >= 1, f"{label}: no site sent a spike"
    assert bool((spikes >= events).all())
    if declared.max_units is not None:
        assert float(largest.max()) <= declared.max_units, f"{label}: sent {float(largest.max())} > declared {declared}"
        assert max(bits_of_values(s) for s in counters.payload.seen) <= declared.bits, label
    spike_acs, event_acs = counters.ops.per_step_spike.sum(), counters.ops.per_step[1].sum()
    assert spike_acs >= event_acs - 1e-6 * event_acs
    if declared.kind == "binary":
        assert float(largest.max()) == 1 and torch.equal(spikes, events)
        torch.testing.assert_close(spike_acs, event_acs)


def test_contract(case) -> None:
    cls, model, batches = case
    before, types = _state(model), [type(m) for m in model.modules()]
    kwargs = QUICK.get(cls.name, {})
    conv = cls(**kwargs)
    conv.check(model)
    summary = conv.calibrate(model, batches, lambda t: t) if conv.needs_calibration else {}
    variants = conv.convert(model)
    assert variants, f"{cls.__name__} built no spiking variant"
    x = batches[0]
    for label, snn in variants.items():
        with SimulationCounters(snn, device=x.device) as counters, torch.no_grad():  # raises on anything uncounted
            readout = snn(x)
        assert readout.shape == (len(snn.readout_steps), len(x), 5), label
        assert torch.isfinite(readout).all()
        assert snn.readout_steps[-1] <= snn.latency and int(snn.time_steps) >= 1
        assert counters.firing.counts[1].gt(0).all(), f"{label}: a neuron site never ran"
        assert counters.ops.per_step.sum() > 0
        _check_payload(label, conv.payload(), counters)
        report = spike_driven_check(snn, lambda s: s(x), exempt=snn.analog_layers())
        assert report.ok is cls.spike_driven, f"{label}: declared spike_driven={cls.spike_driven}; {report.summary()}"
    # the reference network is untouched: same modules, same values
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    if conv.needs_calibration:
        ranks = _calibrate_two_ranks(cls, model, batches)
        one_rank = [copy.deepcopy(v) for v in variants.values()]
        rank0 = list(ranks[0].convert(model).values())
        for (label, snn), ref, same in zip(ranks[1].convert(model).items(), one_rank, rank0, strict=True):
            with torch.no_grad():
                out = snn(x)
                torch.testing.assert_close(out, same(x), rtol=0, atol=0, msg=f"{label}: the two processes differ")
                if cls.calibration_is_exact_across_processes:
                    torch.testing.assert_close(out, ref(x), rtol=1e-6, atol=1e-6, msg=f"{label}: 2 processes != 1")
        assert summary  # a calibrating converter reports what it fixed


def test_spiking_model_constructor_refuses_impossible_steps():
    from csdlab.eval.api import SpikingModel

    class Null(SpikingModel):
        def forward(self, images):
            return images

        def sites(self):
            return {}

        def analog_layers(self):
            return []

    assert Null(3).readout_steps == [1, 2, 3] and Null(4, [4]).readout_steps == [4]
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="T \\(time steps\\) must be an integer >= 1"):
            Null(bad)
    for steps in ([], [0, 1], [2, 1], [1, 5]):
        with pytest.raises(ValueError, match="readout_steps must be increasing steps within 1..4"):
            Null(4, steps)
