"""ECMT with burst neurons (docs/peers.md): percentile ranges whatever ECMT's own defaults are, and a
large burst carries the ANN's value in one step."""

from __future__ import annotations

import torch

from csdlab.convert.ecmt import ECMTConverter
from csdlab.convert.ecmt_burst import ECMTBurstConverter
from tests.convert.test_ecmt import _images, _tiny_vit


def _calibrate(conv: ECMTConverter, ann: torch.nn.Module) -> ECMTConverter:
    conv.calibrate(ann, [_images(8, seed=s) for s in (10, 11)], lambda t: t)
    return conv


def test_burst_ranges_are_the_percentiles_not_ecmts_searched_levels() -> None:
    ann = _tiny_vit()
    burst = _calibrate(ECMTBurstConverter(T=1, burst=16, percentile=99.0, softmax_threshold=0.0125), ann)
    plain = _calibrate(ECMTConverter(T=1, percentile=99.0, threshold_search=False, nearest_level=False), ann)
    searched = _calibrate(ECMTConverter(T=1, percentile=99.0), ann)  # ECMT's defaults search the levels
    assert burst.thresholds.keys() == plain.thresholds.keys()
    for site, (a, b) in burst.thresholds.items():
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(plain.thresholds[site][0])), site
        assert torch.equal(torch.as_tensor(b), torch.as_tensor(plain.thresholds[site][1])), site
    assert any(not torch.equal(torch.as_tensor(searched.thresholds[s][0]), torch.as_tensor(burst.thresholds[s][0]))
               for s in burst.thresholds)


def test_a_large_burst_reaches_the_ann_in_one_step() -> None:
    ann = _tiny_vit()
    x = _images(16, seed=3)
    with torch.no_grad():
        ref = ann(x)
        errors = {}
        for L in (4, 64, 1024):
            conv = _calibrate(ECMTBurstConverter(T=1, burst=L, percentile=100.0), ann)
            snn = conv.convert(ann)["T1"]
            errors[L] = (snn(x)[-1] - ref).abs().mean().item() / ref.abs().mean().item()
    assert errors[1024] < errors[64] < errors[4]
    assert errors[1024] < 0.02  # ranges at the largest value: only the quantisation step th / L is lost
