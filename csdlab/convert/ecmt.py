"""ECMT: training-free conversion of a timm ``VisionTransformer`` into an SNN (docs/methods.md §2).

:class:`ECMTConverter` is the method's :class:`~csdlab.eval.api.Converter`: it checks the model,
calibrates the MT thresholds on the float network (docs/methods.md §2.2) and builds one
:class:`~csdlab.convert.ecmt_vit.SpikingViT`.

The timm model is not rewritten: :func:`convert_vit` deep-copies it (through the ViT harness,
:mod:`csdlab.convert.vit`) and swaps its ``Attention``, ``Mlp``, ``LayerNorm`` and patch
embedding for the ECMT blocks of :mod:`csdlab.convert.ecmt_vit`, which reuse the same ``Linear``
layers; every LayerNorm after the patch embedding (``norm1``, ``norm2``, final ``norm``,
``fc_norm``, ...) becomes an EC.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from torch import Tensor, nn

from csdlab.convert.ecmt_vit import AnalogEmbed, ECMTAttention, ECMTMlp, SpikingViT, mt_sites, site_modules
from csdlab.convert.passes import swap_modules
from csdlab.convert.percentile import percentile_pair
from csdlab.convert.vit import all_reduce_with_count, observe_sites, rewrite_vit, skeleton
from csdlab.eval.api import AllReduce, Converter, Payload, SpikingModel
from csdlab.snn.ecmt import ECFunction, ECMatMul
from csdlab.snn.neurons import MTNeuron

__all__ = ["ECMTConverter", "convert_vit", "site_overrides", "thresholds_from_percentiles", "set_thresholds"]

log = logging.getLogger(__name__)

SOFTMAX_SITE = "mt_attn"  # the MT neuron after the softmax (docs/methods.md §2.2 override)
GELU_SITE = "mt_fc2"  # the MT neuron after the MLP activation (docs/methods.md §2.2 override)

# ECMT's modules allowed to remain after the swap (besides the ViT's own linear / container ones);
# an EC wraps any function F and the patch embedding is analog: both are evaluated as a whole
_KNOWN = (AnalogEmbed, ECMTAttention, ECMTMlp, ECFunction, ECMatMul, MTNeuron)
_OPAQUE = (ECFunction, AnalogEmbed)


def _convert_(net: nn.Module, levels: int, spiking: bool) -> list[str]:
    """Swap, in place, the modules of the (copied) ViT ``net``; returns the swapped names."""
    rules: dict[type, Callable[[nn.Module], nn.Module]] = {
        Attention: lambda m: ECMTAttention(m, levels, spiking),
        Mlp: lambda m: ECMTMlp(m, levels, spiking),
    }
    for m in net.modules():  # every LayerNorm class present (torch's, timm's, subclasses)
        if isinstance(m, nn.LayerNorm):
            rules.setdefault(type(m), ECFunction)
    # the patch embedding is analog: wrapped whole and kept (not descended into: its norm, if any,
    # stays a plain function of the constant image)
    net.patch_embed = AnalogEmbed(net.patch_embed)
    rules[AnalogEmbed] = lambda m: m
    return swap_modules(net, rules)


def convert_vit(model: nn.Module, levels: int = 8, spiking: bool = True) -> nn.Module:
    """ECMT SNN of a timm ``VisionTransformer`` (a converted deep copy; ``model`` is untouched).

    Thresholds start at 1 (set them with :func:`set_thresholds`); the modules are in single-step
    mode until :class:`~csdlab.convert.ecmt_vit.SpikingViT` sets the mode it simulates in.

    Args:
        model: a ``VisionTransformer`` from ``timm.create_model`` (ViT / DeiT, any size, class
            token or average pooling, ``fc_norm``, qkv with or without bias, distilled DeiT).
        levels: MT levels per sign n (docs/methods.md §2.1).
        spiking: False keeps identity at every MT site (EC only: exact at every t).

    Raises:
        ValueError: another architecture (Swin, ConvNeXt, ...: named, with the modules a ViT
            converter cannot convert), attention pooling, or modules ECMT cannot convert inside a
            ViT (listed by name and type).
    """
    snn, swapped = rewrite_vit(model, "ECMT", lambda net: _convert_(net, levels, spiking), _KNOWN, _OPAQUE)
    log.debug("ECMT: swapped %d modules (attention, MLP, norms, patch embedding), %d MT sites, levels=%d",
              len(swapped), len(mt_sites(snn)), levels)
    return snn


# -- calibration (docs/methods.md §2.2) -----------------------------------------------------------

def site_overrides(sites: Iterable[str], softmax_threshold: float | None = 0.0125,
                   gelu_thresholds: tuple[float, float] | None = None) -> dict[str, tuple[float, float]]:
    """Fixed thresholds of docs/methods.md §2.2 for the sites (names) after softmax / after GELU
    (None: percentile)."""
    out = {}
    for name in sites:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == SOFTMAX_SITE and softmax_threshold is not None:
            out[name] = (float(softmax_threshold), float(softmax_threshold))
        elif leaf == GELU_SITE and gelu_thresholds is not None:
            out[name] = (float(gelu_thresholds[0]), float(gelu_thresholds[1]))
    return out


def thresholds_from_percentiles(hi: float, lo: float) -> tuple[float, float]:
    """``th1 = hi``, ``th2 = -lo``; a side the activations never reach (e.g. the negative side
    of a softmax) mirrors the other, since a threshold must stay > 0 and the membrane can still
    overshoot there by up to half a threshold."""
    th1, th2 = hi, -lo
    if th1 <= 0 and th2 <= 0:
        th1 = th2 = 1e-3
    return (th1 if th1 > 0 else th2), (th2 if th2 > 0 else th1)


def set_thresholds(snn: nn.Module, thresholds: dict[str, tuple[float, float]]) -> int:
    """Set ``(th1, th2)`` per site name; every site must be given. Returns the count set."""
    sites = mt_sites(snn)
    missing = sorted(set(sites) - set(thresholds))
    extra = sorted(set(thresholds) - set(sites))
    if missing or extra:
        raise ValueError(f"threshold sites do not match the network: missing {missing}, unknown {extra}")
    for name, (th1, th2) in thresholds.items():
        sites[name].set_thresholds(th1, th2)
    return len(thresholds)


class ECMTConverter(Converter):
    """ECMT (docs/methods.md §2): MT neurons + expectation compensation, training-free.

    Args:
        T: time steps simulated; the readout is reported after every ``t = 1..T``.
        levels: MT levels per sign n (docs/methods.md §2.1).
        percentile: p: ``th1`` = p-th, ``th2`` = -(100-p)-th percentile of each site's float
            activations (docs/methods.md §2.2), in (50, 100].
        softmax_threshold: fixed ``th1 = th2`` after the softmax (None: percentile).
        gelu_thresholds: fixed ``(th1, th2)`` after the MLP activation (None: percentile).
        multi_step: simulate layer by layer on ``[T*B, ...]`` (False: one forward per step).
        images_per_pass: simulate at most this many images at once (memory ~ images x T; None:
            ``ceil(160 / T)``, see :class:`~csdlab.convert.ecmt_vit.SpikingViT`).
    """

    name = "ecmt"
    needs_calibration = True

    def __init__(self, T: int = 8, levels: int = 8, percentile: float = 99.0,
                 softmax_threshold: float | None = 0.0125, gelu_thresholds: tuple[float, float] | None = None,
                 multi_step: bool = True, images_per_pass: int | None = None) -> None:
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise ValueError(f"T must be an integer >= 1, got {T!r}")
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100] (99 in the paper), got {percentile!r}")
        if softmax_threshold is not None and not softmax_threshold > 0:
            raise ValueError(f"softmax_threshold must be > 0 or None (percentile), got {softmax_threshold!r}")
        if gelu_thresholds is not None and (len(gelu_thresholds) != 2 or not all(v > 0 for v in gelu_thresholds)):
            raise ValueError(f"gelu_thresholds must be two values > 0 (th1, th2) or None (percentile), "
                             f"got {gelu_thresholds!r}")
        if images_per_pass is not None and images_per_pass < 1:
            raise ValueError(f"images_per_pass must be >= 1 or None (ceil(160 / T)), got {images_per_pass!r}")
        self.T, self.levels, self.percentile = T, levels, float(percentile)
        self.softmax_threshold, self.gelu_thresholds = softmax_threshold, gelu_thresholds
        self.multi_step, self.images_per_pass = multi_step, images_per_pass
        self.thresholds: dict[str, tuple[float, float]] = {}

    def payload(self) -> Payload:
        """One signed spike of ``th 2^k``, ``k < levels``, per neuron and step."""
        return Payload.power_levels(self.levels)

    def check(self, model: nn.Module) -> None:
        convert_vit(skeleton(model), self.levels)  # the conversion itself, on a copy without data

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]],
                  all_reduce: AllReduce) -> dict[str, Any]:
        """Percentile thresholds of every MT site (docs/methods.md §2.2) from the float network.

        The float network runs once per batch as the SNN lays it out (every site an identity,
        T = 1: each EC is then exactly its function, so this is the ANN with the SNN's operation
        order and the thresholds are those of the activations its first step sees); per site the
        p-th and (100-p)-th percentiles of the whole batch tensor are added to a running sum (two
        numbers per site), summed over processes and averaged over all batches.
        """
        float_net = SpikingViT(convert_vit(model, self.levels, spiking=False), time_steps=1)
        sites = site_modules(float_net.net)
        overrides = site_overrides(sites, self.softmax_threshold, self.gelu_thresholds)
        observed = [name for name in sites if name not in overrides]
        device = next(model.parameters()).device
        sums = torch.zeros(len(observed), 2, dtype=torch.float64, device=device)  # (hi, lo) per site
        p = self.percentile

        def run(x: Tensor) -> None:
            # one pass over the whole batch: the percentiles are those of the batch (passes of
            # fewer images would each add their own percentiles to the sums)
            float_net.images_per_pass = max(len(x), 1)
            float_net(x)

        count, _ = observe_sites(run, [sites[name] for name in observed], lambda x: percentile_pair(x, p), sums,
                                 batches, device)
        total, n_batches = all_reduce_with_count(sums, count, all_reduce, device, "ECMT")
        means = (total / n_batches).tolist()
        thresholds = {name: thresholds_from_percentiles(*hl) for name, hl in zip(observed, means)}
        thresholds.update(overrides)
        self.thresholds = {name: thresholds[name] for name in sites}  # module order
        log.info("ECMT: calibrated %d MT sites on %d batches (p=%g, %d fixed)", len(sites), int(n_batches), p,
                 len(overrides))
        return {"thresholds": {name: list(th) for name, th in self.thresholds.items()}, "batches": int(n_batches)}

    def convert(self, model: nn.Module) -> dict[str, SpikingModel]:
        if not self.thresholds:
            raise ValueError("ECMT thresholds are not set: run calibrate() first (or assign converter.thresholds)")
        net = convert_vit(model, self.levels)
        set_thresholds(net, self.thresholds)
        snn = SpikingViT(net, self.T, multi_step=self.multi_step, images_per_pass=self.images_per_pass)
        return {f"T{self.T}": snn}
