"""Exact conversion of a quantized CSDformer (the QANN) into a spike-driven SNN (docs/methods.md §1.3-1.4).

1. fold every BN into its conv / linear;
2. every quantizer (step s, clip ``lam = s*L``) becomes a DIF neuron. A neuron fed by a conv /
   linear layer gets ``theta = lam``; its spikes stand for ``lam``, which is folded into the next
   layer's weight, so that layer sees binary input;
3. the two attention products become TDEC products of binary trains; the neurons after them
   integrate the integer ``P_t`` with the constant scales absorbed in their thresholds:
   ``theta_a = lam_a T / (lam_q lam_k / sqrt(d))`` and ``theta_o = lam_o T / (lam_a lam_v / N)``,
   which for ``T = L`` are docs/methods.md's ``s_a sqrt(d) / (s_q s_k)`` and ``s_o N / (s_a s_v)``;
4. max-pools become TDEC max-pools.

The SNN runs the model's own forward code on a time-flattened batch ``[T*B, ...]``: convs,
reshapes, residual adds, GAP and head are the same per step, and only the neurons and TDEC
operators (wrapped in :class:`~csdlab.snn.timeflat.TimeFlattened`) see the time axis
``[T, B, ...]``.
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from spikingjelly.activation_based import functional
from torch import Tensor, nn

from csdlab.convert.passes import fold_batchnorm_, scale_input_, swap_modules
from csdlab.eval.api import Converter, SpikingModel
from csdlab.eval.metrics import check_finite
from csdlab.models.csdformer import Attention, CSDformer, MatMul, Mlp, TokenizerStage
from csdlab.quant.lsq import ActQuantizer, LSQQuantizer, QCFSQuantizer
from csdlab.snn.neurons import DelayedIFNode
from csdlab.snn.tdec import TDECMatMul, TDECMaxPool2d
from csdlab.snn.timeflat import TimeFlattened, repeat_steps, unflatten_steps

__all__ = ["SpikingCSDformer", "CSDformerConverter", "convert_csdformer", "save_snn", "load_snn"]

log = logging.getLogger(__name__)


class SpikingCSDformer(SpikingModel):
    """The converted network: images in, the head's logits averaged over output slots 1..t out.

    ``T`` output slots after ``D`` delay steps (latency ``T + D``, docs/methods.md §1.4). With
    ``delay >= T - 1`` (and ``T = L``) the readout after slot T equals the QANN's logits.

    Args:
        model: the rewritten CSDformer (neurons, TDEC operators, folded BN).
        time_steps: T.
        delay: the neurons' delay D.
        levels: the QANN's quantization levels L.
        config: how to rebuild the QANN skeleton (timm name and kwargs), for :func:`load_snn`.
    """

    def __init__(self, model: CSDformer, time_steps: int, delay: int, levels: int,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__(time_steps)
        self.model = model
        self.delay = delay
        self.levels = levels
        self.config = dict(config or {})

    @property
    def latency(self) -> int:
        return self.time_steps + self.delay

    @property
    def first_conv(self) -> nn.Conv2d:
        """The conv that reads the analog image (it costs MACs, not ACs)."""
        return self.model.tokenizer.stages[0].conv.conv

    @property
    def head(self) -> nn.Module:
        """The classifier that reads the analog GAP of the residual stream."""
        return self.model.head

    def sites(self) -> dict[str, nn.Module]:
        # readable names: blocks.0.attn.act_q (the wrappers stripped)
        return {name.removeprefix("model.").replace(".module", ""): m
                for name, m in self.named_modules() if isinstance(m, DelayedIFNode)}

    def analog_layers(self) -> list[nn.Module]:
        return [self.first_conv, self.head]

    def time_flattened(self) -> bool:
        return True

    def train(self, mode: bool = True) -> SpikingCSDformer:
        # inference only: dropout / drop-path in training mode would break the exact conversion
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """Simulate T + D steps on ``images`` ``[B, C, H, W]`` (the analog input, fed to the first
        conv at every step); returns ``[T, B, K]``, the mean of the head's output over slots 1..t."""
        check_finite(images, "image batch")
        functional.reset_net(self.model)  # every call is a fresh sequence
        T = self.time_steps
        x = repeat_steps(images, T)  # [T*B, C, H, W]
        slots = unflatten_steps(self.model(x), T)  # [T, B, K]: head output per output slot
        t = torch.arange(1, T + 1, dtype=slots.dtype, device=slots.device).view(T, 1, 1)
        return slots.cumsum(0) / t

    def extra_repr(self) -> str:
        return f"time_steps={self.time_steps}, delay={self.delay}, levels={self.levels}"


def _quantizer_levels(qann: nn.Module) -> int:
    if not isinstance(qann, CSDformer):
        raise ValueError(f"convert_csdformer takes a csdlab CSDformer, got {type(qann).__name__}")
    if any(isinstance(m, nn.ReLU) for m in qann.modules()):
        raise ValueError(f"cannot convert a float CSDformer (act={qann.act!r}): exact conversion needs "
                         "quantized activations; train it with act='lsq' or act='qcfs'")
    levels = {q.levels for q in qann.modules() if isinstance(q, ActQuantizer)}
    if len(levels) != 1:
        raise ValueError(f"every quantizer must share one level count L, found {sorted(levels)}")
    return levels.pop()


def _thresholds(model: CSDformer, time_steps: int) -> dict[int, Tensor]:
    """Threshold of every quantizer's neuron (keyed by ``id``), folding each spike's value into the
    layer it feeds. Walks the model's blocks by type; returns one entry per quantizer."""
    T = time_steps
    theta: dict[int, Tensor] = {}

    def lam(q: nn.Module) -> Tensor:
        return q.threshold.detach()

    def feeds_linear(q: nn.Module, *layers: nn.Module) -> None:
        theta[id(q)] = lam(q)
        for layer in layers:
            scale_input_(layer, lam(q))

    for m in model.modules():
        if isinstance(m, TokenizerStage) and isinstance(m.act, ActQuantizer):
            feeds_linear(m.act, m.conv.conv)  # max-pool in between commutes with a positive scale
        elif isinstance(m, Mlp):
            feeds_linear(m.act1, m.fc1.linear)
            feeds_linear(m.act2, m.fc2.linear)
        elif isinstance(m, Attention):
            feeds_linear(m.act_in, m.q.linear, m.k.linear, m.v.linear)
            feeds_linear(m.act_out, m.proj.linear)
            # q, k, v spikes go into TDEC products as 0/1; their lam lands in the next thresholds
            for q in (m.act_q, m.act_k, m.act_v):
                theta[id(q)] = lam(q)
            # total_scale reads the contraction length: d for Q K^T, N tokens for A V
            qk_scale = m.qk.total_scale(torch.empty(0, m.head_dim))
            av_scale = m.av.total_scale(torch.empty(0, model.num_tokens))
            theta[id(m.act_attn)] = lam(m.act_attn) * T / (lam(m.act_q) * lam(m.act_k) * qk_scale)
            theta[id(m.act_out)] = lam(m.act_out) * T / (lam(m.act_attn) * lam(m.act_v) * av_scale)
    return theta


def convert_csdformer(qann: CSDformer, time_steps: int | None = None, delay: int | None = None,
                      allow_time_steps_mismatch: bool = False,
                      config: dict[str, Any] | None = None) -> SpikingCSDformer:
    """Convert a quantized CSDformer into its spike-driven SNN (docs/methods.md §1.3-1.4).

    Args:
        qann: the trained quantized model (``act='lsq'`` or ``'qcfs'``); it is not modified.
        time_steps: T; defaults to the quantization levels L (the exact setting).
        delay: DIF delay D; defaults to T - 1 (the smallest exact one).
        allow_time_steps_mismatch: allow T != L (then the clip stays at ``lam`` and the resolution
            becomes ``lam / T``; the SNN no longer equals the QANN).
        config: how to rebuild the QANN skeleton (``model_name``, ``model_kwargs``), kept for
            :func:`load_snn`.

    Returns:
        The SNN, in eval mode, on the QANN's device and dtype.
    """
    levels = _quantizer_levels(qann)
    T = levels if time_steps is None else time_steps
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"time_steps must be an integer >= 1, got {T!r}")
    if T != levels and not allow_time_steps_mismatch:
        raise ValueError(f"time_steps={T} differs from the QANN's quantization levels L={levels}: the SNN "
                         "is exact only for T = L; pass allow_time_steps_mismatch=True to override "
                         "(convert.py: --model.converter.allow_time_steps_mismatch true)")
    D = T - 1 if delay is None else delay
    if not isinstance(D, int) or D < 0:
        raise ValueError(f"delay must be an integer >= 0 (0 = plain IF), got {D!r}")

    snn = copy.deepcopy(qann).eval()
    folded = fold_batchnorm_(snn)
    theta = _thresholds(snn, T)
    quantizers = [m for m in snn.modules() if isinstance(m, ActQuantizer)]
    missing = [type(q).__name__ for q in quantizers if id(q) not in theta]
    if missing:
        raise RuntimeError(f"{len(missing)} quantizers sit where conversion has no rule: {missing}")

    def neuron(q: nn.Module) -> nn.Module:
        return TimeFlattened(DelayedIFNode(theta[id(q)], D), T)

    def tdec(factory: Any, m: nn.Module) -> nn.Module:
        return TimeFlattened(factory(m), T)

    swapped = swap_modules(snn, {LSQQuantizer: neuron, QCFSQuantizer: neuron,
                                 nn.MaxPool2d: partial(tdec, TDECMaxPool2d.from_module),
                                 MatMul: partial(tdec, TDECMatMul.from_module)})
    n_neurons = sum(isinstance(m, DelayedIFNode) for m in snn.modules())
    if n_neurons != len(quantizers) or any(isinstance(m, (ActQuantizer, MatMul, nn.MaxPool2d)) for m in snn.modules()):
        raise RuntimeError(f"expected {len(quantizers)} quantizers to become neurons; swapped {swapped}")
    functional.invalidate_reset_cache(snn)  # SpikingJelly caches the resettable modules per net
    log.info("converted CSDformer: %d BN folded, %d neurons, %d TDEC ops, T=%d, D=%d", len(folded),
             n_neurons, len(swapped) - n_neurons, T, D)
    return SpikingCSDformer(snn, T, D, levels, config).eval()


class CSDformerConverter(Converter):
    """Exact conversion of a quantized CSDformer (docs/methods.md §1.3-1.4), one variant per delay.

    Args:
        delay: the DIF delay D of the main variant (T - 1 = 3 is the smallest exact one for L = 4).
        delays: more delays to evaluate; default: ``delay`` and 0 (the plain IF neuron).
        time_steps: T (default: the quantization levels L; other values need
            ``allow_time_steps_mismatch``).
        allow_time_steps_mismatch: allow T != L (the SNN then no longer equals the QANN).
    """

    name = "csdformer"
    reference_name = "QANN"
    accepts = "csdformer"

    def __init__(self, delay: int = 3, delays: list[int] | None = None, time_steps: int | None = None,
                 allow_time_steps_mismatch: bool = False) -> None:
        all_delays = {delay, 0} if delays is None else {delay, *delays}
        bad = [d for d in all_delays if not isinstance(d, int) or isinstance(d, bool) or d < 0]
        if bad:
            raise ValueError(f"delays must be integers >= 0 (0 = plain IF), got {sorted(map(str, bad))}")
        if time_steps is not None and (not isinstance(time_steps, int) or time_steps < 1):
            raise ValueError(f"time_steps must be an integer >= 1 (or None for T = L), got {time_steps!r}")
        self.delays = sorted(all_delays)
        self.time_steps = time_steps
        self.allow_time_steps_mismatch = allow_time_steps_mismatch

    def check(self, model: nn.Module) -> None:
        levels = _quantizer_levels(model)
        T = levels if self.time_steps is None else self.time_steps
        if T != levels and not self.allow_time_steps_mismatch:
            raise ValueError(f"time_steps={T} differs from the QANN's quantization levels L={levels}: the SNN is "
                             "exact only for T = L; drop time_steps, or set allow_time_steps_mismatch: true "
                             "(--model.converter.allow_time_steps_mismatch true)")

    def convert(self, model: nn.Module) -> dict[str, SpikingModel]:
        return {f"D{d}": convert_csdformer(model, self.time_steps, d, self.allow_time_steps_mismatch)
                for d in self.delays}


def save_snn(snn: SpikingCSDformer, path: str | Path) -> Path:
    """Save the SNN's state with what :func:`load_snn` needs to rebuild it (``config`` must name the
    timm model and its kwargs)."""
    if "model_name" not in snn.config:
        raise ValueError("the SNN has no config['model_name']; pass config= to convert_csdformer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": snn.config, "time_steps": snn.time_steps, "delay": snn.delay,
                "state_dict": snn.state_dict()}, path)
    return path


def load_snn(path: str | Path, map_location: str | torch.device = "cpu") -> SpikingCSDformer:
    """Rebuild a saved SNN: the QANN skeleton from its config, converted, then the saved state
    loaded strictly (thresholds and folded weights included)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    cfg = ckpt["config"]
    skeleton = timm.create_model(cfg["model_name"], **cfg.get("model_kwargs", {}))
    levels = _quantizer_levels(skeleton)
    snn = convert_csdformer(skeleton, ckpt["time_steps"], ckpt["delay"],
                            allow_time_steps_mismatch=ckpt["time_steps"] != levels, config=cfg)
    snn.load_state_dict(ckpt["state_dict"], strict=True)
    return snn
