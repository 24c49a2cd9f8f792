"""ECMT conversion of timm ViTs (docs/methods.md §2): the converter, the layer-by-layer simulation
against the single-step one and the ANN, calibration, operation counts, unsupported models."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import timm
import torch

from csdlab.convert.ecmt import (SEARCH_SCALES, ECMTConverter, best_scales, convert_vit, threshold_errors,
                                 thresholds_from_percentiles)
from csdlab.convert.ecmt_vit import AnalogEmbed, SpikingViT, mt_sites, site_modules
from csdlab.convert.percentile import percentile, percentile_pair
from csdlab.eval.api import SpikingModel
from csdlab.snn.ecmt import ECMatMul

def _tiny_vit(name: str = "vit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    # vit_tiny's widths (192, 3 heads) on 32x32 images: 16 patches + class token
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 2, **kwargs}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _images(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).to(dtype)


def _calibrated(ann: torch.nn.Module, **kwargs) -> ECMTConverter:
    conv = ECMTConverter(**kwargs)
    dtype = next(ann.parameters()).dtype
    conv.calibrate(ann, [_images(8, seed=s, dtype=dtype) for s in (10, 11)], lambda t: t)
    return conv


_VARIANTS = [
    ("vit_tiny_patch16_224", {}),  # class token, qkv bias
    ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": True, "qkv_bias": False}),
    ("deit_tiny_distilled_patch16_224", {}),  # class + distillation token, two heads averaged
]


@pytest.mark.parametrize(("name", "kwargs"), _VARIANTS)
def test_multi_step_equals_single_step_at_every_t(name: str, kwargs: dict) -> None:
    ann = _tiny_vit(name, **kwargs).double()
    conv = _calibrated(ann, T=6)
    multi = conv.convert(ann)["T6"]
    conv.multi_step = False
    single = conv.convert(ann)["T6"]
    x = _images(5, dtype=torch.float64)
    ref = single(x)
    assert ref.shape == (6, 5, 10)
    assert (multi(x) - ref).abs().max().item() <= 1e-12
    chunked = SpikingViT(multi.net, 6, images_per_pass=2)  # 2 + 2 + 1 images per pass
    assert (chunked(x) - ref).abs().max().item() <= 1e-12
    # the spiking network is not the ANN at t = 1 and gets closer with t
    err = (ref - ann(x)).abs().mean(dim=(1, 2))
    assert err[-1] < 0.5 * err[0], err


@pytest.mark.parametrize(("name", "kwargs"), _VARIANTS)
@pytest.mark.parametrize("multi_step", [True, False])
def test_ec_only_snn_equals_ann_at_every_t(name: str, kwargs: dict, multi_step: bool) -> None:
    ann = _tiny_vit(name, **kwargs).double()
    x = _images(3, dtype=torch.float64)
    with torch.no_grad():
        ref = ann(x)
    readout = SpikingViT(convert_vit(ann, spiking=False), 6, multi_step=multi_step)(x)
    err = (readout - ref).abs().amax(dim=(1, 2))
    assert readout.shape == (6, 3, 10) and err.max().item() < 1e-6, err
    # float32 too, within rounding
    ann32 = ann.float()
    err32 = (SpikingViT(convert_vit(ann32, spiking=False), 6, multi_step=multi_step)(x.float()) - ann32(x.float()))
    assert err32.abs().max().item() < 1e-4


def test_distilled_deit_averages_its_two_heads() -> None:
    ann = _tiny_vit("deit_tiny_distilled_patch16_224")
    snn = _calibrated(ann, T=3).convert(ann)["T3"]
    assert type(snn.net).__name__ == "VisionTransformerDistilled" and ann.num_prefix_tokens == 2
    assert snn.analog_layers()[-2:] == [snn.net.head, snn.net.head_dist]
    # EC only: the two heads' mean, as timm's eval forward
    ec = SpikingViT(convert_vit(ann, spiking=False), 2)
    x = _images(2)
    torch.testing.assert_close(ec(x)[-1], ann(x), atol=1e-4, rtol=0)


def test_spiking_vit_contract() -> None:
    ann = _tiny_vit()
    snn = _calibrated(ann, T=4).convert(ann)["T4"]
    assert isinstance(snn, SpikingModel) and snn.time_steps == 4 and snn.readout_steps == [1, 2, 3, 4]
    assert snn.time_flattened()
    sites = snn.sites()
    assert len(sites) == 8 * 2 and list(sites)[:2] == ["blocks.0.attn.mt_in", "blocks.0.attn.mt_q"]
    analog = snn.analog_layers()
    assert analog == [snn.net.patch_embed, snn.net.patch_embed.embed.proj, snn.net.head]
    keys = snn.state_dict()
    assert "net.blocks.0.attn.mt_in.th1" in keys and not any("spike_counts" in k or "neuron_steps" in k for k in keys)
    x = _images(3)
    before = {k: v.clone() for k, v in ann.state_dict().items()}
    snn(x)
    assert all(torch.equal(before[k], v) for k, v in ann.state_dict().items())  # the ANN is untouched


def test_per_step_op_counts_equal_single_step_counts() -> None:
    ann = _tiny_vit().double()
    conv = _calibrated(ann, T=5)
    x = _images(4, dtype=torch.float64)

    def counts(snn: SpikingViT) -> dict[str, list[tuple[float, float]]]:
        """(MACs, ACs) per step of every module that counts itself."""
        out: dict[str, list] = {}

        def hook(name: str):
            def fn(mod, inputs, output):
                macs, acs = mod.count_ops(inputs, output)
                if isinstance(macs, torch.Tensor) and macs.dim() == 1:  # one multi-step call: one entry per step
                    out.setdefault(name, []).extend(zip(macs.tolist(), acs.tolist()))
                else:  # one step: floats, or 0-d tensors (ECMatMul: kept on the device)
                    out.setdefault(name, []).append((float(macs), float(acs)))
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in snn.net.named_modules()
                   if isinstance(m, (ECMatMul, AnalogEmbed))]
        snn(x)
        for h in handles:
            h.remove()
        return out

    multi = counts(conv.convert(ann)["T5"])
    conv.multi_step = False
    single = counts(conv.convert(ann)["T5"])
    assert set(multi) == set(single) and len(multi) == 1 + 2 * 2  # patch embedding, qk and av per block
    for name in single:
        assert len(multi[name]) == len(single[name]) == 5
        for (m1, a1), (m2, a2) in zip(multi[name], single[name]):
            assert m1 == pytest.approx(m2, rel=1e-12) and a1 == pytest.approx(a2, rel=1e-12), name
    assert single["patch_embed"][0][0] == 4 * 16 * 192 * 3 * 8 * 8  # B x patches x D x (C k k)


def _reference_percentiles(ann: torch.nn.Module, batches: list[torch.Tensor], p: float) -> dict[str, tuple]:
    """Site activations read off the float timm model itself (hooks), percentiles by sorting."""
    acts: dict[str, torch.Tensor] = {}

    def pre(name: str):
        return lambda mod, inputs: acts.__setitem__(name, inputs[0])

    def qkv_out(name: str, attn):
        def fn(mod, inputs, output):
            q, k, v = output.reshape(*output.shape[:2], 3, -1).unbind(2)
            acts[f"{name}.mt_q"], acts[f"{name}.mt_k"], acts[f"{name}.mt_v"] = q, k, v
        return fn

    handles = []
    for name, m in ann.named_modules():
        if type(m).__name__ == "Attention":
            handles += [m.qkv.register_forward_pre_hook(pre(f"{name}.mt_in")),
                        m.qkv.register_forward_hook(qkv_out(name, m)),
                        m.proj.register_forward_pre_hook(pre(f"{name}.mt_proj"))]
        elif type(m).__name__ == "Mlp":
            handles += [m.fc1.register_forward_pre_hook(pre(f"{name}.mt_fc1")),
                        m.fc2.register_forward_pre_hook(pre(f"{name}.mt_fc2"))]

    def nearest_rank(x: torch.Tensor, q: float) -> float:
        s = x.flatten().float().sort().values
        return s[min(max(math.ceil(q / 100 * s.numel() - 1e-9), 1), s.numel()) - 1].item()

    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for x in batches:
            ann(x)
            for name, a in acts.items():
                hi_lo = sums.setdefault(name, [0.0, 0.0])
                hi_lo[0] += nearest_rank(a, p)
                hi_lo[1] += nearest_rank(a, 100 - p)
    for h in handles:
        h.remove()
    return {n: (hi / len(batches), -lo / len(batches)) for n, (hi, lo) in sums.items()}


def test_calibration_equals_reference_percentiles_and_two_processes_equal_one() -> None:
    ann = _tiny_vit(depth=2).double()  # float64: the SNN layout's operation order changes nothing
    # one batch larger than a default simulation pass (160 images at T = 1): still one percentile
    batches = [_images(n, seed=s, dtype=torch.float64) for s, n in enumerate((8, 170, 8, 8))]
    paper = {"percentile": 97.0, "threshold_search": False}  # the percentiles themselves
    conv = ECMTConverter(**paper)
    summary = conv.calibrate(ann, batches, lambda t: t)
    assert summary["batches"] == 4 and set(summary["thresholds"]) == set(conv.thresholds)
    ref = _reference_percentiles(ann, batches, 97.0)
    assert len(conv.thresholds) == 16 and len(ref) == 14  # two softmax sites take the fixed 0.0125
    for name, th in conv.thresholds.items():
        if name.endswith("mt_attn"):
            assert th == (0.0125, 0.0125)
        else:
            assert th == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name
    # two processes, two batches each: per-process sums, then all_reduce adds the other's share
    shared = []
    rank1 = ECMTConverter(**paper)
    rank1.calibrate(ann, batches[2:], lambda t: shared.append(t.clone()) or t)
    rank0 = ECMTConverter(**paper)
    rank0.calibrate(ann, batches[:2], lambda t: t + shared[0])
    for name, th in conv.thresholds.items():
        assert rank0.thresholds[name] == pytest.approx(th, rel=1e-12), name


def test_calibration_fixed_thresholds_override_percentiles() -> None:
    ann = _tiny_vit(depth=1)
    conv = ECMTConverter(softmax_threshold=None, gelu_thresholds=(0.25, 0.08))
    conv.calibrate(ann, [_images(4)], lambda t: t)
    assert conv.thresholds["blocks.0.mlp.mt_fc2"] == (0.25, 0.08)
    th1, th2 = conv.thresholds["blocks.0.attn.mt_attn"]  # softmax from its percentile: positive only
    assert 0 < th1 <= 1 and th2 == th1  # no negative activations: the negative side mirrors


@pytest.mark.parametrize("shape", [(17_000_000,), (64, 197, 384), (1000, 500)])
def test_percentile_is_exact(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    if len(shape) == 2:  # heavy ties: mostly zeros, like a post-softmax / sparse tensor
        x = x * (torch.rand(shape) < 0.02)
    ordered = np.sort(x.flatten().numpy())  # an independent oracle: a sorted copy ...

    def kth(q: float) -> float:
        # ... and the nearest rank ceil(q n / 100) in exact rational arithmetic (numpy's
        # inverted_cdf computes 0.999 * 17e6 in float64 as 16983000.000000004, one rank too far)
        rank = min(max(math.ceil(Fraction(str(q)) * ordered.size / 100), 1), ordered.size)
        return float(ordered[rank - 1])

    for q in (99.0, 1.0, 99.9, 50.0):
        assert percentile(x, q).item() == kth(q), q
    for p in (99.0, 99.9, 100.0, 60.0):
        assert percentile_pair(x, p).tolist() == [kth(p), kth(100 - p)], p
    if shape == (17_000_000,):  # torch.quantile refuses > 16M elements
        assert percentile(torch.arange(17_000_000.0), 99.0).item() == pytest.approx(0.99 * 17_000_000, abs=2)


def test_converter_rejects_bad_arguments() -> None:
    for kwargs, match in [({"T": 0}, "T must be"), ({"levels": 0}, "levels must be"),
                          ({"percentile": 50.0}, r"percentile must be in \(50, 100\]"),
                          ({"percentile": 101.0}, "percentile"), ({"softmax_threshold": 0.0}, "softmax_threshold"),
                          ({"gelu_thresholds": (0.25, -0.1)}, "gelu_thresholds"),
                          ({"images_per_pass": 0}, "images_per_pass")]:
        with pytest.raises(ValueError, match=match):
            ECMTConverter(**kwargs)
    ann = _tiny_vit(depth=1)
    with pytest.raises(ValueError, match="run calibrate"):
        ECMTConverter().convert(ann)
    with pytest.raises(ValueError, match="no batches"):
        ECMTConverter().calibrate(ann, [], lambda t: t)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_small_patch16_224"])
def test_timm_models_convert(name: str) -> None:
    torch.manual_seed(0)
    ann = timm.create_model(name, pretrained=False).eval()
    conv = ECMTConverter(T=2)
    conv.check(ann)
    conv.calibrate(ann, [torch.randn(1, 3, 224, 224)], lambda t: t)
    snn = conv.convert(ann)["T2"]
    assert len(snn.sites()) == 8 * len(ann.blocks) == len(site_modules(snn.net))
    out = snn(torch.randn(1, 3, 224, 224))
    assert out.shape == (2, 1, 1000) and torch.isfinite(out).all()


def test_swin_gets_a_clear_error() -> None:
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    with pytest.raises(ValueError, match=r"SwinTransformer.*WindowAttention x\d+ \(layers\.0\.blocks\.0\.attn"):
        ECMTConverter().check(swin)
    assert all(p.device.type == "cpu" for p in swin.parameters())  # check() left the model alone


def test_unknown_module_inside_a_vit_is_listed() -> None:
    ann = _tiny_vit(depth=1)
    ann.blocks[0].mlp.act = torch.nn.Hardswish()  # fine: any activation is wrapped by an EC
    ECMTConverter().check(ann)
    ann.blocks[0].ls1 = torch.nn.BatchNorm1d(17)
    with pytest.raises(ValueError, match=r"BatchNorm1d x1 \(blocks\.0\.ls1\)"):
        ECMTConverter().check(ann)
    with pytest.raises(ValueError, match="attention pooling"):
        ECMTConverter().check(_tiny_vit(depth=1, global_pool="map"))


def test_mt_sites_of_a_converted_network() -> None:
    snn = convert_vit(_tiny_vit(depth=2))
    assert len(mt_sites(snn)) == 16 and list(mt_sites(snn)) == list(site_modules(snn))
    assert all(type(m).__name__ == "Identity" for m in site_modules(convert_vit(_tiny_vit(depth=1),
                                                                               spiking=False)).values())


@pytest.mark.parametrize("multi_step", [True, False])
def test_spike_driven_check_certifies_graded_spikes(multi_step: bool) -> None:
    """Every Linear and EC product of the ECMT network reads graded spikes of its MT neuron's
    alphabet (observed value by value); the EC-only network (no MT neurons) reads analog values."""
    from csdlab.eval.checks import spike_driven_check

    ann = _tiny_vit(depth=2)
    x = _images(2)
    snn = _calibrated(ann, T=4).convert(ann)["T4"]
    if not multi_step:
        snn = SpikingViT(snn.net, 4, multi_step=False)
    report = spike_driven_check(snn, lambda s: s(x), exempt=snn.analog_layers())
    assert report.ok, report.summary()
    assert report.operand_kinds() == {"graded": sum(not c.exempt for c in report.layers)} == {"graded": 12}
    assert {c.name for c in report.layers if c.kind == "ECMatMul"} == {f"net.blocks.{i}.attn.{p}" for i in (0, 1)
                                                                       for p in ("qk", "av")}
    assert all(s.calls and not s.failures for s in report.sources)

    ec_only = SpikingViT(convert_vit(ann, spiking=False), 4, multi_step=multi_step)
    report = spike_driven_check(ec_only, lambda s: s(x), exempt=ec_only.analog_layers())
    assert not report.ok and "net.blocks.0.attn.qkv" in report.violations and not report.sources


def test_spike_driven_check_sees_a_level_outside_the_alphabet() -> None:
    from csdlab.eval.checks import spike_driven_check

    ann = _tiny_vit(depth=1)
    x = _images(2)
    snn = _calibrated(ann, T=4).convert(ann)["T4"]
    mt = snn.net.blocks[0].mlp.mt_fc1
    mt.register_forward_hook(lambda m, i, o: o * 1.5)  # a payload the neuron cannot send
    report = spike_driven_check(snn, lambda s: s(x), exempt=snn.analog_layers())
    assert not report.ok and report.violations == ["net.blocks.0.mlp.fc1"]
    assert [s.name for s in report.sources if s.failures] == ["net.blocks.0.mlp.mt_fc1"]


# -- low-latency options (docs/methods.md §2.5) ----------------------------------------------------

def test_threshold_errors_by_hand() -> None:
    # half the activations at 1.0, half at 3.0; base thresholds 1, paper rule, one step: the output is
    # the level of Eq. 25 (levels s 2^k; the largest with x >= s 2^k - s/2), error (x - level)^2
    x = torch.tensor([1.0, 3.0, 1.0, 3.0])
    scales = [0.5, 1.0, 1.5, 2.0, 3.0]
    # s = 0.5: 1 -> 1, 3 -> 2 (4 needs 3.75); s = 1: 1 -> 1, 3 -> 2; s = 1.5: 1 -> 1.5, 3 -> 3;
    # s = 2: 1 -> 2, 3 -> 4; s = 3: 1 -> 0 (below 1.5), 3 -> 3
    per_pair = [1.0, 1.0, 0.25, 2.0, 1.0]
    errors = threshold_errors(x, 1.0, 1.0, scales, steps=1, levels=4, samples=None)
    assert errors.dtype == torch.float64
    torch.testing.assert_close(errors, 2 * torch.tensor(per_pair, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert best_scales(errors.unsqueeze(0), scales) == [1.5]  # the error-minimising threshold
    # two steps at s = 1.5: x = 1 fires 1.5 then stays silent (membrane -0.5 + 1 = 0.5 < 0.75):
    # running means 1.5, 0.75 -> errors 0.25 + 0.0625; x = 3 fires 3, 3 -> 0
    two = threshold_errors(x, 1.0, 1.0, [1.5], steps=2, levels=4, samples=None)
    assert two.item() == pytest.approx(2 * (0.25 + 0.0625), rel=1e-6)
    # the nearest-level rule at s = 1: 3 is midway between 2 and 4 (3.1 fires 4, error 0.81)
    near = threshold_errors(torch.tensor([3.1]), 1.0, 1.0, [1.0], steps=1, levels=4, nearest_level=True,
                            samples=None)
    assert near.item() == pytest.approx(0.81, rel=1e-5)


def test_search_ties_go_to_the_larger_threshold() -> None:
    # constant activations c with base threshold c: every scale 2^-k (c = th 2^k exactly) and 1 are
    # exact; the search keeps 1, the largest exact threshold (2 fires 2c: error c^2)
    c = 0.3
    errors = threshold_errors(torch.full((100,), c), c, c, SEARCH_SCALES, steps=4, samples=None)
    exact = [s for s, e in zip(SEARCH_SCALES, errors.tolist()) if e < 1e-12]
    assert 0.5 in exact and 1.0 in exact and 2.0 not in exact
    assert best_scales(errors.unsqueeze(0), SEARCH_SCALES) == [1.0]
    with pytest.raises(ValueError, match="one column per scale"):
        best_scales(errors.unsqueeze(0), [1.0, 2.0])


def test_threshold_search_scales_percentile_thresholds_by_the_least_error_and_processes_add_up() -> None:
    ann = _tiny_vit(depth=1).double()
    batches = [_images(8, seed=s, dtype=torch.float64) for s in range(4)]
    plain = ECMTConverter(T=4, threshold_search=False)
    plain.calibrate(ann, batches, lambda t: t)
    conv = ECMTConverter(T=4, threshold_search=True, nearest_level=True)
    summary = conv.calibrate(ann, batches, lambda t: t)
    scales = summary["search_scales"]
    assert set(scales) == {n for n in conv.thresholds if not n.endswith("mt_attn")}  # the fixed site stays
    assert conv.thresholds["blocks.0.attn.mt_attn"] == (0.0125, 0.0125)
    for name, s in scales.items():
        assert s in SEARCH_SCALES
        assert conv.thresholds[name] == pytest.approx(tuple(s * v for v in plain.thresholds[name]), rel=1e-12)
    # the chosen scale is the least summed error of the site's activations, batch by batch
    acts: dict[str, list[torch.Tensor]] = {}
    float_net = SpikingViT(convert_vit(ann, spiking=False), time_steps=1)
    sites = site_modules(float_net.net)
    name = "blocks.0.mlp.mt_fc1"
    handle = sites[name].register_forward_hook(lambda m, i, o: acts.setdefault(name, []).append(i[0]))
    with torch.no_grad():
        for x in batches:
            float_net(x)
    handle.remove()
    total = sum(threshold_errors(a, *percentile_thresholds(a), SEARCH_SCALES, 4, nearest_level=True)
                for a in acts[name])
    assert scales[name] == best_scales(total.unsqueeze(0), SEARCH_SCALES)[0]
    assert scales[name] < 1  # below the percentile: a finer first step pays for its clipping
    # two processes, two batches each, give the same thresholds as one
    shared = []
    rank1 = ECMTConverter(T=4, threshold_search=True, nearest_level=True)
    rank1.calibrate(ann, batches[2:], lambda t: shared.append(t.clone()) or t)
    rank0 = ECMTConverter(T=4, threshold_search=True, nearest_level=True)
    rank0.calibrate(ann, batches[:2], lambda t: t + shared[0])
    for site, th in conv.thresholds.items():
        assert rank0.thresholds[site] == pytest.approx(th, rel=1e-12), site


def percentile_thresholds(a: torch.Tensor, p: float = 99.0) -> tuple[float, float]:
    return thresholds_from_percentiles(*percentile_pair(a, p).tolist())


def test_neuron_options_reach_every_site_and_change_t1() -> None:
    ann = _tiny_vit(depth=1).double()
    x = _images(3, dtype=torch.float64)
    outs = {}
    for opts in ({"nearest_level": False}, {"nearest_level": True}, {"nearest_level": False, "initial_membrane": 0.5}):
        conv = _calibrated(ann, T=2, **opts)
        snn = conv.convert(ann)["T2"]
        neurons = mt_sites(snn.net).values()
        assert all(n.nearest_level == opts["nearest_level"] for n in neurons)
        assert all(n.initial_membrane == opts.get("initial_membrane", 0.0) for n in neurons)
        outs[(opts["nearest_level"], opts.get("initial_membrane", 0.0))] = snn(x)
    paper = outs[(False, 0.0)]  # t = 1 (row 0) differs from the paper's neuron under each option
    assert not torch.equal(paper[0], outs[(True, 0.0)][0])
    assert not torch.equal(paper[0], outs[(False, 0.5)][0])


def test_converter_rejects_bad_low_latency_options() -> None:
    for kwargs, match in [({"initial_membrane": 1.0}, r"initial_membrane is a fraction of the threshold th1 in \[0, 1\)"),
                          ({"initial_membrane": -0.5}, "initial_membrane"),
                          ({"threshold_search": True, "search_steps": 0}, "search_steps must be an integer >= 1"),
                          ({"search_steps": 4, "threshold_search": False}, "threshold_search is off: set threshold_search: true"),
                          ({"threshold_search": "yes"}, "threshold_search must be true or false"),
                          ({"nearest_level": 1}, "nearest_level must be true or false")]:
        with pytest.raises(ValueError, match=match):
            ECMTConverter(**kwargs)
