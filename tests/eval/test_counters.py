"""The evaluation's counters (docs/methods.md §3): exact event x fan-out counts, per step, the
firing counter, the ANN's dense MACs and the energy formula, each pinned against a hand count."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from csdlab.eval.counters import E_AC_PJ, E_MAC_PJ, FiringCounter, OpCounter, SimulationCounters, ann_macs, energy_ratio
from csdlab.snn.counting import synaptic_events


def test_conv_events_times_actual_fan_out_with_padding() -> None:
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, 0] = 1.0  # corner: its 3x3 neighbourhood holds 4 output positions
    x[0, 1, 0, 2] = 1.0  # top edge: 6 output positions
    x[0, 1, 2, 2] = 0.5  # interior, a non-binary event: 9 output positions
    # each (event, output position) pair feeds all 3 output channels
    assert synaptic_events(conv, x).tolist() == [(4 + 6 + 9) * 3]  # not 3 events x 9 x 3 = 81


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
    net = nn.Sequential(fc)
    counter = OpCounter(net, steps=2, time_flattened=True)
    with counter:
        net(x)
    assert counter.layers["0"][1].tolist() == [(1 + 3) * 3, (0 + 1) * 3]  # ACs of step 1, step 2
    single = OpCounter(net, steps=2)
    with single:
        net(x[:2])  # step 1
        net(x[2:])  # step 2
    assert single.layers["0"][1].tolist() == counter.layers["0"][1].tolist()
    with pytest.raises(RuntimeError, match="new_sample"), single:
        net(x[:2])


def test_vit_ann_macs_include_the_fused_attention_products() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10).eval()
    assert model.blocks[0].attn.fused_attn  # timm runs q k^T and attn v in one fused kernel
    n, d, h, hd, depth = 8 * 8 + 1, 192, 3, 64, 12
    patch = 64 * (3 * 4 * 4) * d
    block = n * d * 3 * d + 2 * h * n * n * hd + n * d * d + 2 * n * d * 4 * d
    assert ann_macs(model, torch.randn(1, 3, 32, 32)) == patch + depth * block + d * 10


def test_energy_ratio() -> None:
    assert energy_ratio(10.0, 46.0, 20.0) == pytest.approx((10 * 4.6 + 46 * 0.9) / (20 * 4.6))
    assert (E_MAC_PJ, E_AC_PJ) == (4.6, 0.9)  # the 45 nm figures of docs/methods.md §3
    per_step = energy_ratio(torch.tensor([4.6, 0.0], dtype=torch.float64), torch.tensor([0.0, 46.0], dtype=torch.float64), 1.0)
    assert per_step.tolist() == pytest.approx([4.6, 9.0])  # 4.6 MACs x 4.6 pJ / 4.6 pJ; 46 ACs x 0.9 / 4.6
    with pytest.raises(ValueError, match="must be > 0"):
        energy_ratio(1.0, 1.0, 0)


class _Neuron(nn.Module):
    """A binary neuron that counts its own events (as every csdlab site does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0).float()

    def count_events(self, inputs, output):
        return output.sum(), output.numel()


class _Snn(nn.Module):
    """Analog input -> fc1 (MACs) -> neuron -> fc2 (ACs), time-flattened with T = 2."""

    time_steps = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(3, 4), _Neuron(), nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) * self.scale

    def sites(self):
        return {"act": self.act}

    def analog_layers(self):
        return [self.fc1]

    def time_flattened(self):
        return True

    def uncounted_modules(self):
        return {self: "a readout scale (not counted on either side)"}


def test_simulation_counters_on_a_hand_built_network() -> None:
    snn = _Snn()
    with torch.no_grad():
        snn.fc1.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]]))
        snn.fc1.bias.zero_()
    x = torch.tensor([[1.0, 2, 3], [-1, 0, 0], [0, 0, 0], [1, -1, 1]])  # [T*B], T = 2, B = 2
    with SimulationCounters(snn) as c, torch.no_grad():
        snn(x)
    # neuron outputs: [1,1,1,0], [0,0,0,1], [0,0,0,0], [1,0,1,0] -> 3 + 1 events in step 1, 0 + 2 in step 2
    assert c.firing.counts.tolist() == [[6.0], [16.0]]
    macs, acs = c.ops.per_step.tolist()
    assert macs == [2 * 4 * 3] * 2  # fc1's dense MACs per step: 2 images x 4 outputs x 3 inputs
    assert acs == [4 * 2, 2 * 2]  # events x fan-out 2
    assert not c.firing._handles and not c.ops._handles  # hooks gone on exit


def test_undeclared_parameters_and_uncounted_sites_raise() -> None:
    snn = _Snn()
    snn.uncounted_modules = lambda: {}
    with pytest.raises(ValueError, match=r"<root> \(_Snn\)"):
        SimulationCounters(snn)
    snn = _Snn()
    snn.norm = nn.LayerNorm(2)  # parameterised, neither counted nor declared
    with pytest.raises(ValueError, match=r"norm \(LayerNorm\)"):
        SimulationCounters(snn)
    with pytest.raises(TypeError, match="count_events"):
        FiringCounter({"relu": nn.ReLU()})
