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
from collections.abc import Callable, Iterable, Sequence
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
from csdlab.snn.neurons import MTNeuron, check_initial_membrane

__all__ = ["ECMTConverter", "convert_vit", "site_overrides", "thresholds_from_percentiles", "set_thresholds",
           "threshold_errors", "best_scales", "set_neuron_rule", "SEARCH_SCALES"]

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


#: candidate scales of a site's percentile thresholds for the threshold search (docs/methods.md
#: §2.5): 2^(j/2), j = -16..2, i.e. 1/256 .. 2 in half-octaves
SEARCH_SCALES: tuple[float, ...] = tuple(2.0 ** (j / 2) for j in range(-16, 3))
#: activations of a site scored per calibration batch (a fixed-seed sample of the batch tensor)
SEARCH_SAMPLES = 1 << 14


def threshold_errors(x: Tensor, th1: float, th2: float, scales: Sequence[float], steps: int, levels: int = 8,
                     nearest_level: bool = False, initial_membrane: float = 0.0,
                     samples: int | None = SEARCH_SAMPLES) -> Tensor:
    """Squared error of an MT neuron's running-mean output against its input, per candidate scale.

    Each element of ``x`` (an ANN activation at the site) is held as a constant input current for
    ``steps`` steps through an :class:`~csdlab.snn.neurons.MTNeuron` with thresholds
    ``(s th1, s th2)``; the error of the running mean of its outputs after step ``t`` is summed over
    the elements and over ``t = 1..steps``. All scales run in one neuron call: the MT dynamics are
    scale-equivariant (``MT_{s th}(x) = s MT_{th}(x / s)``, the initial membrane included).

    Args:
        x: the site's activations (any shape; a fixed-seed sample of ``samples`` of them is scored
            when there are more; None: all).
        th1, th2: base thresholds (> 0) the scales multiply.
        scales: candidate scales (> 0).
        steps: time steps scored (the readout is read at every one of them).
        levels, nearest_level, initial_membrane: the neuron's settings (those it will run with).

    Returns:
        float64 ``[len(scales)]``: the summed squared errors (sums over batches and processes add up).
    """
    flat = x.detach().flatten()
    if samples is not None and flat.numel() > samples:
        g = torch.Generator(device=flat.device).manual_seed(0)
        flat = flat[torch.randint(flat.numel(), (samples,), generator=g, device=flat.device)]
    scale = torch.tensor(list(scales), dtype=flat.dtype, device=flat.device).unsqueeze(1)  # [K, 1]
    neuron = MTNeuron(th1, th2, levels, nearest_level=nearest_level, initial_membrane=initial_membrane)
    neuron.to(flat.device).step_mode = "m"
    current = (flat / scale).expand(steps, -1, -1).contiguous()  # [steps, K, n], constant over time
    out = neuron(current)
    t = torch.arange(1, steps + 1, dtype=flat.dtype, device=flat.device).view(-1, 1, 1)
    mean = out.cumsum_(0).div_(t).mul_(scale)  # running mean of the outputs at thresholds s th
    return mean.sub_(flat).square_().sum(dim=(0, 2), dtype=torch.float64)


def best_scales(errors: Tensor, scales: Sequence[float]) -> list[float]:
    """Per row of ``errors`` (``[sites, len(scales)]``), the scale of the least error; a tie goes to
    the larger scale (the larger threshold: fewer spikes for the same error)."""
    if errors.dim() != 2 or errors.shape[1] != len(scales):
        raise ValueError(f"errors must be [sites, {len(scales)}] (one column per scale), got {tuple(errors.shape)}")
    order = sorted(range(len(scales)), key=lambda k: -scales[k])  # largest first: argmin returns the first minimum
    return [scales[order[k]] for k in errors[:, order].argmin(1).tolist()]


def set_neuron_rule(snn: nn.Module, nearest_level: bool = False, initial_membrane: float = 0.0) -> int:
    """Set the firing rule and initial membrane of every MT neuron of ``snn``; returns the count."""
    check_initial_membrane(initial_membrane)
    sites = mt_sites(snn)
    for neuron in sites.values():
        neuron.nearest_level, neuron.initial_membrane = bool(nearest_level), float(initial_membrane)
    return len(sites)


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
        threshold_search: per site, scale the percentile thresholds by the candidate of
            :data:`SEARCH_SCALES` whose MT neuron output is closest to the site's ANN activations
            (:func:`threshold_errors`: squared error of the running mean, summed over the
            calibration batches and ``t = 1..search_steps``; docs/methods.md §2.5). Sites with a
            fixed threshold (``softmax_threshold``, ``gelu_thresholds``) keep it. On by default
            (with ``nearest_level``: the most accurate at t = 1-4 of the ablation on both ViT
            checkpoints, docs/methods.md §2.5, at about 2.3-2.5x the paper's energy per step);
            False: the paper's percentiles.
        search_steps: the steps the search scores (None: T).
        nearest_level: MT neurons fire the level nearest to their membrane
            (:class:`~csdlab.snn.neurons.MTNeuron`; on by default; False: the paper's Eq. 25).
        initial_membrane: MT membranes start at this fraction of ``th1``, in ``[0, 1)`` (0: the
            paper's start, the default; 0.5: half a threshold, which hurts here: §2.5).
    """

    name = "ecmt"
    needs_calibration = True

    def __init__(self, T: int = 8, levels: int = 8, percentile: float = 99.0,
                 softmax_threshold: float | None = 0.0125, gelu_thresholds: tuple[float, float] | None = None,
                 multi_step: bool = True, images_per_pass: int | None = None, threshold_search: bool = True,
                 search_steps: int | None = None, nearest_level: bool = True,
                 initial_membrane: float = 0.0) -> None:
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
        for flag, value in (("threshold_search", threshold_search), ("nearest_level", nearest_level)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be true or false, got {value!r}")
        if search_steps is not None and (not isinstance(search_steps, int) or isinstance(search_steps, bool)
                                         or search_steps < 1):
            raise ValueError(f"search_steps must be an integer >= 1 or None (T), got {search_steps!r}")
        if search_steps is not None and not threshold_search:
            raise ValueError("search_steps is set but threshold_search is off: set threshold_search: true "
                             "(or drop search_steps)")
        self.T, self.levels, self.percentile = T, levels, float(percentile)
        self.softmax_threshold, self.gelu_thresholds = softmax_threshold, gelu_thresholds
        self.multi_step, self.images_per_pass = multi_step, images_per_pass
        self.threshold_search, self.search_steps = bool(threshold_search), search_steps
        self.nearest_level, self.initial_membrane = bool(nearest_level), check_initial_membrane(initial_membrane)
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
        numbers per site), summed over processes and averaged over all batches. With
        ``threshold_search`` each batch also adds, per candidate scale, the summed output error of
        :func:`threshold_errors` at that scale of the batch's own percentile thresholds; the scale
        with the least total error multiplies the averaged thresholds.
        """
        float_net = SpikingViT(convert_vit(model, self.levels, spiking=False), time_steps=1)
        sites = site_modules(float_net.net)
        overrides = site_overrides(sites, self.softmax_threshold, self.gelu_thresholds)
        observed = [name for name in sites if name not in overrides]
        device = next(model.parameters()).device
        scales = SEARCH_SCALES if self.threshold_search else ()
        # per site: (hi, lo) percentiles, then the search's summed error of each candidate scale
        sums = torch.zeros(len(observed), 2 + len(scales), dtype=torch.float64, device=device)
        p, steps = self.percentile, self.search_steps or self.T

        def stat(x: Tensor) -> Tensor:
            hl = percentile_pair(x, p)
            if not scales:
                return hl
            # candidates around this batch's own percentile thresholds (one pass: the mean over
            # batches is not known yet); every term is a per-batch sum, so processes add up exactly
            th1, th2 = thresholds_from_percentiles(*hl.tolist())
            errors = threshold_errors(x, th1, th2, scales, steps, self.levels, self.nearest_level,
                                      self.initial_membrane)
            return torch.cat([hl.to(errors), errors])

        def run(x: Tensor) -> None:
            # one pass over the whole batch: the percentiles are those of the batch (passes of
            # fewer images would each add their own percentiles to the sums)
            float_net.images_per_pass = max(len(x), 1)
            float_net(x)

        count, _ = observe_sites(run, [sites[name] for name in observed], stat, sums, batches, device)
        total, n_batches = all_reduce_with_count(sums, count, all_reduce, device, "ECMT")
        means = (total[:, :2] / n_batches).tolist()
        chosen = best_scales(total[:, 2:], scales) if scales else [1.0] * len(observed)
        thresholds = {}
        for name, hl, scale in zip(observed, means, chosen):
            th1, th2 = thresholds_from_percentiles(*hl)
            thresholds[name] = (th1 * scale, th2 * scale)
        thresholds.update(overrides)
        self.thresholds = {name: thresholds[name] for name in sites}  # module order
        log.info("ECMT: calibrated %d MT sites on %d batches (p=%g, %d fixed%s)", len(sites), int(n_batches), p,
                 len(overrides), f", thresholds searched over {steps} steps" if scales else "")
        summary: dict[str, Any] = {"thresholds": {name: list(th) for name, th in self.thresholds.items()},
                                   "batches": int(n_batches)}
        if scales:
            summary["search_scales"] = dict(zip(observed, chosen))
        return summary

    def convert(self, model: nn.Module) -> dict[str, SpikingModel]:
        if not self.thresholds:
            raise ValueError("ECMT thresholds are not set: run calibrate() first (or assign converter.thresholds)")
        net = convert_vit(model, self.levels)
        set_thresholds(net, self.thresholds)
        set_neuron_rule(net, self.nearest_level, self.initial_membrane)
        snn = SpikingViT(net, self.T, multi_step=self.multi_step, images_per_pass=self.images_per_pass)
        return {f"T{self.T}": snn}
