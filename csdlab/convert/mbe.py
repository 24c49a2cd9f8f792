"""MBE conversion of a timm ``VisionTransformer``, training-free (docs/methods.md §4).

:func:`convert_vit_mbe` deep-copies the model and swaps modules, reusing the ANN's own ``Linear``
layers and LayerNorm parameters (weights untouched):

* every ``LayerNorm`` (``norm1``, ``norm2``, the final ``norm``, ``qk``/``fc`` norms) ->
  :class:`~csdlab.snn.mbe_ops.MBELayerNorm` (switch ``layernorm``);
* ``Attention`` -> :class:`MBEAttention`: identity neuron before ``qkv`` and ``proj``
  (``linear_inputs``), ``q k^T`` and ``attn v`` as spiking products of identity-coded operands
  (``products``), :class:`~csdlab.snn.mbe_ops.MBESoftmax` (``softmax``);
* ``Mlp`` -> :class:`MBEMlp`: identity neuron before ``fc1`` (``linear_inputs``), the GELU neuron
  (``gelu``), whose spikes drive ``fc2``;
* patch embedding, class token, position embedding, residual adds and the head stay as in the ANN
  (the head reads the analog output of the final norm).

One presentation runs all ``T`` steps of every neuron (value presented once); the readout is the
logits after ``T`` (``readout_steps = [T]``). Identity neurons get the range of their site from
:func:`calibrate_ranges` (float model, training images). :class:`MBEConverter` is the method's
:class:`~csdlab.eval.api.Converter`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from spikingjelly.activation_based import functional
from timm.layers import DropPath, LayerScale, PatchEmbed
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from csdlab.convert.passes import describe_modules, swap_modules, unknown_modules
from csdlab.eval.api import AllReduce, Converter, SpikingModel
from csdlab.snn.counting import bincount_below
from csdlab.snn.mbe import FIT_COMMAND, MBECode, MBENeuron, load_codes
from csdlab.snn.mbe_ops import ANDProduct, MBELayerNorm, MBELinear, MBEProduct, MBESoftmax

__all__ = ["MBEAttention", "MBEMlp", "MBESpikingModel", "MBEConverter", "convert_vit_mbe", "mbe_sites",
           "identity_sites", "set_ranges", "calibrate_ranges", "GROUPS"]

log = logging.getLogger(__name__)

GROUPS = ("gelu", "softmax", "layernorm", "products", "linear_inputs")


class _Factory:
    """Builds the neurons of one network: one shared code per primitive (tables built once)."""

    def __init__(self, codes: dict[str, MBECode], gelu_code: MBECode, fast: bool, exact: bool) -> None:
        self.codes, self.gelu_code, self.fast, self.exact = codes, gelu_code, fast, exact

    def neuron(self, primitive: str) -> MBENeuron:
        code = self.gelu_code if primitive == "gelu" else self.codes[primitive]
        return MBENeuron(code, fast=self.fast, exact=self.exact)


class MBEAttention(nn.Module):
    """timm ``Attention`` with MBE neurons (docs/methods.md §4.3); reuses ``qkv`` / ``proj``.

    Args:
        attn: the timm module (no gate; its ``q_norm`` / ``k_norm`` / ``norm`` are kept, already
            converted when they are LayerNorms).
        make: neuron factory.
        softmax: spiking softmax (else torch's).
        products: spiking ``q k^T`` and ``attn v`` (else dense products of the exact values).
        linear_inputs: identity neurons before ``qkv`` and ``proj``.
    """

    def __init__(self, attn: Attention, make: _Factory, softmax: bool = True, products: bool = True,
                 linear_inputs: bool = True) -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated timm Attention (gate=True) is not supported by MBE conversion")
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.scale = float(attn.scale)
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.qkv = MBELinear(attn.qkv, make.neuron("identity")) if linear_inputs else attn.qkv
        self.proj = MBELinear(attn.proj, make.neuron("identity")) if linear_inputs else attn.proj
        self.qk = (MBEProduct(make.neuron("identity"), make.neuron("identity"), True, self.scale)
                   if products else None)
        self.av = MBEProduct(make.neuron("identity"), make.neuron("identity"), True) if products else None
        self.softmax = MBESoftmax(make.neuron("exp2"), make.neuron("recip")) if softmax else nn.Softmax(dim=-1)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("MBE attention does not support attention masks or causal attention")
        B, N, _ = x.shape
        # [B, N, 3 * H * d] -> [3, B, H, N, d]
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        kt = k.transpose(-2, -1)
        scores = self.qk(q, kt) if self.qk is not None else (q @ kt) * self.scale  # [B, H, N, N]
        attn = self.softmax(scores)
        out = self.av(attn, v) if self.av is not None else attn @ v  # [B, H, N, d]
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj(out)


class MBEMlp(nn.Module):
    """timm ``Mlp`` with MBE neurons; reuses ``fc1`` / ``fc2``.

    Args:
        mlp: the timm module (activation ``nn.GELU``).
        make: neuron factory.
        gelu: the GELU neuron (else the exact GELU).
        linear_inputs: identity neuron before ``fc1`` (and before ``fc2`` when its input is not the
            GELU neuron's spikes).
    """

    def __init__(self, mlp: Mlp, make: _Factory, gelu: bool = True, linear_inputs: bool = True) -> None:
        super().__init__()
        if not isinstance(mlp.act, nn.GELU) or getattr(mlp.act, "approximate", "none") != "none":
            raise ValueError(f"MBE converts Mlp blocks with nn.GELU(approximate='none'), got {mlp.act}")
        self.fc1 = MBELinear(mlp.fc1, make.neuron("identity")) if linear_inputs else mlp.fc1
        self.norm = mlp.norm
        direct = gelu and isinstance(mlp.norm, nn.Identity)  # the GELU spikes drive fc2 themselves
        self.act = nn.Identity() if direct else (make.neuron("gelu") if gelu else mlp.act)
        if direct:
            self.fc2 = MBELinear(mlp.fc2, make.neuron("gelu"))
        else:
            self.fc2 = MBELinear(mlp.fc2, make.neuron("identity")) if linear_inputs else mlp.fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


# modules allowed to remain after the swap: linear, constant over time, or converted
_KNOWN = (VisionTransformer, Block, nn.Sequential, PatchEmbed, nn.Linear, nn.Conv2d, nn.Identity, nn.Dropout,
          DropPath, LayerScale, MBEAttention, MBEMlp, MBELayerNorm, MBELinear, MBEProduct, MBESoftmax, ANDProduct,
          MBENeuron, nn.Softmax, nn.GELU)


def _check_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def convert_vit_mbe(model: nn.Module, T: int, N: int = 8, gelu_bases: int = 4,
                    ranges: dict[str, float] | None = None, gelu: bool = True, softmax: bool = True,
                    layernorm: bool = True, products: bool = True, linear_inputs: bool = True,
                    fast: bool = True, exact: bool = False, table_dir: str | Path | None = None) -> nn.Module:
    """MBE SNN of a timm ``VisionTransformer`` (a converted deep copy; ``model`` is untouched).

    Args:
        model: a ``VisionTransformer`` (ViT / DeiT, any size, class token or average pooling).
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

    Raises:
        ValueError: bad ``T`` / ``N``; no fitted table for ``(T, N)`` (names the command that fits
            it); a model that is not a ViT or holds modules MBE cannot convert (listed by name and type).
    """
    _check_int("T", T)
    _check_int("N (bases)", N)
    _check_int("gelu_bases", gelu_bases)
    codes = load_codes(T, N, table_dir)
    gelu_code = load_codes(T, gelu_bases, table_dir)["gelu"]
    if isinstance(model, VisionTransformer) and getattr(model, "attn_pool", None) is not None:
        raise ValueError("cannot MBE-convert a VisionTransformer with attention pooling (attn_pool)")
    make = _Factory(codes, gelu_code, fast, exact)
    snn = copy.deepcopy(model).eval()
    swapped: list[str] = []
    if layernorm:  # first, so the norms inside attention / MLP are converted too
        ln_types = {type(m) for m in snn.modules() if isinstance(m, nn.LayerNorm)}
        swapped += swap_modules(snn, {t: lambda m: MBELayerNorm(m, make.neuron("identity"), make.neuron("rsqrt"))
                                      for t in ln_types})
    swapped += swap_modules(snn, {
        Attention: lambda m: MBEAttention(m, make, softmax, products, linear_inputs),
        Mlp: lambda m: MBEMlp(m, make, gelu, linear_inputs),
    })
    known = _KNOWN if layernorm else _KNOWN + tuple({type(m) for m in snn.modules() if isinstance(m, nn.LayerNorm)})
    unknown = unknown_modules(snn, known)
    if unknown or not isinstance(model, VisionTransformer):
        raise ValueError(f"cannot MBE-convert {type(model).__name__}: MBE converts timm VisionTransformer models "
                         f"(Block, Attention, Mlp with GELU, LayerNorm); unknown modules: {describe_modules(unknown)}")
    if ranges is not None:
        set_ranges(snn, ranges)
    functional.invalidate_reset_cache(snn)  # SpikingJelly caches the resettable modules
    log.info("MBE: T=%d N=%d (GELU %d), swapped %d modules, %d neuron sites", T, N, gelu_bases, len(swapped),
             len(mbe_sites(snn)))
    return snn


def mbe_sites(snn: nn.Module) -> dict[str, MBENeuron]:
    """The MBE neurons of ``snn`` by qualified name (module order)."""
    return {name: m for name, m in snn.named_modules() if isinstance(m, MBENeuron)}


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

    def hook(i: int) -> Callable[..., None]:
        def fn(mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0].detach().abs()
            key = (str(x.device), x.dtype)
            if key not in device_edges:
                device_edges[key] = edges.to(device=x.device, dtype=x.dtype)
            idx = torch.bucketize(x.flatten(), device_edges[key])  # edges[i-1] < |x| <= edges[i]
            hist[i] += bincount_below(idx, len(edges) + 1).to(hist)

        return fn

    handles = [sites[n].register_forward_hook(hook(i)) for i, n in enumerate(names)]
    seen = images = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            x = x.to(next(snn.parameters()).device)
            functional.reset_net(snn)
            snn(x)
            seen += 1
            images += len(x)
    finally:
        for h in handles:
            h.remove()
    dev = next(model.parameters()).device
    # one all-reduce: the histograms and the number of images seen, summed over processes
    packed = torch.cat([hist.flatten(), torch.full((1,), float(images), dtype=torch.float64, device=hist.device)])
    packed = all_reduce(packed.to(dev)).cpu()
    hist = packed[:-1].view_as(hist)
    if float(packed[-1]) == 0:
        raise ValueError("MBE calibration saw no images (empty calibration loader on every process)")
    if not names:
        return {}
    cum = hist.cumsum(1)
    need = cum[:, -1:] * (percentile / 100.0)
    bin_idx = (cum < need * (1 - 1e-12)).sum(1).clamp(max=len(edges) - 1)  # first bin reaching the share
    ranges = {n: float(edges[int(b)]) for n, b in zip(names, bin_idx)}
    log.info("MBE calibration: %d batches on this process, %d identity sites, ranges %.3g .. %.3g", seen,
             len(ranges), min(ranges.values()), max(ranges.values()))
    return ranges


class MBESpikingModel(SpikingModel):
    """A converted ViT with readout after the ``T`` steps of its neurons (``readout_steps = [T]``).

    Args:
        snn: the network from :func:`convert_vit_mbe`.
        T: time steps per neuron.
    """

    def __init__(self, snn: nn.Module, T: int) -> None:
        super().__init__()
        self.snn = snn
        self.time_steps = T
        self.readout_steps = [T]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        functional.reset_net(self.snn)
        return self.snn(images).unsqueeze(0)  # [1, B, classes]

    def sites(self) -> dict[str, nn.Module]:
        return dict(mbe_sites(self.snn))

    def analog_layers(self) -> list[nn.Module]:
        """Patch-embedding conv and head (they see analog values: MACs)."""
        layers = [m for m in self.snn.patch_embed.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        return layers + [m for m in self.snn.head.modules() if isinstance(m, nn.Linear)]

    def uncounted_modules(self) -> dict[nn.Module, str]:
        return {self.snn: "class token and position embedding: additions (not counted on either side)"}

    def time_flattened(self) -> bool:
        # each layer runs once per image batch and that call covers all T steps of its neurons;
        # the counts of count_events / count_ops are totals over the T steps
        return False


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
    """

    name = "mbe"
    needs_calibration = True

    def __init__(self, Ts: list[int] = [8, 10, 12, 16], bases: int = 8, gelu_bases: int = 4,  # noqa: B006
                 gelu: bool = True, softmax: bool = True, layernorm: bool = True, products: bool = True,
                 linear_inputs: bool = True, range_percentile: float = 100.0, fast: bool = True,
                 table_dir: str | None = None) -> None:
        if not Ts:
            raise ValueError("Ts must list at least one T")
        self.Ts = [_check_int("T", T) for T in Ts]
        self.bases, self.gelu_bases = _check_int("bases", bases), _check_int("gelu_bases", gelu_bases)
        self.switches = dict(gelu=gelu, softmax=softmax, layernorm=layernorm, products=products,
                             linear_inputs=linear_inputs)
        if not 0 < range_percentile <= 100:
            raise ValueError(f"range_percentile must be in (0, 100], got {range_percentile}")
        self.range_percentile, self.fast, self.table_dir = range_percentile, fast, table_dir
        self.ranges: dict[str, float] | None = None
        for T in self.Ts:  # fail before any data is read
            load_codes(T, self.bases, table_dir)
            load_codes(T, self.gelu_bases, table_dir)

    def check(self, model: nn.Module) -> None:
        convert_vit_mbe(model, self.Ts[0], self.bases, self.gelu_bases, exact=True, table_dir=self.table_dir,
                        **self.switches)

    def calibrate(self, model: nn.Module, batches: Iterable[Tensor], all_reduce: AllReduce) -> dict[str, Any]:
        self.ranges = calibrate_ranges(model, batches, all_reduce, self.range_percentile, self.Ts[0], self.bases,
                                       self.gelu_bases, self.table_dir, **self.switches)
        return {"identity_ranges": dict(self.ranges), "range_percentile": self.range_percentile,
                "fit_command": FIT_COMMAND}

    def convert(self, model: nn.Module) -> dict[str, SpikingModel]:
        if self.ranges is None:
            raise ValueError("MBEConverter.convert needs identity ranges: call calibrate(model, batches, all_reduce) "
                             "on training images first")
        out: dict[str, SpikingModel] = {}
        for T in self.Ts:
            snn = convert_vit_mbe(model, T, self.bases, self.gelu_bases, self.ranges, fast=self.fast,
                                  table_dir=self.table_dir, **self.switches)
            out[f"T{T}"] = MBESpikingModel(snn, T)
        return out
