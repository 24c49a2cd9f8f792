"""CSDformer -> SNN conversion (docs/methods.md §1.3-1.4): exactness in float64, errors, spike-driven check,
energy counting, save / load."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import csdlab.models  # noqa: F401  (registers csdformer_* in timm)
from csdlab.convert.csdformer import SpikingCSDformer, convert_csdformer, load_snn, save_snn
from csdlab.convert.passes import fold_batchnorm_, swap_modules
from csdlab.eval.counters import OpCounter, ann_macs, energy_ratio
from csdlab.quant import ActQuantizer
from csdlab.eval.checks import spike_driven_check
from csdlab.snn.neurons import DelayedIFNode

# csdformer_tiny (2 blocks, 4 heads, pools in m3, m4) and a second layout: 2 blocks, 4 heads,
# max-pools in m1 and m2, other width / size / classes
MODELS = {
    "tiny": ("csdformer_tiny", {}),
    "2x4_pool12": ("csdformer_tiny", dict(embed_dim=48, img_size=16, pool_stages=(1, 2), num_classes=7)),
}


def random_qann(name: str, kwargs: dict, batch: int = 2, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A float64 QANN with random weights, random BN statistics and random LSQ steps set near
    the activation scale (so quantizers hit every level, not only 0 / saturation), and inputs."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).double()
    for bn in model.modules():
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_(0, 0.3)
    size = model.img_size
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    quantizers = [q for q in model.modules() if isinstance(q, ActQuantizer)]
    model.eval()
    for q in quantizers:
        q.train()  # LSQ's statistical init, layer by layer, on this batch
    with torch.no_grad():
        model(x)
    model.eval()
    for q in quantizers:
        q.step_size.data.mul_(torch.empty((), dtype=torch.float64).uniform_(0.7, 1.3))
    return model, x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=list(MODELS))
def qann(request: pytest.FixtureRequest) -> tuple[nn.Module, torch.Tensor]:
    return random_qann(*MODELS[request.param])


@pytest.fixture(scope="module")
def snn(qann: tuple[nn.Module, torch.Tensor]) -> SpikingCSDformer:
    """The default conversion (T = L = 4, D = 3), shared by the read-only tests."""
    return convert_csdformer(qann[0])


def test_snn_equals_qann_float64(qann: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = qann
    levels: dict[int, torch.Tensor] = {}

    def record(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        levels[id(m)] = out.div(m.step).round().unique()

    hooks = [q.register_forward_hook(record) for q in model.modules() if isinstance(q, ActQuantizer)]
    with torch.no_grad():
        ref = model(x)
    for h in hooks:
        h.remove()
    # non-trivial quantization: most quantizers use at least 3 of the 5 levels
    assert sum(len(v) >= 3 for v in levels.values()) >= 0.8 * len(levels)
    with torch.no_grad():
        exact = convert_csdformer(model, delay=3)(x)[-1]  # readout after the last slot
        plain_if = convert_csdformer(model, delay=0)(x)[-1]
    assert exact.dtype == torch.float64
    assert rel_err(exact, ref) < 1e-6
    assert rel_err(plain_if, ref) > 1e-3  # D = 0 is not exact: the test can fail


def test_readout_after_every_slot_and_default_delay(qann: tuple[nn.Module, torch.Tensor], snn: SpikingCSDformer) -> None:
    model, x = qann
    assert (snn.time_steps, snn.delay) == (4, 3)
    with torch.no_grad():
        slots = snn(x)
        ref = model(x)
    assert slots.shape == (4, *ref.shape)
    assert rel_err(slots[-1], ref) < 1e-6
    assert rel_err(slots[0], ref) > 1e-3  # one slot alone is not the answer


def test_spike_driven(qann: tuple[nn.Module, torch.Tensor], snn: SpikingCSDformer) -> None:
    model, x = qann
    report = spike_driven_check(snn, lambda s: s(x), exempt=[snn.first_conv, snn.head])
    assert report.ok, report.violations
    assert [c.exempt for c in report.layers].count(True) == 2
    n_blocks = len(model.blocks)
    # 5 convs + per block (q, k, v, proj, fc1, fc2 + 2 products) + head
    assert len(report.layers) == 5 + 8 * n_blocks + 1
    # the same check fails when the first conv is not exempted
    assert spike_driven_check(snn, lambda s: s(x), exempt=[snn.head]).violations == ["model.tokenizer.stages.0.conv.conv"]


def test_energy_counts(qann: tuple[nn.Module, torch.Tensor], snn: SpikingCSDformer) -> None:
    model, x = qann
    counter = OpCounter(snn, analog=snn.analog_layers(), steps=snn.time_steps, time_flattened=True,
                        uncounted=snn.uncounted_modules())
    with counter, torch.no_grad():
        snn(x)
    ann = ann_macs(model, x)
    total_macs, total_acs = counter.per_step.sum(1).tolist()
    # only the image conv and the head multiply: T = 4 dense calls each, one per step
    first = counter.layers["model.tokenizer.stages.0.conv.conv"]
    head = counter.layers["model.head"]
    assert total_macs == pytest.approx(float(first[0].sum() + head[0].sum()))
    assert float(first[0].sum()) == pytest.approx(4 * ann_macs(model.tokenizer.stages[0].conv.conv, x))
    assert first[0].tolist() == pytest.approx([float(first[0, 0])] * 4)  # the same at every step
    assert total_acs > 0 and sum(float(v[1].sum()) for k, v in counter.layers.items() if "qk" in k) > 0
    assert 0 < energy_ratio(total_macs, total_acs, ann) < 4


def test_passes_count_what_they_change() -> None:
    model, x = random_qann("csdformer_tiny", {}, batch=2)
    with torch.no_grad():
        ref = model(x)
    folded = fold_batchnorm_(model)
    assert len(folded) == 5 + 2 * 6  # 5 ConvBN + 6 LinearBN per block
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
    with torch.no_grad():
        assert rel_err(model(x), ref) < 1e-12
    swapped = swap_modules(model, {nn.MaxPool2d: lambda m: nn.Identity()})
    assert swapped == ["tokenizer.stages.3.pool", "tokenizer.stages.4.pool"]


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="float CSDformer"):
        convert_csdformer(timm.create_model("csdformer_tiny", act="relu"))
    qann = timm.create_model("csdformer_tiny")
    with pytest.raises(ValueError, match="time_steps=8 differs"):
        convert_csdformer(qann, time_steps=8)
    with pytest.raises(ValueError, match="delay must be an integer >= 0"):
        convert_csdformer(qann, delay=-1)
    with pytest.raises(ValueError, match="takes a csdlab CSDformer"):
        convert_csdformer(nn.Linear(2, 2))  # type: ignore[arg-type]
    snn = convert_csdformer(qann, time_steps=8, allow_time_steps_mismatch=True)
    assert snn.time_steps == 8


def test_save_load_roundtrip(tmp_path) -> None:
    model, x = random_qann("csdformer_tiny", {}, batch=2)
    model = model.float()
    snn = convert_csdformer(model, delay=2, config={"model_name": "csdformer_tiny", "model_kwargs": {}})
    path = save_snn(snn, tmp_path / "snn.pt")
    loaded = load_snn(path)
    assert isinstance(loaded, SpikingCSDformer) and loaded.delay == 2
    assert sum(isinstance(m, DelayedIFNode) for m in loaded.modules()) == 4 + 2 * 8
    with torch.no_grad():
        assert torch.equal(loaded(x.float()), snn(x.float()))
    assert loaded(x.float()).shape == (4, 2, 10)  # readout after each of the T = 4 slots
