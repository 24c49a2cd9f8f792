"""MBE spiking operations (docs/methods.md §4.3) against torch, on the Fashion-MNIST ViT's own activations."""

from pathlib import Path

import pytest
import torch
from torch import nn

from csdlab.snn.mbe import MBENeuron, load_codes
from csdlab.snn.mbe_ops import MBELayerNorm, MBELinear, MBEProduct, MBESoftmax, and_events, identity_neuron

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@pytest.fixture(scope="module")
def vit_activations(tmp_path_factory):
    """Softmax inputs (scaled scores) and LayerNorm inputs of the fmnist ViT on 64 training images."""
    from csdlab.lit.data import ImageDataModule
    from csdlab.lit.module import load_classifier

    model, _ = load_classifier(ASSETS / "fmnist_vit_tiny.ckpt")
    model.eval()
    dm = ImageDataModule("fashion_mnist", str(tmp_path_factory.mktemp("data")), batch_size=64, augment=False)
    x, _ = next(iter(dm.calibration_dataloader()))
    scores, norms = [], []
    for blk in model.blocks:
        blk.attn.fused_attn = False
    hooks = [m.register_forward_hook(lambda m, i, o: norms.append(i[0])) for m in model.modules()
             if isinstance(m, nn.LayerNorm)]
    orig = torch.Tensor.softmax

    def spy(t, *a, **k):
        scores.append(t)
        return orig(t, *a, **k)

    torch.Tensor.softmax = spy
    try:
        with torch.no_grad():
            model(x)
    finally:
        torch.Tensor.softmax = orig
        for h in hooks:
            h.remove()
    return torch.cat([s.flatten(0, -2) for s in scores]), norms, model


def _softmax(T: int, N: int) -> MBESoftmax:
    c = load_codes(T, N)
    return MBESoftmax(MBENeuron(c["exp2"]), MBENeuron(c["recip"]))


# largest |error| vs torch over the 64 x 4 blocks x 4 heads x 17 rows of 17; measured 2.9e-3 (T=16)
# and 2.3e-3 (T=8): the recip and exp2 fits (N=8) set it, not T
@pytest.mark.parametrize(("T", "N", "bound"), [(16, 8, 4e-3), (8, 8, 4e-3)])
def test_softmax_on_vit_rows(vit_activations, T, N, bound):
    rows = vit_activations[0]
    assert rows.shape[-1] == 17 and len(rows) == 64 * 4 * 4 * 17
    ref = rows.softmax(-1)
    out = _softmax(T, N)(rows)
    err = float((out - ref).abs().max())
    assert err <= bound, err
    assert float((out.sum(-1) - 1).abs().max()) <= 2 * bound


def test_softmax_exact_neurons_is_softmax():
    sm = _softmax(8, 8)
    sm.exp2.exact = sm.recip.exact = True
    x = torch.randn(50, 30, dtype=torch.float64) * 10
    torch.testing.assert_close(sm(x), x.softmax(-1), rtol=1e-12, atol=1e-14)


# largest |error| / max |output| over the 9 LayerNorms x 64 images x 17 tokens; measured 5.7e-3
# (T=16) and 6.6e-3 (T=8): the rsqrt fit (N=8) sets it
@pytest.mark.parametrize(("T", "N", "bound"), [(16, 8, 8e-3), (8, 8, 8e-3)])
def test_layernorm_on_vit_rows(vit_activations, T, N, bound):
    _, norms, model = vit_activations
    c = load_codes(T, N)
    lns = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    worst = 0.0
    for ln, x in zip(lns, norms):
        rng = float((x - x.mean(-1, keepdim=True)).abs().max())  # the site's calibrated range
        mln = MBELayerNorm(ln, identity_neuron(c["identity"], rng), MBENeuron(c["rsqrt"]))
        with torch.no_grad():
            ref, out = ln(x), mln(x)
        # relative to the output's scale (gamma differs per layer)
        worst = max(worst, float((out - ref).abs().max() / ref.abs().max()))
    assert worst <= bound, worst


def test_layernorm_exact_neurons_is_layernorm():
    ln = nn.LayerNorm(40, eps=1e-6).double()
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    c = load_codes(8, 8)
    mln = MBELayerNorm(ln, identity_neuron(c["identity"], 1.0, exact=True), MBENeuron(c["rsqrt"], exact=True))
    x = torch.randn(64, 40, dtype=torch.float64) * 5 + 3
    with torch.no_grad():
        torch.testing.assert_close(mln(x), ln(x), rtol=1e-12, atol=1e-12)


def test_product_matmul_reference_and_and_events():
    c = load_codes(8, 8)["identity"]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    b = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    ra, rb = float(a.abs().max()), float(b.abs().max())
    prod = MBEProduct(identity_neuron(c, ra), identity_neuron(c, rb), matmul=True, scale=0.5)
    out = prod(a, b)
    ha, hb = prod.enc_a(a), prod.enc_b(b)
    torch.testing.assert_close(out, 0.5 * ha @ hb, rtol=0, atol=0)
    # quantisation bound: |ea| <= ra 2^-8, |eb| <= rb 2^-8, propagated through the sums over k
    ea, eb = ra * 2.0 ** -8, rb * 2.0 ** -8
    bound = 0.5 * 7 * (ra * eb + rb * ea + ea * eb)
    assert float((out - 0.5 * a @ b).abs().max()) <= bound
    # AND events by brute force: every pair of spikes (one per operand) of the meeting elements
    ta, tb = prod.enc_a.spike_trains(a).sum((0, 1)), prod.enc_b.spike_trains(b).sum((0, 1))  # [2, 5, 7], [2, 7, 3]
    brute = sum(float(ta[z, i, k] * tb[z, k, j]) for z in range(2) for i in range(5) for k in range(7)
                for j in range(3))
    assert and_events(prod.enc_a.spike_counts(a), prod.enc_b.spike_counts(b), True) == brute
    macs, acs = prod.count_ops((a, b), out)
    assert macs == 0 and acs == brute + float(ta.sum() + tb.sum())
    # the AND form: sum_ij D_ij s(i) s'(j) with D = d d'^T equals the product of the reconstructions
    x, y = a[0, 0, 0:1], b[0, 0, 0:1]
    sa, sb = prod.enc_a.spike_trains(x)[:, :, 0], prod.enc_b.spike_trains(y)[:, :, 0]  # [T, N]
    da = c.constants(torch.float64, "cpu")[2].T * c.weight * ra  # [T, N] weighted intensities
    db = c.constants(torch.float64, "cpu")[2].T * c.weight * rb
    D = (da.flatten()[:, None] * db.flatten()[None, :])
    and_sum = (sa.flatten()[:, None] * sb.flatten()[None, :] * D).sum()
    torch.testing.assert_close(and_sum, (prod.enc_a(x) * prod.enc_b(y))[0], rtol=1e-12, atol=1e-12)


def test_gelu_neuron_vs_torch():
    for T, N, mse in [(16, 4, 2.3e-4), (16, 8, 1.0e-4), (8, 4, 1e-3)]:
        n = MBENeuron(load_codes(T, N)["gelu"])
        x = torch.linspace(-120, 10, 200_001, dtype=torch.float64)
        assert float(((n(x) - torch.nn.functional.gelu(x)) ** 2).mean()) <= mse


def test_linear_counts_events_times_fanout():
    c = load_codes(8, 8)["identity"]
    lin = nn.Linear(6, 11)
    layer = MBELinear(lin, identity_neuron(c, 2.0))
    x = torch.randn(4, 6)
    out = layer(x)
    torch.testing.assert_close(out, lin(layer.encoder(x)))
    ev = float(layer.encoder.spike_counts(x).sum())
    assert layer.count_ops((x,), out) == (0.0, ev * 12)


def test_ldexp_is_torch_ldexp_bit_for_bit():
    """The exponent add (x * exp2(e), 5x torch.ldexp's pow on the CPU) equals torch.ldexp for
    every integer exponent float32 can meet, subnormal and overflowing results included."""
    from csdlab.snn.mbe_ops import _EXP2_EXACT, ldexp

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(5000, generator=g) * 4 - 2, torch.tensor([0.0, -0.0, 1.5, 3e38])])
    e = torch.randint(-300, 300, (len(x),), generator=g)
    def same_bits(a, b):  # NaN where 0 meets an infinite power, in both
        nan = a.isnan()
        ints = torch.int64 if a.dtype == torch.float64 else torch.int32
        return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(ints), b[~nan].view(ints))

    for ex in (e.float(), e.int(), torch.floor(torch.rand(len(x), generator=g) * -200)):
        assert same_bits(ldexp(x, ex), torch.ldexp(x, ex))
    assert same_bits(ldexp(x.double(), e.double()), torch.ldexp(x.double(), e.double()))
    # LayerNorm's integer exponents (taken as floats where every 2^e is a normal float32; beyond,
    # torch.ldexp): the same as torch.ldexp, subnormal and overflowing results included
    xs = torch.randn(20_000, generator=g) * torch.exp2(torch.randint(-60, 60, (20_000,), generator=g).float())
    ei = torch.randint(-126, 127, (20_000,), generator=g, dtype=torch.int32)
    assert same_bits(ldexp(xs, ei), torch.ldexp(xs, ei))
    assert same_bits(ldexp(xs.double(), ei), torch.ldexp(xs.double(), ei))
    assert _EXP2_EXACT  # the fast path is the one tested here
