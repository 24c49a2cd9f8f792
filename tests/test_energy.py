"""The energy counter (docs/methods.md §3): exact event x fan-out counts, per step, and the ANN's
dense MACs, each pinned against a hand count."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from csdlab.energy import E_AC_PJ, E_MAC_PJ, LayerOps, OpCounter, ann_macs, energy_ratio, synaptic_events


def test_conv_events_times_actual_fan_out_with_padding() -> None:
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, 0] = 1.0  # corner: its 3x3 neighbourhood holds 4 output positions
    x[0, 1, 0, 2] = 1.0  # top edge: 6 output positions
    x[0, 1, 2, 2] = 0.5  # interior, a non-binary event: 9 output positions
    # each (event, output position) pair feeds all 3 output channels
    assert synaptic_events(conv, x).tolist() == [(4 + 6 + 9) * 3]
    # the naive count (events x kh x kw x C_out) ignores the border: 81, not 57
    assert 3 * 9 * 3 == 81


def test_conv_count_with_stride_groups_and_reflect_padding() -> None:
    conv = nn.Conv2d(4, 4, kernel_size=3, stride=2, padding=1, groups=2, padding_mode="reflect")
    x = torch.zeros(1, 4, 5, 5)
    x[0, 0, 0, 0] = 1.0
    # brute force: count (output channel, output position) pairs whose window sees the event
    ref = 0
    for i in range(3):
        for j in range(3):
            xi = torch.zeros_like(x)
            xi[0, 0, 0, 0] = 1.0
            pad = nn.functional.pad(xi, (1, 1, 1, 1), mode="reflect")
            window = pad[0, :2, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            ref += int(window.sum()) * 2  # the event's group has 2 output channels
    assert synaptic_events(conv, x).tolist() == [ref]


def test_conv_count_equals_spikingjelly_synop_counter() -> None:
    from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1, bias=False)
    x = (torch.rand(2, 3, 6, 6) < 0.3).float()
    counter = SynOpCounter()
    with DispatchCounterMode([counter]), torch.no_grad():
        conv(x)
    assert float(synaptic_events(conv, x).sum()) == counter.get_total()


def test_linear_events_and_per_step_split() -> None:
    fc = nn.Linear(4, 3)
    x = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 0, 2], [0, 0, 0, 0], [0, 0, 1, 0]])  # [T*B] with T = 2, B = 2
    counter = OpCounter(nn.Sequential(fc), steps=2, time_flattened=True)
    with counter:
        counter.model(x)
    assert counter.layers["0"][1].tolist() == [(1 + 3) * 3, (0 + 1) * 3]  # ACs of step 1, step 2
    single = OpCounter(nn.Sequential(fc), steps=2)
    with single:
        single.model(x[:2])  # step 1
        single.model(x[2:])  # step 2
    assert single.layers["0"][1].tolist() == counter.layers["0"][1].tolist()
    with pytest.raises(RuntimeError, match="new_sample"), single:
        single.model(x[:2])


def test_vit_ann_macs_include_the_fused_attention_products() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10).eval()
    assert model.blocks[0].attn.fused_attn  # timm runs q k^T and attn v in one fused kernel
    n, d, h, hd, depth = 8 * 8 + 1, 192, 3, 64, 12
    patch = 64 * (3 * 4 * 4) * d
    block = n * d * 3 * d + 2 * h * n * n * hd + n * d * d + 2 * n * d * 4 * d
    assert ann_macs(model, torch.randn(1, 3, 32, 32)) == patch + depth * block + d * 10


def test_energy_ratio() -> None:
    assert energy_ratio(LayerOps(macs=10, acs=46), 20) == pytest.approx((10 * E_MAC_PJ + 46 * E_AC_PJ) / (20 * E_MAC_PJ))
    with pytest.raises(ValueError, match="must be > 0"):
        energy_ratio(LayerOps(), 0)
