"""DIF neuron (docs/methods.md §1.4): spike counts, exact equality with the LSQ quantizer, reset, errors."""

from __future__ import annotations

import pytest
import torch
from spikingjelly.activation_based import functional

from csdlab.quant import LSQQuantizer
from csdlab.snn.neurons import DelayedIFNode


@pytest.mark.parametrize(("currents", "delay", "count"), [
    ([0.3, 0.3, 0.3, 0.3], 3, 1),  # floor(1.2 + 0.5)
    ([0.0, 0.0, 0.0, 2.6], 3, 3),  # back-loaded input still counted when D = T - 1
    ([0.0, 0.0, 0.0, 2.6], 0, 1),  # ... but plain IF has only one step left to fire
    ([5.0, 0.0, 0.0, 0.0], 3, 4),  # saturates at T
    ([-1.0, 0.2, 0.2, 0.2], 3, 0),  # mixed sign: net -0.4 -> 0
    ([2.0, -2.0, 0.0, 0.0], 0, 1),  # IF fires early (one spike per step) and cannot take it back
    ([2.0, -2.0, 0.0, 0.0], 3, 0),
])
def test_dif_spike_count(currents: list[float], delay: int, count: int) -> None:
    spikes = DelayedIFNode(v_threshold=1.0, delay=delay)(torch.tensor(currents).view(4, 1))
    assert spikes.shape == (4, 1)
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    assert spikes.sum().item() == count


@pytest.mark.parametrize("delay", [3, 5])
@pytest.mark.parametrize("profile", ["uniform", "mixed_sign", "back_loaded"])
def test_dif_equals_lsq(delay: int, profile: str) -> None:
    """With D >= T-1 the spike count is the LSQ level of the mean current, on every element."""
    torch.manual_seed(0)
    T, s = 4, 0.37
    lsq = LSQQuantizer(levels=T).double().eval()
    lsq.step_size.data.fill_(s)
    x = torch.randn(T, 2000, dtype=torch.float64)  # per-step pre-activations, mean is the QANN's
    if profile == "uniform":
        x = x[:1].expand(T, -1) * 1.5
    elif profile == "back_loaded":
        x = torch.cat([torch.zeros(T - 1, 2000, dtype=torch.float64), x[:1] * 4.0])
    node = DelayedIFNode(torch.tensor(s * T), delay).double()
    spikes = node(x)
    # a spike is worth theta = s*T, so the mean over T steps is (count * s): compare the levels
    levels = torch.round(lsq(x.mean(0)).detach() / s)
    assert torch.equal(spikes.sum(0), levels)
    assert len(torch.unique(levels)) >= 4  # several levels are hit, not only 0 and saturation


def test_dif_reset_and_state() -> None:
    node = DelayedIFNode(1.0, delay=1)
    node(torch.full((2, 3), 0.7))
    assert node.v.shape == (3,) and torch.allclose(node.v, torch.full((3,), 0.9))  # 0.5 + 1.4 - 1
    functional.reset_net(node)
    assert node.v is None
    # a fresh sequence of another shape works after reset
    assert node(torch.full((4, 5), 0.3)).sum().item() == 5.0
    assert "v_threshold" in node.state_dict()


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(v_threshold=0.0), "v_threshold"),
    (dict(v_threshold=-1.0), "v_threshold"),
    (dict(v_threshold=1.0, delay=-1), "delay"),
])
def test_dif_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DelayedIFNode(**kwargs)


def test_dif_from_quantizer() -> None:
    q = LSQQuantizer(levels=4)
    q.step_size.data.fill_(0.25)
    assert float(DelayedIFNode.from_quantizer(q, delay=2).v_threshold) == 1.0
