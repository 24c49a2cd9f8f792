"""ECMT: EC modules, timm ViT conversion, calibration (METHODS 2)."""

from __future__ import annotations

import pytest
import timm
import torch
from spikingjelly.activation_based import functional

from csdlab.convert.vit import calibrate, convert_vit, mt_sites, percentile, simulate
from csdlab.energy import OpCounter
from csdlab.snn.ecmt import ECFunction, ECMatMul


def _tiny_vit(**kwargs) -> torch.nn.Module:
    # vit_tiny's widths (192, 3 heads, 12 blocks) on 32x32 images: 16 patches + class token
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, **kwargs).eval()


def test_ec_function_running_mean_is_f_of_running_mean() -> None:
    torch.manual_seed(0)
    ec = ECFunction(torch.nn.GELU())
    x = torch.randn(6, 50)
    outs = torch.stack([ec(xt) for xt in x])
    t = torch.arange(1, 7).view(-1, 1)
    torch.testing.assert_close(outs.cumsum(0) / t, torch.nn.functional.gelu(x.cumsum(0) / t), atol=1e-6, rtol=0)


def test_ec_matmul_running_mean_is_product_of_running_means() -> None:
    torch.manual_seed(0)
    mm = ECMatMul(scale=0.5)
    a, b = torch.randn(5, 2, 4, 3), torch.randn(5, 2, 3, 6)
    outs = torch.stack([mm(a[i], b[i]) for i in range(5)])
    t = torch.arange(1, 6).view(-1, 1, 1, 1)
    expected = 0.5 * (a.cumsum(0) / t) @ (b.cumsum(0) / t)
    torch.testing.assert_close(outs.cumsum(0) / t, expected, atol=1e-5, rtol=0)


def test_ec_matmul_counts_additions_and_scalings() -> None:
    mm = ECMatMul()
    a = torch.zeros(1, 4, 8)
    a[0, 0, :2] = 1.0  # event fraction 2/32
    b = torch.ones(1, 8, 5)  # event fraction 1
    mm(a, b)
    macs, acs = mm.count_ops((a, b), mm(a, b))  # second step: all four parts of Eq. 43
    n, p, m, ea = 4, 8, 5, 2 / 32
    assert acs == pytest.approx((ea * 1 + ea + 1) * n * p * m + 3 * n * m)
    assert macs == pytest.approx((ea + ea + 1) * n * m + n * m)


@pytest.mark.parametrize("kwargs", [
    {},                                                       # class token, qkv bias
    {"global_pool": "avg", "class_token": False, "fc_norm": True, "qkv_bias": False},
])
def test_ec_only_snn_equals_ann_at_every_t(kwargs: dict) -> None:
    ann = _tiny_vit(**kwargs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = ann(x)
    readout = simulate(convert_vit(ann, spiking=False), x, T=6)
    err = (readout - ref).abs().amax(dim=(1, 2))
    assert readout.shape == (6, 2, 10) and err.max().item() < 1e-5, err


def test_spiking_snn_approaches_ann_and_counts_energy() -> None:
    ann = _tiny_vit(depth=2)
    torch.manual_seed(1)
    snn = convert_vit(ann, levels=8)
    th = calibrate(snn, [torch.randn(16, 3, 32, 32) for _ in range(2)], p=99.0)
    assert len(th) == 2 * 8 and th["blocks.0.attn.mt_attn"] == (0.0125, 0.0125)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = ann(x)
    with OpCounter(snn, analog=[snn.patch_embed.proj, snn.head]) as counter:
        readout = simulate(snn, x, T=10)
    err = (readout - ref).abs().mean(dim=(1, 2))
    assert err[-1] < 0.5 * err[0], err  # the logit error falls with T
    assert counter.total.acs > 0 and counter.total.macs > 0
    sites = mt_sites(snn)
    assert all(m.neuron_steps.item() > 0 for m in sites.values())
    assert sum(int(m.spike_counts.sum()) for m in sites.values()) > 0


@pytest.mark.parametrize(("name", "depth"), [("deit_tiny_patch16_224", 12), ("vit_small_patch16_224", 4)])
def test_timm_models_convert(name: str, depth: int) -> None:
    # vit_small keeps its width and heads; 4 of its 12 blocks keep this test quick on 2 CPU cores
    torch.manual_seed(0)
    ann = timm.create_model(name, depth=depth).eval()
    snn = convert_vit(ann, levels=8)
    assert len(mt_sites(snn)) == 8 * len(ann.blocks)
    out = simulate(snn, torch.randn(1, 3, 224, 224), T=2)
    assert out.shape == (2, 1, 1000) and torch.isfinite(out).all()
    functional.reset_net(snn)


def test_swin_gets_a_clear_error() -> None:
    swin = timm.create_model("swin_tiny_patch4_window7_224")
    with pytest.raises(ValueError, match=r"SwinTransformer.*WindowAttention x\d+ \(layers\.0\.blocks\.0\.attn"):
        convert_vit(swin)


def test_unknown_module_inside_a_vit_is_listed() -> None:
    ann = _tiny_vit(depth=1)
    ann.blocks[0].mlp.act = torch.nn.Hardswish()  # fine: any activation is wrapped by an EC
    convert_vit(ann)
    ann.blocks[0].ls1 = torch.nn.BatchNorm1d(17)
    with pytest.raises(ValueError, match=r"BatchNorm1d x1 \(blocks\.0\.ls1\)"):
        convert_vit(ann)


def test_percentile_above_16m_elements() -> None:
    x = torch.arange(17_000_000, dtype=torch.float32)  # torch.quantile refuses > 16M
    assert percentile(x[torch.randperm(x.numel())], 99.0).item() == pytest.approx(0.99 * 17_000_000, abs=2)
    assert percentile(x, 1.0).item() == pytest.approx(0.01 * 17_000_000, abs=2)
