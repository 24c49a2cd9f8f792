"""ConversionMetrics on hand-built networks whose every figure is known in advance."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from csdlab.eval.metrics import ConversionMetrics
from tests.eval.stubs import OneSiteModel, PassSite


class _Reference(nn.Module):
    """Logits = the image's 3 pixels (one Linear of identity weights: 3 x 3 = 9 MACs per image)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class _Snn(OneSiteModel):
    """Two readout steps: step 1 a fixed wrong guess (class 2, logits [0, 0, 1]), step 2 the
    reference's logits; one neuron site and one spike-fed Linear (fan-out 1) per step."""

    time_steps = 2
    readout_steps = [1, 2]

    def __init__(self) -> None:
        super().__init__()
        self.site = PassSite()
        self.fc = nn.Linear(3, 1, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        spikes = self.site((images > 0).float().repeat(2, 1))  # [T*B, 3]
        self.fc(spikes)
        guess = torch.tensor([0.0, 0.0, 1.0]).expand_as(images)
        return torch.stack([guess, images])


def test_every_figure_on_a_hand_built_network() -> None:
    x = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    y = torch.tensor([0, 1, 2, 2])  # the reference (argmax of x) is right on 0, 1, 3: 3 / 4
    snn = _Snn()
    m = ConversionMetrics(3, {"T2": snn})
    m.update(x[:2], y[:2], _Reference(), {"T2": snn})  # two batches: sums across them
    m.update(x[2:], y[2:], _Reference(), {"T2": snn})
    f = m.compute()
    assert f["samples"] == 4
    assert f["ref/top1"] == pytest.approx(0.75)
    assert f["snn/T2/top1_t1"] == pytest.approx(0.5)  # the guess (class 2) is right for images 2, 3
    assert f["snn/T2/top1_t2"] == f["snn/T2/top1"] == pytest.approx(0.75)
    assert f["snn/T2/agreement"] == 1.0 and f["snn/T2/max_logit_diff"] == 0.0
    # step 1: mean |[0,0,1] - x| per image: (4 + 3 + 2 + 4) / 3 / 4
    assert f["snn/T2/logit_error_t1"] == pytest.approx((4 / 3 + 3 / 3 + 2 / 3 + 4 / 3) / 4)
    assert f["snn/T2/logit_error"] == 0.0
    # non-zero pixels: 2 + 2 + 1 + 1 = 6 per step, 2 steps; neuron-steps 4 images x 3 x 2
    assert f["snn/T2/firing_rate"] == pytest.approx(12 / 24) == f["snn/T2/firing_rate/site"]
    # ANN: 9 MACs per image; SNN: 6 ACs per step (events x fan-out 1)
    assert f["energy/ann_macs"] == 9.0
    assert f["energy/T2/snn_acs"] == pytest.approx(12 / 4) and f["energy/T2/snn_macs"] == 0.0
    assert f["energy/T2/ratio_t1"] == pytest.approx(6 * 0.9 / (36 * 4.6))
    assert f["energy/T2/ratio_t2"] == f["energy/T2/ratio"] == pytest.approx(12 * 0.9 / (36 * 4.6))


def test_nan_images_are_refused() -> None:
    m = ConversionMetrics(3, {"T2": _Snn()})
    with pytest.raises(ValueError, match="NaN/inf"):
        m.update(torch.tensor([[float("nan"), 0.0, 1.0]]), torch.tensor([0]), _Reference(), {"T2": _Snn()})
