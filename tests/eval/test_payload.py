"""The spike payload (csdlab.eval.api.Payload, csdlab.eval.counters.PayloadCounter) and the two energy
rules, on hand-built sites and networks whose every figure is counted by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from csdlab.eval.api import Payload
from csdlab.eval.counters import (
    PAYLOAD_BINS,
    PAYLOAD_EXACT,
    SimulationCounters,
    bits_of_values,
    value_bins,
)
from csdlab.eval.metrics import ConversionMetrics
from csdlab.snn.burst import BurstNeuron
from csdlab.snn.neurons import MTNeuron
from tests.eval.stubs import OneSiteModel, PassSite


class _Burst(nn.Module):
    """Sends ``count * 0.5``: a signed burst of ``count`` unit spikes of 0.5 (a PayloadSource)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.5

    def spike_units(self, inputs, output):
        return (output / 0.5).round()

    def count_events(self, inputs, output):
        return (output != 0).sum(), output.numel()


class _Net(OneSiteModel):
    """One site feeding a Linear of fan-out 3, one step, on a fixed input."""

    time_steps = 1
    readout_steps = [1]

    def __init__(self, site: nn.Module) -> None:
        super().__init__()
        self.site, self.fc = site, nn.Linear(4, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.site(x)).unsqueeze(0)


def _count(site: nn.Module, x: Tensor) -> SimulationCounters:
    snn = _Net(site)
    with SimulationCounters(snn) as c, torch.no_grad():
        snn(x)
    return c


def test_declared_payloads() -> None:
    assert (Payload.binary().bits, Payload.binary().max_units) == (1, 1)
    ecmt = Payload.power_levels(8)  # 0, +-th 2^k for k < 8: 17 values, up to 128 unit spikes
    assert (ecmt.values, ecmt.bits, ecmt.max_units) == (17, 5, 128)
    assert Payload.burst(112).bits == 8  # -112..112: 225 values
    assert Payload.burst(None).bits is None and Payload.burst(None).max_units is None
    with pytest.raises(ValueError, match="payload kind must be one of"):
        Payload("analog", None, None)


def test_value_bins_and_bits() -> None:
    seen = value_bins(torch.tensor([0.0, 1.0, 1.0, -3.0, 2048.0, 4096.0]))
    assert seen.shape == (PAYLOAD_BINS,) and int(seen.sum()) == 5  # 0, 1, -3 exact; 2^11, 2^12 by octave
    assert seen[PAYLOAD_EXACT] == 1 and seen[PAYLOAD_EXACT + 1] == 1 and seen[PAYLOAD_EXACT - 3] == 1
    assert bits_of_values(seen) == 3  # 5 values
    assert bits_of_values(value_bins(torch.tensor([1.0, 1.0]))) == 1  # silence counts as a value: {0, 1}
    assert bits_of_values(value_bins(torch.arange(-112.0, 113.0))) == 8


def test_binary_site() -> None:
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    c = _count(PassSite(), x)
    assert c.payload.counts[:, 0].tolist() == [4.0, 4.0, 1.0]  # events, unit spikes, largest value
    assert bits_of_values(c.payload.seen[0]) == 1
    # 4 events x fan-out 3, under both rules
    assert c.ops.per_step[1].tolist() == [12.0] and c.ops.per_step_spike.tolist() == [12.0]


def test_burst_site_and_both_energy_rules() -> None:
    x = torch.tensor([[3.0, 0.0, -2.0, 1.0], [0.0, 7.0, 0.0, 0.0]])  # bursts of 3, -2, 1, 7 unit spikes
    c = _count(_Burst(), x)
    assert c.payload.counts[:, 0].tolist() == [4.0, 13.0, 7.0]
    assert bits_of_values(c.payload.seen[0]) == 3  # 0, 3, -2, 1, 7: 5 values
    assert c.ops.per_step[1].tolist() == [12.0]  # per event: 4 events x 3 targets
    assert c.ops.per_step_spike.tolist() == [39.0]  # per unit spike: 13 spikes x 3 targets


def test_mt_neuron_site_graded_levels() -> None:
    mt = MTNeuron(th1=0.5, th2=0.25, levels=4)
    # one step from v = 0: level k is the largest with m >= th 2^k - th/2
    x = torch.tensor([[0.5, 3.9, 0.2, -0.25], [-2.1, 0.0, 0.0, 1.0]])
    out = mt(x)
    assert out.tolist() == [[0.5, 4.0, 0.0, -0.25], [-2.0, 0.0, 0.0, 1.0]]  # th 2^k: 1, 8, -1, -8, 2 unit spikes
    assert mt.spike_units((x,), out).tolist() == [[1.0, 8.0, 0.0, -1.0], [-8.0, 0.0, 0.0, 2.0]]
    mt.reset()
    c = _count(mt, x)
    assert c.payload.counts[:, 0].tolist() == [5.0, 20.0, 8.0]
    assert c.ops.per_step[1].tolist() == [15.0] and c.ops.per_step_spike.tolist() == [60.0]
    assert bits_of_values(c.payload.seen[0]) == 3  # 0, 1, 4, -1, -8, 2: 6 values


def test_burst_neuron_by_hand() -> None:
    n = BurstNeuron(th1=1.0, th2=0.5, levels=4)  # units 0.25 (positive), 0.125 (negative)
    x = torch.tensor([0.3, 1.6, -0.2, 0.1])
    out = n(x)
    # k = min(floor(m / q + 1/2), 4): 1, 4 (clipped, 0.6 left), -2, 0
    assert out.tolist() == [0.25, 1.0, -0.25, 0.0]
    assert n.spike_units((x,), out).tolist() == [1.0, 4.0, -2.0, 0.0]
    assert torch.isin(out, n.spike_alphabet(out.dtype, out.device)).all()
    assert n.v.tolist() == pytest.approx([0.05, 0.6, 0.05, 0.1])
    out2 = n(torch.zeros(4))  # step 2: the residue of the clipped burst goes out
    assert out2.tolist() == [0.0, 0.5, 0.0, 0.0]


def test_metrics_report_payload_and_both_rules() -> None:
    x = torch.tensor([[3.0, 0.0, -2.0, 1.0], [0.0, 7.0, 0.0, 0.0]])
    snn = _Net(_Burst())

    class _Ref(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3, bias=False)  # 12 MACs per image

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x)

    m = ConversionMetrics(3, {"T1": snn})
    m.update(x, torch.tensor([0, 1]), _Ref(), {"T1": snn})
    f = m.compute()
    assert f["payload/T1/max_units"] == 7 and f["payload/T1/bits"] == 3
    assert f["payload/T1/spikes_per_event"] == pytest.approx(13 / 4) and f["payload/T1/max_units/site"] == 7
    # 2 images: ANN 24 MACs; SNN 12 ACs per event, 39 per unit spike
    assert f["energy/T1/ratio"] == pytest.approx(12 * 0.9 / (24 * 4.6))
    assert f["energy/T1/ratio_spike"] == pytest.approx(39 * 0.9 / (24 * 4.6)) == f["energy/T1/ratio_spike_t1"]
    assert f["energy/T1/snn_acs_spike"] == pytest.approx(39 / 2)


def test_value_bins_small_inputs_take_the_same_bins():
    """Small CPU inputs within +-PAYLOAD_EXACT take a shorter path (one bin per value): the same
    bins as the general one (the same values repeated past its size limit)."""
    from csdlab.eval.counters import PAYLOAD_EXACT, value_bins

    g = torch.Generator().manual_seed(0)
    for values in (torch.tensor([0.0, 1.0]), torch.randint(-PAYLOAD_EXACT, PAYLOAD_EXACT + 1, (500,), generator=g).float(),
                   torch.tensor([0.0, 1.0, 3000.0, -5000.0])):
        big = values.repeat((1 << 16) // len(values) + 1)  # the general path
        assert torch.equal(value_bins(values), value_bins(big))
