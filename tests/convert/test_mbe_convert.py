"""MBE conversion of timm ViTs (docs/methods.md §4): exactness, switches, bad input, the converter."""

import pytest
import timm
import torch
from torch import nn

from csdlab.convert.mbe import GROUPS, MBEConverter, calibrate_ranges, convert_vit_mbe, identity_sites
from csdlab.convert.mbe_vit import EXACT_GROUPS, IDENTITY_ROLES, MBESpikingModel, mbe_sites
from csdlab.eval.api import Converter, SpikingModel
from csdlab.eval.counters import SimulationCounters
from csdlab.snn.mbe import MBENeuron
from csdlab.snn import mbe_fit
from csdlab.snn.mbe_fit import FitConfig, fit_primitive, initial_code, variant_codes
from csdlab.snn.mbe_ops import MBELayerNorm, MBELinear, MBEProduct, MBESoftmax


def small_vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg", "fc_norm": True, "class_token": False},
                                {"qkv_bias": False, "qk_norm": True}])
def test_exact_neurons_equal_the_ann(kw):
    model = small_vit(**kw)
    x = torch.randn(4, 1, 16, 16)
    snn = convert_vit_mbe(model, 8, 8, 4, exact=True)
    with torch.no_grad():
        torch.testing.assert_close(snn(x), model(x), rtol=0, atol=1e-5)
    # every operation group is converted, and the ANN's own Linear layers are reused (same weights)
    kinds = {type(m) for m in snn.modules()}
    assert {MBELayerNorm, MBESoftmax, MBEProduct, MBELinear, MBENeuron} <= kinds
    assert not any(type(m) is nn.LayerNorm for m in snn.modules())
    assert torch.equal(snn.blocks[0].attn.qkv.linear.weight, model.blocks[0].attn.qkv.weight)


def test_float64_and_spiking_close_to_ann():
    # an untrained ViT's MLP sees inputs of ~0.1, where the GELU neuron's absolute error (fitted on
    # (-120, 10)) is large relative to them: GELU stays exact here (the trained ViT: slow tests)
    model = small_vit().double()
    x = torch.randn(8, 1, 16, 16, dtype=torch.float64)
    ranges = calibrate_ranges(model, [x], lambda t: t, T=16, gelu=False)
    snn = convert_vit_mbe(model, 16, 8, 4, ranges, gelu=False)
    with torch.no_grad():
        ref, out = model(x), snn(x)
    assert out.dtype == torch.float64
    assert float((out - ref).abs().max()) <= 0.01 * float(ref.abs().max())


@pytest.mark.parametrize("group", GROUPS)
def test_each_group_alone(group):
    model = small_vit()
    switches = {g: g == group for g in GROUPS}
    snn = convert_vit_mbe(model, 8, 8, 4, **switches)
    prims = {m.code.primitive for m in mbe_sites(snn).values()}
    expected = {"gelu": {"gelu"}, "softmax": {"exp2", "recip"}, "layernorm": {"identity", "rsqrt"},
                "products": {"identity"}, "linear_inputs": {"identity"}}[group]
    assert prims == expected
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert snn(x).shape == (2, 5)
    none = convert_vit_mbe(model, 8, 8, 4, **{g: False for g in GROUPS})
    assert not mbe_sites(none)
    with torch.no_grad():
        torch.testing.assert_close(none(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("T", [2, 3, 8])
def test_table_and_step_paths_agree_in_the_network(T):
    # T = 2, 3: the shipped tables load and convert; with the evaluation's counters attached, the
    # table path (neurons answer the counters from the counts their forward kept) counts exactly
    # what the step-by-step path counts, and every site once per forward
    model = small_vit()
    x = torch.randn(2, 1, 16, 16)
    ranges = calibrate_ranges(model, [x], lambda t: t, T=T)
    fast, slow = (MBESpikingModel(convert_vit_mbe(model, T, 8, 4, ranges, fast=f), T) for f in (True, False))
    counts = []
    for snn in (fast, slow):
        seen: dict[str, int] = {}  # each site's input size in one plain forward
        handles = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, seen.get(n, 0) + i[0].numel()))
                   for n, m in snn.sites().items()]
        with torch.no_grad():
            snn(x)
        for h in handles:
            h.remove()
        with torch.no_grad(), SimulationCounters(snn) as counters:
            out = snn(x)
        firing, ops = counters.firing, counters.ops
        steps = torch.tensor([seen[n] * m.code.N * T for n, m in snn.sites().items()], dtype=torch.float64)
        assert torch.equal(firing.counts[1], steps)  # no site is run twice by the counters
        counts.append((out, firing.counts, ops.per_step, counters.payload.counts, counters.payload.seen))
    assert torch.equal(counts[0][0], counts[1][0])
    # the payload: read from the table's train records on one path, the step-by-step trains on the other
    assert torch.equal(counts[0][3], counts[1][3]) and torch.equal(counts[0][4], counts[1][4])
    assert float(counts[0][3][2].max()) == 1
    assert torch.equal(counts[0][1], counts[1][1]) and float(counts[0][1][0].sum()) > 0
    assert torch.equal(counts[0][2], counts[1][2])


def test_bad_input():
    model = small_vit()
    with pytest.raises(ValueError, match="T must be"):
        convert_vit_mbe(model, 0)
    with pytest.raises(ValueError, match="N"):
        convert_vit_mbe(model, 8, 0)
    with pytest.raises(ValueError, match="python convert.py mbe-fit"):
        convert_vit_mbe(model, 9)
    with pytest.raises(ValueError, match="python convert.py mbe-fit"):
        MBEConverter(Ts=[8, 7])
    model.blocks[1].mlp.act = nn.SiLU()
    with pytest.raises(ValueError, match="GELU"):
        convert_vit_mbe(model, 8)
    conv = timm.create_model("resnet10t", num_classes=3)
    with pytest.raises(ValueError, match=r"ResNet is another architecture; modules it cannot convert: .*BatchNorm2d"):
        convert_vit_mbe(conv, 8)
    model = small_vit()
    model.blocks[0].ls1 = nn.Tanh()
    with pytest.raises(ValueError, match=r"Tanh x1 \(blocks.0.ls1\)"):
        MBEConverter(Ts=[8]).check(model)


def test_converter_contract():
    model = small_vit()
    conv = MBEConverter(Ts=[8, 16])
    assert isinstance(conv, Converter) and conv.name == "mbe" and conv.needs_calibration
    conv.check(model)
    with pytest.raises(ValueError, match="calibrate"):
        conv.convert(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 1, 16, 16, generator=g) for _ in range(2)]
    calls = []

    def all_reduce(t):  # two identical processes
        calls.append(t.shape)
        return 2 * t

    summary = conv.calibrate(model, batches, all_reduce)
    assert calls and set(summary["identity_ranges"]) == set(conv.ranges)
    single = calibrate_ranges(model, batches, lambda t: t, T=8)
    assert single == conv.ranges  # the doubled histograms give the same ranges
    with pytest.raises(ValueError, match="no images"):
        calibrate_ranges(model, [], lambda t: t, T=8)
    gelu_only = MBEConverter(Ts=[8], **{g: g == "gelu" for g in GROUPS})
    assert gelu_only.calibrate(model, batches, lambda t: t)["identity_ranges"] == {}
    assert gelu_only.convert(model)["T8"](batches[0]).shape == (1, 4, 5)
    variants = conv.convert(model)
    assert list(variants) == ["T8", "T16"]
    for label, sm in variants.items():
        assert isinstance(sm, SpikingModel) and isinstance(sm, MBESpikingModel)
        T = int(label[1:])
        assert sm.time_steps == T and sm.readout_steps == [T]
        out = sm(batches[0])
        assert out.shape == (1, 4, 5)
        sites = sm.sites()
        assert all(isinstance(m, MBENeuron) and m.code.T == T for m in sites.values())
        assert "blocks.0.attn.softmax.exp2" in sites and "blocks.1.mlp.fc2.encoder" in sites
        assert sites["blocks.1.mlp.fc2.encoder"].code.N == 4  # the GELU neuron
        analog = sm.analog_layers()
        assert analog[0] is sm.snn.patch_embed.proj and analog[-1] is sm.snn.head
        assert len(identity_sites(sm.snn)) == len(conv.ranges)
    assert model.blocks[0].attn.__class__.__name__ == "Attention"  # the model is untouched


@pytest.mark.parametrize("linear_inputs", [True, False])
def test_spike_driven_check_watches_the_trains(linear_inputs):
    from csdlab.eval.checks import spike_driven_check

    model = small_vit()
    snn = convert_vit_mbe(model, 8, 8, 4, linear_inputs=linear_inputs)
    x = torch.randn(2, 1, 16, 16)
    analog = [snn.patch_embed.proj, snn.head]
    report = spike_driven_check(snn, lambda s: s(x), exempt=analog)
    sites = {c.name: c for c in report.layers}
    # every Linear and every product is a watched site: q k^T, attn v, the softmax numerator x
    # 1/sum, LayerNorm's square and its (x - mu) x 1/sqrt(var)
    for name in ("blocks.0.attn.qkv.linear", "blocks.0.mlp.fc2.linear", "blocks.0.attn.qk.product",
                 "blocks.0.attn.av.product", "blocks.0.attn.softmax.product", "blocks.0.norm1.square",
                 "blocks.0.norm1.product", "norm.product"):
        if not linear_inputs and name == "blocks.0.attn.qkv.linear":
            name = "blocks.0.attn.qkv"  # a plain Linear again
        assert sites[name].calls == 1, name
    assert all(not s.failures for s in report.sources)
    assert {"readout"} == sites["blocks.0.attn.qk.product"].operands
    if linear_inputs:
        assert report.ok, report.summary()
        assert report.operand_kinds() == {"readout": len(report.layers) - 2}
    else:  # qkv / proj / fc1 / fc2 read analog values: the check sees it
        assert not report.ok and "blocks.0.attn.qkv" in report.violations


def test_spike_driven_check_fails_exact_neurons():
    """Neurons replaced by their exact functions pass on values that no binary train decodes to."""
    from csdlab.eval.checks import spike_driven_check

    model = small_vit()
    x = torch.randn(2, 1, 16, 16)
    snn = convert_vit_mbe(model, 8, 8, 4, exact=True)
    report = spike_driven_check(snn, lambda s: s(x), exempt=[snn.patch_embed.proj, snn.head])
    assert not report.ok
    assert len(report.violations) == len(report.layers) - 2  # every non-exempt site
    assert all(s.failures == ["output is not the readout of its spike trains"] for s in report.sources)
    assert report.summary().startswith("FAIL")


# -- ablation options (docs/mbe.md: per-group error table, beyond the paper) ------------------------

# which sites each exact group must reach, by the site names (an oracle independent of the factory)
_GROUP_SITES = {
    "gelu": ("mlp.fc2.encoder",),
    "exp2": ("attn.softmax.exp2",),
    "recip": ("attn.softmax.recip",),
    "rsqrt": ("norm1.rsqrt", "norm2.rsqrt", "norm.rsqrt"),
    "centred": ("norm1.centred", "norm2.centred", "norm.centred"),
    "products": ("attn.qk.enc_a", "attn.qk.enc_b", "attn.av.enc_a", "attn.av.enc_b"),
    "linear_inputs": ("attn.qkv.encoder", "attn.proj.encoder", "mlp.fc1.encoder"),
}


def _in_group(name: str, group: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in _GROUP_SITES[group])


def test_exact_groups_cover_every_site_once():
    sites = mbe_sites(convert_vit_mbe(small_vit(), 8, 8, 4))
    for name in sites:
        assert sum(_in_group(name, g) for g in EXACT_GROUPS) == 1, name


@pytest.mark.parametrize("group", EXACT_GROUPS)
def test_exact_group_changes_exactly_its_sites(group):
    model = small_vit()
    x = torch.randn(3, 1, 16, 16)
    ranges = calibrate_ranges(model, [x], lambda t: t, T=8)
    snn = convert_vit_mbe(model, 8, 8, 4, ranges, exact_groups=[group])
    sites = mbe_sites(snn)
    exact = {n for n, m in sites.items() if m.exact}
    assert exact == {n for n in sites if _in_group(n, group)} and exact
    # the exact sites compute their primitive exactly; the others are the fitted neuron on the same input
    seen: dict[str, tuple] = {}

    def keep(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output stays as computed
            seen.setdefault(name, (inputs[0], output))
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in sites.items()]
    with torch.no_grad():
        snn(x)
    for h in hooks:
        h.remove()
    spiking = {n: MBENeuron(m.code, float(m.in_scale), float(m.out_scale)) for n, m in sites.items()}
    for n, (inp, out) in seen.items():
        if n in exact:
            prim = sites[n].code.primitive
            want = {"gelu": torch.nn.functional.gelu, "exp2": torch.exp2, "recip": torch.reciprocal,
                    "rsqrt": torch.rsqrt, "identity": lambda v: v}[prim](inp)
            torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(out, spiking[n](inp)), n


def test_identity_group_is_the_three_roles():
    model = small_vit()
    one = {n for n, m in mbe_sites(convert_vit_mbe(model, 8, 8, 4, exact_groups=["identity"])).items() if m.exact}
    three = convert_vit_mbe(model, 8, 8, 4, exact_groups=list(IDENTITY_ROLES))
    assert one == {n for n, m in mbe_sites(three).items() if m.exact}
    with pytest.raises(ValueError, match="unknown MBE exact group"):
        convert_vit_mbe(model, 8, 8, 4, exact_groups=["softmax"])
    with pytest.raises(ValueError, match="unknown MBE exact group"):
        MBEConverter(Ts=[8], exact=["gleu"])


def test_ablation_variants_and_global_range():
    model = small_vit()
    x = torch.randn(4, 1, 16, 16)
    conv = MBEConverter(Ts=[8], ablation=True, global_range=True)
    info = conv.calibrate(model, [x], lambda t: t)
    per_site = calibrate_ranges(model, [x], lambda t: t, T=8)
    assert set(info["identity_ranges"].values()) == {max(per_site.values())}
    assert info["global_range"] is True and len(set(per_site.values())) > 1
    variants = conv.convert(model)
    assert list(variants) == ["T8"] + [f"T8_exact_{g}" for g in EXACT_GROUPS]
    for g in EXACT_GROUPS:
        sites = variants[f"T8_exact_{g}"].sites()
        assert {n for n, m in sites.items() if m.exact} == {n for n in sites if _in_group(n, g)}
    assert not any(m.exact for m in variants["T8"].sites().values())


def test_code_variants_take_back_one_departure_each(monkeypatch):
    fitted = variant_codes(2, 4)
    trunc = variant_codes(2, 4, "truncating")
    ident = trunc["identity"]
    assert torch.equal(ident.delta, torch.zeros(4)) and len(set(ident.start.tolist())) == 1
    assert all(trunc[p].to_dict() == fitted[p].to_dict() for p in fitted if p != "identity")
    # the plain code truncates: 0 <= z - f(z) < one last step on [0, 1]
    z = torch.linspace(0, 1, 1001, dtype=torch.float64)
    err = z - ident(z, exact_table=False)[0]
    last = float(ident.start[0]) * 2.0 ** -(ident.T - 1)
    assert float(err.min()) >= -1e-12 and float(err.max()) < last
    # the refitting variants ask for the refits they name, nothing else (the fits: test_mbe_fit.py)
    asked: list[tuple] = []

    def refit(primitive, T, N, mode, offsets):
        asked.append((primitive, mode, offsets))
        return initial_code(primitive, T, N, mode, offsets)

    monkeypatch.setattr(mbe_fit, "_refit", refit)
    unsigned = variant_codes(2, 4, "unsigned")
    assert sorted(asked) == [("gelu", "positive", True), ("identity", "shift", True)]
    for p in ("identity", "gelu"):
        assert bool((unsigned[p].sign == 1).all())
    assert unsigned["identity"].x0 == -1.0
    assert all(unsigned[p].to_dict() == fitted[p].to_dict() for p in ("exp2", "recip", "rsqrt"))
    asked.clear()
    plain = variant_codes(2, 4, "no_offsets")
    assert sorted(asked) == sorted((p, None, False) for p in fitted)
    assert all(bool((c.delta == 0).all()) for c in plain.values())
    assert any(bool((fitted[p].delta != 0).any()) for p in fitted)
    with pytest.raises(ValueError, match="unknown MBE code variant"):
        variant_codes(2, 4, "paper")
    with pytest.raises(ValueError, match="unknown MBE code variant"):
        MBEConverter(Ts=[2], codes="paper")


def test_fit_without_offsets_keeps_them_zero():
    # inside inference mode too: a converter refits its codes within Lightning's test loop
    with torch.inference_mode():
        code, info = fit_primitive("exp2", 2, 4, FitConfig(points=500, steps=25), offsets=False)
    assert bool((code.delta == 0).all()) and info["mse_fit"] < info["mse_init"]
    code, _ = fit_primitive("identity", 2, 4, FitConfig(points=500, steps=25), offsets=False)
    assert bool((code.delta == 0).all())


def test_fit_domain_is_where_the_points_are():
    # GELU fitted on (-6, 6) only: better there than the paper-domain fit of the same budget
    cfg = FitConfig(points=2000, steps=25)
    narrow, _ = fit_primitive("gelu", 4, 4, cfg, domain=(-6.0, 6.0))
    wide, _ = fit_primitive("gelu", 4, 4, cfg)
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    err = {k: float(((c(x - c.x0)[0] - torch.nn.functional.gelu(x)) ** 2).mean()) for k, c in
           (("narrow", narrow), ("wide", wide))}
    assert err["narrow"] < err["wide"]
