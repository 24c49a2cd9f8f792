"""Every converter on a GPU against the CPU, on the same images (``pytest -m gpu``; issue 17).

Each method is converted from the same checkpoint on the CPU and on ``CSDLAB_GPU_TEST_DEVICE``
(default ``cuda``; skipped, with the reason, where that device does not exist) and simulated in
float64 with the evaluation's counters on (``FiringCounter``, ``OpCounter``), so every count is
made on the device too. Asserted:

* predictions (argmax of the final readout) equal;
* logits within ``LOGIT_ATOL``: in float64 the devices differ only in the order of floating-point
  sums (about 1e-15 relative), while one spike or level decided differently moves a logit by orders
  of magnitude more than the tolerance;
* CSDformer (exact: float64 SNN == QANN): the integer spike count of every neuron equals the
  QANN's quantization level on each device, and the counts of the two devices are equal;
* ECMT, MBE: the firing and operation counts of the two devices agree within ``COUNT_RTOL``; ECMT's
  thresholds calibrated on each device (the GPU selects percentiles with ``topk``) agree.

``CSDLAB_GPU_TEST_DEVICE=cpu pytest -m gpu tests/gpu`` runs the same comparison CPU against CPU
(two separate conversions and simulations), which checks the test logic on a machine without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from csdlab.convert.csdformer import convert_csdformer
from csdlab.convert.ecmt import ECMTConverter
from csdlab.convert.mbe import MBEConverter
from csdlab.eval.api import SpikingModel
from csdlab.eval.counters import SimulationCounters
from csdlab.lit.data import ImageDataModule
from csdlab.lit.module import load_classifier
from csdlab.quant import ActQuantizer

pytestmark = pytest.mark.gpu

DEVICE_ENV = "CSDLAB_GPU_TEST_DEVICE"
LOGIT_ATOL = 1e-6  # float64 logits of the digits models are O(1-10)
COUNT_RTOL = 1e-9  # firing / operation counts: float64 sums of integers, exact unless a spike differs


@pytest.fixture(scope="module")
def device() -> Iterator[torch.device]:
    dev = torch.device(os.environ.get(DEVICE_ENV, "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"no CUDA GPU here (torch.cuda.is_available() is False); {DEVICE_ENV}=cpu runs the "
                    "same comparison CPU against CPU")
    if dev.type not in ("cuda", "cpu"):
        pytest.skip(f"{DEVICE_ENV}={dev} is neither cuda nor cpu")
    # full-precision products on the GPU (TF32 would change float32 sums; float64 ignores it anyway)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield dev
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, list[Tensor]]:
    """64 test images and 2 calibration batches of 64 training images (digits, embedded)."""
    dm = ImageDataModule("digits", batch_size=64)
    dm.setup()
    x, _ = next(iter(dm._loader(dm.test_set, shuffle=False)))
    calib = [b for (b, _), _ in zip(dm.calibration_dataloader(), range(2))]
    return x, calib


def _counted(snn: SpikingModel, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(readout [R, B, K], firing counts [2, sites], ops per step [2, T])``, counted on ``x``'s device."""
    with torch.no_grad(), SimulationCounters(snn, device=x.device) as c:
        readout = snn(x)
    for t in (readout, c.firing.counts, c.ops.per_step):
        assert t.device.type == x.device.type, "a result left the device it was computed on"
    return readout.cpu(), c.firing.counts.cpu(), c.ops.per_step.cpu()


def _assert_same_outputs(ref: Tensor, out: Tensor) -> None:
    final_ref, final = ref[-1], out[-1]
    assert torch.equal(final_ref.argmax(-1), final.argmax(-1)), "predictions differ between the devices"
    torch.testing.assert_close(out, ref, rtol=0, atol=LOGIT_ATOL)


def test_csdformer_counts_equal_qann_levels_on_both_devices(digits_qann: Path, device: torch.device,
                                                            digits: tuple[Tensor, list[Tensor]]) -> None:
    x = digits[0].double()
    qann, _ = load_classifier(digits_qann)
    results = []
    for dev in (torch.device("cpu"), device):
        model = qann.double().to(dev).eval()
        levels: dict[str, Tensor] = {}
        hooks = [q.register_forward_hook(lambda m, i, o, name=name: levels.__setitem__(name, o.div(m.step).round()))
                 for name, q in model.named_modules() if isinstance(q, ActQuantizer)]
        with torch.no_grad():
            ref = model(x.to(dev))
        for h in hooks:
            h.remove()
        snn = convert_csdformer(model)
        counts: dict[str, Tensor] = {}
        hooks = [m.register_forward_hook(lambda m, i, o, name=name: counts.__setitem__(name, o.sum(0)))
                 for name, m in snn.sites().items()]  # [T, B, ...] spikes -> count per neuron
        readout, firing, ops = _counted(snn, x.to(dev))
        for h in hooks:
            h.remove()
        assert counts.keys() == levels.keys() and len(counts) > 10
        for name, level in levels.items():  # exact conversion: every count is the QANN's level
            assert torch.equal(counts[name], level), f"{dev}: {name} spike counts differ from the QANN's levels"
        torch.testing.assert_close(readout[-1], ref.cpu(), rtol=0, atol=LOGIT_ATOL)
        results.append((readout, firing, ops, {k: v.cpu() for k, v in counts.items()}))
    (r0, f0, o0, c0), (r1, f1, o1, c1) = results
    _assert_same_outputs(r0, r1)
    assert all(torch.equal(c0[k], c1[k]) for k in c0), "integer spike counts differ between the devices"
    assert torch.equal(f0, f1) and torch.equal(o0, o1), "firing / operation counts differ between the devices"


def _assert_counts_close(ref: tuple[Tensor, Tensor], out: tuple[Tensor, Tensor]) -> None:
    for a, b in zip(ref, out, strict=True):
        torch.testing.assert_close(b, a, rtol=COUNT_RTOL, atol=0)
    assert ref[0].sum() > 0  # something was counted


def test_ecmt_same_on_both_devices(digits_vit: Path, device: torch.device,
                                   digits: tuple[Tensor, list[Tensor]]) -> None:
    x, calib = digits[0].double(), [b.double() for b in digits[1]]
    vit, _ = load_classifier(digits_vit)
    vit = vit.double().eval()
    conv = ECMTConverter(T=8)
    conv.calibrate(vit, calib, lambda t: t)
    on_device = ECMTConverter(T=8)
    on_device.calibrate(vit.to(device), [b.to(device) for b in calib], lambda t: t)
    for site, th in conv.thresholds.items():  # percentiles of float32 activations: ~1 ulp apart at most
        assert on_device.thresholds[site] == pytest.approx(th, rel=1e-5), site
    outs = []
    for dev in (torch.device("cpu"), device):  # the same (CPU) thresholds on both devices
        model = vit.to(dev)
        outs.append(_counted(conv.convert(model)["T8"], x.to(dev)))
    (r0, *c0), (r1, *c1) = outs
    _assert_same_outputs(r0, r1)
    _assert_counts_close(tuple(c0), tuple(c1))
    assert (r0[-1] - r0[0]).abs().max() > 1e-3  # a real simulation: the readout changes over t


def test_mbe_same_on_both_devices(digits_vit: Path, device: torch.device,
                                  digits: tuple[Tensor, list[Tensor]]) -> None:
    x, calib = digits[0].double(), [b.double() for b in digits[1]]
    vit, _ = load_classifier(digits_vit)
    vit = vit.double().eval()
    conv = MBEConverter(Ts=[8])
    conv.calibrate(vit, calib, lambda t: t)
    outs = []
    for dev in (torch.device("cpu"), device):
        model: nn.Module = vit.to(dev)
        outs.append(_counted(conv.convert(model)["T8"], x.to(dev)))
    (r0, *c0), (r1, *c1) = outs
    _assert_same_outputs(r0, r1)
    _assert_counts_close(tuple(c0), tuple(c1))
    with torch.no_grad():  # the SNN is not the ANN itself (spiking neurons are in place)
        assert (r0[-1] - vit.cpu()(x)).abs().max() > 1e-6
