"""The harness ECMT and MBE share (csdlab/convert/vit.py): one set of accepted models, one set of
errors, bad image batches refused through the Python API, the calibration loop."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers.attention import Attention
from torch import nn

from csdlab.convert.ecmt import ECMTConverter, convert_vit
from csdlab.convert.ecmt_vit import SpikingViT
from csdlab.convert.mbe import MBEConverter, convert_vit_mbe
from csdlab.convert.vit import all_reduce_with_count, observe_sites, skeleton

CONVERTERS = {"ECMT": lambda: ECMTConverter(T=2), "MBE": lambda: MBEConverter(Ts=[8])}


def _tiny(name: str = "vit_tiny_patch16_224", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 1, **kwargs}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _spiking(method: str, ann: nn.Module):
    conv = CONVERTERS[method]()
    conv.check(ann)
    conv.calibrate(ann, [_images(4, seed=7)], lambda t: t)
    return next(iter(conv.convert(ann).values()))


@pytest.mark.parametrize("method", CONVERTERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixel_is_refused(method: str, bad: float) -> None:
    # the ANN gives NaN; an SNN would read NaN as silence (ECMT: finite, wrong logits) or fail to
    # index its table (MBE): the spiking model refuses the batch, as the CSDformer SNN does
    ann = _tiny()
    snn = _spiking(method, ann)
    x = _images(2)
    assert torch.isfinite(snn(x)).all()
    x[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match=r"image batch holds 1 NaN/inf"):
        snn(x)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        snn(x[0])


@pytest.mark.parametrize("method", CONVERTERS)
def test_non_finite_calibration_batch_is_refused(method: str) -> None:
    x = _images(4)
    x[2, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        CONVERTERS[method]().calibrate(_tiny(), [_images(4), x], lambda t: t)


def test_non_finite_pixel_is_refused_single_step() -> None:
    ann = _tiny()
    conv = ECMTConverter(T=2, multi_step=False)
    conv.calibrate(ann, [_images(4)], lambda t: t)
    x = _images(2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        conv.convert(ann)["T2"](x)


@pytest.mark.parametrize("method", CONVERTERS)
def test_distilled_deit_converts_with_both_methods(method: str) -> None:
    ann = _tiny("deit_tiny_distilled_patch16_224")
    snn = _spiking(method, ann)
    net = snn.net if method == "ECMT" else snn.snn
    assert type(net).__name__ == "VisionTransformerDistilled"
    assert snn.analog_layers()[-2:] == [net.head, net.head_dist]  # both heads read analog values
    x = _images(3)
    out = snn(x)
    assert out.shape == (len(snn.readout_steps), 3, 10) and torch.isfinite(out).all()


def test_distilled_deit_exact_networks_equal_the_ann() -> None:
    ann = _tiny("deit_tiny_distilled_patch16_224").double()
    x = _images(3).double()
    with torch.no_grad():
        ref = ann(x)  # eval: the mean of the two heads
        torch.testing.assert_close(convert_vit_mbe(ann, 8, exact=True)(x), ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(SpikingViT(convert_vit(ann, spiking=False), 3)(x)[-1], ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", CONVERTERS)
def test_other_architectures_are_named_with_their_modules(method: str) -> None:
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    with pytest.raises(ValueError) as err:
        CONVERTERS[method]().check(convnext)
    msg = str(err.value)
    assert f"cannot {method}-convert ConvNeXt" in msg and "ConvNeXt is another architecture" in msg
    assert "ConvNeXtBlock x" in msg and "LayerNorm2d x" in msg and "stages.0.blocks.0.conv_dw" in msg
    assert "GELU" not in msg  # the architecture is the problem, not one of its activations
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    with pytest.raises(ValueError, match=r"ResNet is another architecture; modules it cannot convert: .*BatchNorm2d"):
        CONVERTERS[method]().check(resnet)


@pytest.mark.parametrize("method", CONVERTERS)
def test_both_converters_refuse_the_same_vit_variants(method: str) -> None:
    with pytest.raises(ValueError, match=f"cannot {method}-convert a VisionTransformer with attention pooling"):
        CONVERTERS[method]().check(_tiny(global_pool="map"))
    gated = _tiny()
    gated.blocks[0].attn = Attention(192, num_heads=3, qkv_bias=True, gated=True)
    with pytest.raises(ValueError, match=r"gated timm Attention .*Attention x1 \(blocks\.0\.attn\)"):
        CONVERTERS[method]().check(gated)
    odd = _tiny()
    odd.blocks[0].ls1 = nn.BatchNorm1d(17)
    with pytest.raises(ValueError, match=rf"cannot {method}-convert VisionTransformer: .*unknown modules: "
                                         r"BatchNorm1d x1 \(blocks\.0\.ls1\)"):
        CONVERTERS[method]().check(odd)
    hybrid = _tiny()
    hybrid.patch_embed.proj = nn.Linear(3, 192)
    with pytest.raises(ValueError, match=r"PatchEmbed with a Conv2d projection; unknown modules: Linear x1 "
                                         r"\(patch_embed\.proj\)"):
        CONVERTERS[method]().check(hybrid)


@pytest.mark.parametrize("method", CONVERTERS)
def test_check_copies_no_weights(method: str) -> None:
    ann = _tiny()
    meta = skeleton(ann)
    assert all(p.is_meta for p in meta.parameters()) and not any(p.is_meta for p in ann.parameters())
    before = {k: v.clone() for k, v in ann.state_dict().items()}
    CONVERTERS[method]().check(meta)  # the conversion runs on a model without data
    CONVERTERS[method]().check(ann)  # (on a skeleton of it): the real model is left alone
    assert all(torch.equal(before[k], v) for k, v in ann.state_dict().items())
    assert type(ann.blocks[0].attn) is Attention


def test_calibration_loop_hooks_every_site_and_removes_its_hooks() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    sites = [net[0], net[2]]
    out = torch.zeros(2, dtype=torch.float64)
    batches = [torch.ones(5, 4), (torch.ones(2, 4), torch.zeros(2))]  # images, or (images, labels)
    seen, images = observe_sites(net, sites, lambda x: x.new_tensor(float(x.shape[0])), out, batches,
                                 torch.device("cpu"))
    assert (seen, images) == (2, 7) and out.tolist() == [7.0, 7.0]  # each site saw every image
    assert all(not s._forward_hooks for s in sites)

    def failing(x: torch.Tensor) -> None:
        net(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        observe_sites(failing, sites, lambda x: x.sum(), out, batches, torch.device("cpu"))
    assert all(not s._forward_hooks for s in sites)  # removed on an error too


def test_all_reduce_with_count_sums_in_one_call_and_refuses_no_data() -> None:
    calls = []

    def two_processes(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.dtype)
        return 2 * t

    stats, count = all_reduce_with_count(torch.ones(2, 3), 4, two_processes, torch.device("cpu"), "ECMT")
    assert calls == [torch.float64] and stats.shape == (2, 3) and stats.eq(2).all() and count == 8
    with pytest.raises(ValueError, match="MBE calibration saw no batches"):
        all_reduce_with_count(torch.ones(2), 0, lambda t: t, torch.device("cpu"), "MBE")
