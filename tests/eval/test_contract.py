"""The converter contract (csdlab/eval/api.py), checked for every registered converter, as timm tests
every model in its registry: a converter added to ``csdlab.convert`` is tested here automatically.

For each: the readout has one row per readout step; every parameterised module is counted or
declared (the counters raise otherwise); the reference network is left untouched; calibration in
two processes (simulated by two threads sharing an all-reduce) equals one process; the spike-driven
check passes on the converted variants.
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
from csdlab.eval.api import CONVERTERS, Converter
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


def _two_rank_all_reduce() -> list:
    """Two all-reduce functions (one per simulated process) that sum a tensor across both threads."""
    barrier, slots = threading.Barrier(2), [None, None]

    def make(rank: int):
        def all_reduce(t: Tensor) -> Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]  # the same order on both ranks
            barrier.wait()
            return total.to(t)
        return all_reduce
    return [make(0), make(1)]


def _calibrate_two_ranks(cls: type[Converter], model: nn.Module, batches: list[Tensor]) -> list[Converter]:
    convs, errors = [cls(**QUICK.get(cls.name, {})) for _ in range(2)], []
    fns = _two_rank_all_reduce()

    def run(r: int) -> None:
        try:
            convs[r].calibrate(model, batches[r::2], fns[r])
        except BaseException as e:  # noqa: BLE001  reported below
            errors.append(e)
            raise

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return convs


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_contract(case) -> None:
    cls, model, batches = case
    before, types = _state(model), [type(m) for m in model.modules()]
    kwargs = QUICK.get(cls.name, {})
    conv = cls(**kwargs)
    conv.check(model)
    summary = conv.calibrate(model, batches, lambda t: t) if cls.needs_calibration else {}
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
        report = spike_driven_check(snn, lambda s: s(x), exempt=snn.analog_layers())
        assert report.ok, f"{label}: {report.summary()}"
    # the reference network is untouched: same modules, same values
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    if cls.needs_calibration:
        ranks = _calibrate_two_ranks(cls, model, batches)
        one_rank = [copy.deepcopy(v) for v in variants.values()]
        for r in ranks:
            for (label, snn), ref in zip(r.convert(model).items(), one_rank, strict=True):
                with torch.no_grad():
                    torch.testing.assert_close(snn(x), ref(x), rtol=1e-6, atol=1e-6, msg=label)
        assert summary  # a calibrating converter reports what it fixed
