"""Device cleanliness without a GPU (issue 17): the simulations, with the evaluation's counters on,
run on PyTorch's ``meta`` device, where reading a tensor on the host (``.item()``, ``float()``,
``.cpu()``, ``bincount``'s size, boolean selection) raises and a tensor made on the CPU cannot be
mixed in: what would be a host synchronisation or a CPU tensor on a GPU fails here. The device-only
code paths are checked against the CPU ones for equal values."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import csdlab.convert.csdformer as csdformer_module
import csdlab.models  # noqa: F401  (registers csdformer_*)
from csdlab.convert.csdformer import convert_csdformer
from csdlab.convert.ecmt import ECMTConverter
from csdlab.convert.percentile import _topk_pair, percentile_pair
from csdlab.convert.mbe import MBEConverter
from csdlab.eval.api import SpikingModel
from csdlab.eval.counters import SimulationCounters
from csdlab.quant import ActQuantizer
from csdlab.snn import neurons
from csdlab.snn.ecmt import _step_column
from csdlab.snn.neurons import DelayedIFNode

META = torch.device("meta")


def _run_counted_on_meta(snn: SpikingModel, x: torch.Tensor) -> None:
    snn = snn.to(META)
    with torch.no_grad(), SimulationCounters(snn, device=META) as c:
        out = snn(x.to(META))
    assert out.device == META and c.firing.counts.device == META and c.ops.per_step.device == META


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2).eval()


@pytest.mark.parametrize("mode", ["multi", "single", "levels"])
def test_ecmt_simulation_and_counting_stay_on_the_device(mode: str) -> None:
    vit, x = _vit(), torch.randn(4, 3, 32, 32)
    conv = ECMTConverter(T=4, multi_step=mode != "single")
    conv.calibrate(vit, [x], lambda t: t)
    snn = conv.convert(vit)["T4"]
    for m in snn.sites().values():
        m.count_levels = mode == "levels"  # per-level histograms on the device too
    _run_counted_on_meta(snn, x)


def test_csdformer_simulation_and_counting_stay_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    qann = timm.create_model("csdformer_tiny", img_size=16, embed_dim=32).eval()
    x = torch.randn(2, 3, 16, 16)
    for q in qann.modules():
        if isinstance(q, ActQuantizer):
            q.train()  # LSQ's initial step sizes from one batch
    qann(x)
    # the NaN check of the input batch reads one flag per batch, by design (not per step or layer)
    monkeypatch.setattr(csdformer_module, "check_finite", lambda *args, **kwargs: None)
    _run_counted_on_meta(convert_csdformer(qann.eval()), x)


def test_mbe_simulation_and_counting_stay_on_the_device() -> None:
    vit, x = _vit(), torch.randn(4, 3, 32, 32)
    conv = MBEConverter(Ts=[8])
    conv.calibrate(vit, [x], lambda t: t)
    _run_counted_on_meta(conv.convert(vit)["T8"], x)


def test_device_percentiles_equal_the_cpu_selection() -> None:
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(300_000, generator=g), torch.rand(70_001, generator=g).pow(3) - 0.1,
              torch.randint(-5, 6, (200_000,), generator=g).float()):  # ties
        n = x.numel()
        ref = percentile_pair(x, 99.0)
        k_hi, k_lo = (int(torch.tensor(q / 100 * n).ceil()) for q in (99.0, 1.0))
        assert torch.equal(_topk_pair(x, n - k_hi + 1, k_lo), ref)
    assert percentile_pair(torch.randn(300_000).to(META), 99.0).device == META  # no selection by size


def test_step_column_is_the_python_arithmetic() -> None:
    like = torch.zeros(7, 2, 3)
    col = _step_column(3, 7, like, 0.125 ** 0.5 / 3)
    assert col.shape == (7, 1, 1)
    expected = torch.tensor([0.125 ** 0.5 / 3 / t for t in range(4, 11)], dtype=torch.float64).float()
    assert torch.equal(col.flatten(), expected)
    assert torch.equal(_step_column(0, 5, like).flatten(), torch.arange(1.0, 6.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dif_device_reset_is_bit_identical(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(4, 5000, generator=g) * 0.9).to(dtype)
    x[1, :10] = 0.3  # exact ties with theta somewhere along the way
    runs = []
    for host in (True, False):  # False: the GPU path (the threshold stays a device tensor)
        monkeypatch.setattr(neurons, "_host_scalars", lambda t, host=host: host)
        node = DelayedIFNode(torch.tensor(0.6, dtype=dtype), delay=3, compile_kernel=False)
        spikes = node(x)
        runs.append((spikes, node.v))
    assert runs[0][0].sum() > 0
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
