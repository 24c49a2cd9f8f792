"""MBE conversion of a timm ``VisionTransformer``, training-free (docs/methods.md §4).

:class:`MBEConverter` is the method's :class:`~csdlab.eval.api.Converter`: it checks the model,
calibrates the identity neurons' ranges (:func:`calibrate_ranges`, float model, training images)
and builds one :class:`~csdlab.convert.mbe_vit.MBESpikingModel` per ``T``.

:func:`convert_vit_mbe` deep-copies the model (through the ViT harness, :mod:`csdlab.convert.vit`)
and swaps modules, reusing the ANN's own ``Linear`` layers and LayerNorm parameters (weights
untouched): every ``LayerNorm`` (``norm1``, ``norm2``, the final ``norm``, ``qk``/``fc`` norms)
becomes an :class:`~csdlab.snn.mbe_ops.MBELayerNorm` (switch ``layernorm``), ``Attention`` and
``Mlp`` the blocks of :mod:`csdlab.convert.mbe_vit`. Patch embedding, class token, position
embedding, residual adds and the head stay as in the ANN (the head reads the analog output of the
final norm).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from spikingjelly.activation_based import functional
from timm.layers import PatchEmbed
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from torch import Tensor, nn

from csdlab.convert.mbe_vit import (EXACT_GROUPS, MBEAttention, MBEMlp, MBESpikingModel, NeuronFactory,
                                    check_exact_groups, mbe_sites)
from csdlab.convert.passes import swap_modules
from csdlab.convert.vit import all_reduce_with_count, check_images, observe_sites, rewrite_vit, skeleton
from csdlab.eval.api import AllReduce, Converter, SpikingModel
from csdlab.snn.counting import bincount_below
from csdlab.snn.mbe import FIT_COMMAND, MBENeuron, load_codes
from csdlab.snn.mbe_fit import check_code_variant, variant_codes
from csdlab.snn.mbe_ops import ANDProduct, MBELayerNorm, MBELinear, MBEProduct, MBESoftmax

__all__ = ["MBEConverter", "convert_vit_mbe", "identity_sites", "set_ranges", "calibrate_ranges", "GROUPS"]

log = logging.getLogger(__name__)

GROUPS = ("gelu", "softmax", "layernorm", "products", "linear_inputs")


# MBE's modules allowed to remain after the swap (besides the ViT's own linear / container ones);
# the patch embedding is analog and computed as in the ANN (as a whole)
_KNOWN = (PatchEmbed, MBEAttention, MBEMlp, MBELayerNorm, MBELinear, MBEProduct, MBESoftmax, ANDProduct, MBENeuron,
          nn.Softmax, nn.GELU)
_OPAQUE = (PatchEmbed,)


def _check_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def convert_vit_mbe(model: nn.Module, T: int, N: int = 8, gelu_bases: int = 4,
                    ranges: dict[str, float] | None = None, gelu: bool = True, softmax: bool = True,
                    layernorm: bool = True, products: bool = True, linear_inputs: bool = True,
                    fast: bool = True, exact: bool = False, table_dir: str | Path | None = None,
                    exact_groups: Iterable[str] = (), codes: str = "fitted") -> nn.Module:
    """MBE SNN of a timm ``VisionTransformer`` (a converted deep copy; ``model`` is untouched).

    Args:
        model: a ``VisionTransformer`` (ViT / DeiT, any size, class token or average pooling,
            distilled DeiT).
        T: time steps of every neuron (a fitted table must exist).
        N: bases of the identity, ``exp2``, ``recip`` and ``rsqrt`` neurons.
        gelu_bases: bases of the GELU neuron.
        ranges: identity-neuron range per site name (:func:`calibrate_ranges`); ``None``: 1 everywhere.
        gelu: spiking GELU.
        softmax: spiking softmax.
        layernorm: spiking LayerNorm.
        products: spiking ``q k^T`` and ``attn v``.
        linear_inputs: identity neurons before the block's linear layers.
        fast: exact table path (else step-by-step simulation; same numbers).
        exact: every neuron replaced by its exact function (the converted network equals the ANN).
        table_dir: folder of fitted ``mbe_T{T}_N{N}.json`` files (``convert.py mbe-fit --out_dir``);
            ``None``: the tables shipped with csdlab.
        exact_groups: neuron groups (:data:`~csdlab.convert.mbe_vit.EXACT_GROUPS`, or ``identity``)
            replaced by their exact function while the rest spike (the per-group error ablation).
        codes: one of :data:`~csdlab.snn.mbe_fit.CODE_VARIANTS` (``fitted``: the shipped codes; the
            others take back one of csdlab's departures from the paper's neuron, docs/mbe.md).

    Raises:
        ValueError: bad ``T`` / ``N``; no fitted table for ``(T, N)`` (names the command that fits
            it); another architecture (named, with the modules a ViT converter cannot convert), or
            modules MBE cannot convert inside a ViT (listed by name and type).
    """
    _check_int("T", T)
    _check_int("N (bases)", N)
    _check_int("gelu_bases", gelu_bases)
    code_set = variant_codes(T, N, codes, table_dir)
    gelu_code = variant_codes(T, gelu_bases, codes, table_dir)["gelu"]
    make = NeuronFactory(code_set, gelu_code, fast, exact, frozenset(exact_groups))

    def swap(net: nn.Module) -> list[str]:
        swapped: list[str] = []
        if layernorm:  # first, so the norms inside attention / MLP are converted too
            ln_types = {type(m) for m in net.modules() if isinstance(m, nn.LayerNorm)}
            swapped += swap_modules(net, {t: lambda m: MBELayerNorm(m, make.neuron("identity", "centred"),
                                                                   make.neuron("rsqrt"))
                                          for t in ln_types})
        return swapped + swap_modules(net, {
            Attention: lambda m: MBEAttention(m, make, softmax, products, linear_inputs),
            Mlp: lambda m: MBEMlp(m, make, gelu, linear_inputs),
        })

    # without the spiking LayerNorm, the ANN's norms stay (evaluated exactly)
    known = _KNOWN if layernorm else _KNOWN + tuple({type(m) for m in model.modules() if isinstance(m, nn.LayerNorm)})
    snn, swapped = rewrite_vit(model, "MBE", swap, known, _OPAQUE)
    if ranges is not None:
        set_ranges(snn, ranges)
    log.info("MBE: T=%d N=%d (GELU %d), swapped %d modules, %d neuron sites", T, N, gelu_bases, len(swapped),
             len(mbe_sites(snn)))
    return snn


def identity_sites(snn: nn.Module) -> dict[str, MBENeuron]:
    """The identity neurons (the sites with a calibrated range)."""
    return {n: m for n, m in mbe_sites(snn).items() if m.code.primitive == "identity"}


def set_ranges(snn: nn.Module, ranges: dict[str, float]) -> int:
    """Set every identity neuron's range (``in_scale = out_scale``); all sites must be given."""
    sites = identity_sites(snn)
    missing = sorted(set(sites) - set(ranges))
    if missing:
        raise ValueError(f"identity ranges missing for sites {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                         "calibrate the converter on the same architecture and switches")
    for name, m in sites.items():
        m.set_scale(float(ranges[name]))
    return len(sites)


def _log_edges(bins_per_octave: int = 16, lo_exp: int = -24, hi_exp: int = 24) -> Tensor:
    k = torch.arange(lo_exp * bins_per_octave, hi_exp * bins_per_octave + 1, dtype=torch.float64)
    return torch.exp2(k / bins_per_octave)


@torch.no_grad()
def calibrate_ranges(model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]], all_reduce: AllReduce,
                     percentile: float = 100.0, T: int = 16, N: int = 8, gelu_bases: int = 4,
                     table_dir: str | Path | None = None, **switches: bool) -> dict[str, float]:
    """Identity-neuron range per site from the float model on training images.

    The network is converted with every neuron exact (so it is the ANN) and each identity site
    histograms ``|x|`` in log-spaced bins (16 per octave, ``2^-24 .. 2^24``). The histograms are
    summed over processes by ``all_reduce`` (a sum), so every process derives the same range: the
    upper edge of the bin holding the ``percentile``-th value (100: the maximum, rounded up by at
    most ``2^(1/16)``, 4.4 %).

    Args:
        model: the float ANN.
        batches: this process's calibration images (``(x, y)`` tuples accepted).
        all_reduce: sums a tensor over processes.
        percentile: in ``(0, 100]``.
        T: a fitted ``T`` (ranges do not depend on it).
        N: bases (as converted).
        gelu_bases: GELU bases (as converted).
        table_dir: folder of fitted parameter files (``None``: the shipped ones).
        **switches: the operation-group switches of :func:`convert_vit_mbe` (they decide the sites).
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    snn = convert_vit_mbe(model, T, N, gelu_bases, exact=True, table_dir=table_dir, **switches)
    sites = identity_sites(snn)
    names = list(sites)
    edges = _log_edges()
    # on the model's device: the hooks add to it there (no copy to the host per site and batch)
    hist = torch.zeros(len(names), len(edges) + 1, dtype=torch.float64, device=next(snn.parameters()).device)
    device_edges: dict[tuple[str, torch.dtype], Tensor] = {}

    def histogram(x: Tensor) -> Tensor:
        x = x.detach().abs()
        key = (str(x.device), x.dtype)
        if key not in device_edges:
            device_edges[key] = edges.to(device=x.device, dtype=x.dtype)
        idx = torch.bucketize(x.flatten(), device_edges[key])  # edges[i-1] < |x| <= edges[i]
        return bincount_below(idx, len(edges) + 1)

    def run(x: Tensor) -> None:
        check_images(x)  # a NaN would land in the top bin and set the range silently
        functional.reset_net(snn)
        snn(x)

    seen, images = observe_sites(run, [sites[n] for n in names], histogram, hist, batches,
                                 next(snn.parameters()).device)
    # one all-reduce: the histograms and the number of images seen, summed over processes
    hist, _ = all_reduce_with_count(hist, images, all_reduce, next(model.parameters()).device, "MBE")
    if not names:
        return {}
    cum = hist.cumsum(1)
    need = cum[:, -1:] * (percentile / 100.0)
    bin_idx = (cum < need * (1 - 1e-12)).sum(1).clamp(max=len(edges) - 1)  # first bin reaching the share
    ranges = {n: float(edges[int(b)]) for n, b in zip(names, bin_idx)}
    log.info("MBE calibration: %d batches on this process, %d identity sites, ranges %.3g .. %.3g", seen,
             len(ranges), min(ranges.values()), max(ranges.values()))
    return ranges


class MBEConverter(Converter):
    """MBE conversion (docs/methods.md §4): one variant ``T{T}`` per entry of ``Ts``.

    Args:
        Ts: time steps per neuron, one spiking model each (each uses the parameters fitted for it).
        bases: bases of the identity, ``exp2``, ``recip`` and ``rsqrt`` neurons.
        gelu_bases: bases of the GELU neuron.
        gelu: spiking GELU.
        softmax: spiking softmax.
        layernorm: spiking LayerNorm.
        products: spiking activation-by-activation products.
        linear_inputs: spiking inputs of the block's linear layers.
        range_percentile: identity range = this percentile of ``|x|`` per site (100: the maximum).
        fast: exact-table neurons (same numbers as the step-by-step simulation).
        table_dir: folder of fitted parameter files (``convert.py mbe-fit --out_dir``); ``None``: the
            tables shipped with csdlab.
        exact: neuron groups (:data:`~csdlab.convert.mbe_vit.EXACT_GROUPS`: ``gelu``, ``exp2``,
            ``recip``, ``rsqrt``, the identity roles ``centred``, ``products``, ``linear_inputs``, or
            ``identity`` for all three) replaced by their exact function in every variant.
        ablation: besides ``T{T}``, one variant ``T{T}_exact_{group}`` per group of ``EXACT_GROUPS``
            (that group exact, the rest spiking): the error each group leaves, in one run.
        global_range: one identity range for every site (the largest calibrated one) instead of a
            range per site (the paper's single scale; an ablation).
        codes: :data:`~csdlab.snn.mbe_fit.CODE_VARIANTS`: ``fitted`` (default), or one of csdlab's
            departures from the paper's neuron taken back (``truncating``, ``unsigned``,
            ``no_offsets``; docs/mbe.md).
    """

    name = "mbe"
    needs_calibration = True

    def __init__(self, Ts: list[int] = [8, 10, 12, 16], bases: int = 8, gelu_bases: int = 4,  # noqa: B006
                 gelu: bool = True, softmax: bool = True, layernorm: bool = True, products: bool = True,
                 linear_inputs: bool = True, range_percentile: float = 100.0, fast: bool = True,
                 table_dir: str | None = None, exact: list[str] = [], ablation: bool = False,  # noqa: B006
                 global_range: bool = False, codes: str = "fitted") -> None:
        if not Ts:
            raise ValueError("Ts must list at least one T")
        self.Ts = [_check_int("T", T) for T in Ts]
        self.bases, self.gelu_bases = _check_int("bases", bases), _check_int("gelu_bases", gelu_bases)
        self.switches = dict(gelu=gelu, softmax=softmax, layernorm=layernorm, products=products,
                             linear_inputs=linear_inputs)
        if not 0 < range_percentile <= 100:
            raise ValueError(f"range_percentile must be in (0, 100], got {range_percentile}")
        self.range_percentile, self.fast, self.table_dir = range_percentile, fast, table_dir
        self.exact, self.codes = check_exact_groups(exact), check_code_variant(codes)
        self.ablation, self.global_range = ablation, global_range
        self.ranges: dict[str, float] | None = None
        for T in self.Ts:  # fail before any data is read
            load_codes(T, self.bases, table_dir)
            load_codes(T, self.gelu_bases, table_dir)

    def check(self, model: nn.Module) -> None:
        # the conversion itself, on a copy without data
        convert_vit_mbe(skeleton(model), self.Ts[0], self.bases, self.gelu_bases, exact=True,
                        table_dir=self.table_dir, **self.switches)

    def calibrate(self, model: nn.Module, batches: Iterable[Tensor], all_reduce: AllReduce) -> dict[str, Any]:
        self.ranges = calibrate_ranges(model, batches, all_reduce, self.range_percentile, self.Ts[0], self.bases,
                                       self.gelu_bases, self.table_dir, **self.switches)
        if self.global_range and self.ranges:
            widest = max(self.ranges.values())
            self.ranges = dict.fromkeys(self.ranges, widest)
        return {"identity_ranges": dict(self.ranges), "range_percentile": self.range_percentile,
                "global_range": self.global_range, "codes": self.codes, "fit_command": FIT_COMMAND}

    def convert(self, model: nn.Module) -> dict[str, SpikingModel]:
        if self.ranges is None:
            raise ValueError("MBEConverter.convert needs identity ranges: call calibrate(model, batches, all_reduce) "
                             "on training images first")
        out: dict[str, SpikingModel] = {}
        extra = [(f"_exact_{g}", {g}) for g in EXACT_GROUPS] if self.ablation else []
        for T in self.Ts:
            for suffix, groups in [("", set())] + extra:
                snn = convert_vit_mbe(model, T, self.bases, self.gelu_bases, self.ranges, fast=self.fast,
                                      table_dir=self.table_dir, exact_groups=self.exact | groups, codes=self.codes,
                                      **self.switches)
                out[f"T{T}{suffix}"] = MBESpikingModel(snn, T)
        return out
