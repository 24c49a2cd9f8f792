"""ECMT with burst neurons: STA's large first-step payload brought into ECMT (docs/peers.md).

:class:`ECMTBurstConverter` is ECMT (same conversion, same expectation compensation around every
LayerNorm, GELU, softmax and attention product, same percentile calibration) with every
multi-threshold neuron replaced by a :class:`~csdlab.snn.burst.BurstNeuron`: a signed burst of up to
``burst`` unit spikes ``th / burst`` per step instead of one power-of-two level. The calibrated
threshold ``th`` becomes the largest value one step sends (ECMT: the smallest), so the default keeps
no fixed softmax threshold (the percentile of the softmax output is its range).
"""

from __future__ import annotations

from torch import nn

from csdlab.convert.ecmt import ECMTConverter, convert_vit, set_thresholds
from csdlab.convert.ecmt_vit import SpikingViT
from csdlab.eval.api import Payload, SpikingModel
from csdlab.snn.burst import swap_to_bursts

__all__ = ["ECMTBurstConverter"]


class ECMTBurstConverter(ECMTConverter):
    """ECMT with a burst of up to ``burst`` unit spikes per neuron and step (module docstring).

    Args:
        T: time steps simulated; the readout is reported after every ``t = 1..T``.
        burst: the largest burst L (the payload: ``ceil(log2(2L + 1))`` bits per event).
        percentile: p: each site's range ``th1`` / ``th2`` is the p-th / (100-p)-th percentile of its
            float activations (ECMT's calibration). 99.9 by default: what a burst cannot send in one
            step waits in the membrane, so a range clipping 1 % of the values costs the first step
            (Fashion-MNIST ViT, T = 1, 500 images: 86.6 % at p = 99, 89.2 % at 99.9, 88.2 % at 100).
        softmax_threshold: a fixed range after the softmax (None: its percentile).
        gelu_thresholds: fixed ``(th1, th2)`` after the MLP activation (None: percentile).
        multi_step, images_per_pass: as :class:`~csdlab.convert.ecmt.ECMTConverter`.
    """

    name = "ecmt_burst"

    def __init__(self, T: int = 2, burst: int = 16, percentile: float = 99.9, softmax_threshold: float | None = None,
                 gelu_thresholds: tuple[float, float] | None = None, multi_step: bool = True,
                 images_per_pass: int | None = None) -> None:
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1 (the largest burst per neuron and step), got {burst!r}")
        # percentile ranges, no level search and no nearest-level firing: both are ECMT's multi-threshold
        # options (their error is that of power-of-two levels), and with them a burst of 4 at T = 1 fell to 13 %
        super().__init__(T=T, percentile=percentile, softmax_threshold=softmax_threshold,
                         gelu_thresholds=gelu_thresholds, multi_step=multi_step, images_per_pass=images_per_pass,
                         threshold_search=False, nearest_level=False)
        self.burst = burst

    def payload(self) -> Payload:
        return Payload.burst(self.burst)

    def convert(self, model: nn.Module) -> dict[str, SpikingModel]:
        if not self.thresholds:
            raise ValueError("ECMT thresholds are not set: run calibrate() first (or assign converter.thresholds)")
        net = convert_vit(model, self.levels)
        set_thresholds(net, self.thresholds)
        swap_to_bursts(net, self.burst)
        snn = SpikingViT(net, self.T, multi_step=self.multi_step, images_per_pass=self.images_per_pass)
        return {f"T{self.T}": snn}
