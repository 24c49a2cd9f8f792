"""CSDformer family in timm's registry (docs/methods.md §1.1)."""

import pytest
import timm
import torch

import csdlab.models  # noqa: F401  registers csdformer_* with timm
from csdlab.lit.module import build_model
from csdlab.quant import LSQQuantizer

PAPER_PARAMS_M = {  # CSDformer paper; 10 classes for the CIFAR sizes, 1000 for ImageNet
    "csdformer_4_256": 4.15, "csdformer_2_384": 5.76, "csdformer_4_384": 9.32,
    "csdformer_8_384": 16.81, "csdformer_8_512": 29.68, "csdformer_8_768": 66.34,
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.005, n


def test_registry_lists_all_names():
    assert set(timm.list_models("csdformer*")) == set(PAPER_PARAMS_M) | {"csdformer_tiny"}


@pytest.mark.parametrize("act", ["relu", "lsq", "qcfs"])
def test_forward_and_every_parameter_gets_a_gradient(act):
    torch.manual_seed(0)
    model = timm.create_model("csdformer_tiny", num_classes=7, img_size=28, in_chans=1, pool_stages=[2, 3], act=act)
    model.train()
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    assert out.shape == (4, 7) and model.num_tokens == 49
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    n_quant = sum(isinstance(m, LSQQuantizer) for m in model.modules())
    assert n_quant == (4 + 2 * (6 + 2) if act == "lsq" else 0)  # 4 tokenizer + 8 per block


def test_layout_follows_the_paper():
    m = timm.create_model("csdformer_8_384")
    assert m.num_tokens == 196 and m.pool_stages == (1, 2, 3, 4)
    c = timm.create_model("csdformer_4_384")
    assert c.num_tokens == 64 and c.pool_stages == (3, 4) and c.num_classes == 10
    assert not any(isinstance(x, torch.nn.LayerNorm) for x in c.modules())
    assert not any(isinstance(x, (torch.nn.GELU, torch.nn.Softmax)) for x in c.modules())


def test_bad_image_size_named_with_fix():
    with pytest.raises(ValueError, match=r"img_size=30 .* divisible by 4"):
        timm.create_model("csdformer_tiny", img_size=30)
    model = timm.create_model("csdformer_tiny")
    with pytest.raises(ValueError, match="does not match the model's img_size=32"):
        model(torch.randn(1, 3, 28, 28))


def test_unknown_model_and_bad_pool_stages():
    with pytest.raises(ValueError, match="unknown model 'csdformer_9_999'"):
        build_model("csdformer_9_999")
    with pytest.raises(ValueError, match=r"pool_stages must be a subset of \(1, 2, 3, 4\), got \(0, 5\)"):
        timm.create_model("csdformer_tiny", pool_stages=[0, 5])
    with pytest.raises(ValueError, match="quantization levels L must be an integer >= 1, got 0"):
        timm.create_model("csdformer_tiny", levels=0)
