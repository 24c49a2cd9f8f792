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
    {"global_pool": "avg", "class_token": False, "fc_norm": True, "qkv_bias": False, "depth": 4},
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


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_small_patch16_224"])
def test_timm_models_convert(name: str) -> None:
    torch.manual_seed(0)
    ann = timm.create_model(name).eval()
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


_DIGITS_VIT = {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10, "depth": 2, "embed_dim": 64,
               "num_heads": 2}


def _digits_checkpoint(path) -> str:
    torch.manual_seed(0)
    ckpt = path / "vit_digits.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", **_DIGITS_VIT).state_dict(), ckpt)
    return str(ckpt)


def test_ecmt_command_one_process(tmp_path) -> None:
    from csdlab.commands.ecmt import ecmt

    r = ecmt(model="vit_tiny_patch16_224", model_kwargs=_DIGITS_VIT, checkpoint=_digits_checkpoint(tmp_path),
             data="digits", T=3, calib_batches=2, batch_size=32, limit=64, accelerator="cpu",
             out_dir=str(tmp_path / "out"))
    assert r["samples"] == 64 and len(r["snn_acc"]) == 3 and len(r["energy_ratio"]) == 3
    assert r["logit_error"][2] < r["logit_error"][0]
    assert 0 < r["energy_ratio"][0] < r["energy_ratio"][2]  # cumulative energy grows with t
    assert all(0 <= v <= 1 for v in r["firing_rate"].values()) and len(r["firing_rate"]) == 16
    rates = r["firing_rate_per_level"]["blocks.0.attn.mt_in"]["rate"]
    assert len(rates) == 16 and sum(rates) == pytest.approx(r["firing_rate"]["blocks.0.attn.mt_in"])
    assert (tmp_path / "out" / "figures.json").is_file() and (tmp_path / "out" / "accuracy_vs_t.png").is_file()


@pytest.mark.slow
def test_ecmt_ddp_two_processes_match_one(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(root / "convert.py"), "ecmt", "--model", "vit_tiny_patch16_224",
            "--model-kwargs", json.dumps(_DIGITS_VIT), "--checkpoint", _digits_checkpoint(tmp_path),
            "--data", "digits", "--T", "3", "--calib-batches", "4", "--batch-size", "32", "--limit", "150",
            "--accelerator", "cpu"]
    figures = []
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        extra = ["--devices", str(devices)] + (["--strategy", "ddp"] if devices > 1 else [])
        subprocess.run(args + extra + ["--out-dir", str(out)], check=True, cwd=root, timeout=600,
                       capture_output=True)
        figures.append(json.loads((out / "figures.json").read_text()))
    (one, two) = (f["figures"] for f in figures)
    assert figures[1]["world_size"] == 2 and one["samples"] == two["samples"] == 150
    assert one["ann_acc"] == two["ann_acc"] and one["snn_acc"] == two["snn_acc"]
    for site, (a1, a2) in one["thresholds"].items():
        assert two["thresholds"][site] == pytest.approx([a1, a2], rel=1e-6)
    assert two["logit_error"] == pytest.approx(one["logit_error"], rel=1e-5)
    assert two["energy_ratio"] == pytest.approx(one["energy_ratio"], rel=1e-5)
    assert two["firing_rate"] == pytest.approx(one["firing_rate"], rel=1e-9)
