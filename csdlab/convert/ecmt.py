"""ECMT: training-free conversion of a timm ``VisionTransformer`` into an SNN (docs/methods.md §2).

:class:`ECMTConverter` is the method's :class:`~csdlab.eval.api.Converter`: it checks the model,
calibrates the MT thresholds on the float network and builds one :class:`SpikingViT`.

The timm model is not rewritten: :func:`convert_vit` deep-copies it and swaps its ``Attention``,
``Mlp`` and ``LayerNorm`` modules for converted ones that reuse the same ``Linear`` layers; timm's
own ``Block`` / ``forward_head`` code then runs the SNN:

* attention: MT before ``qkv``; MT on q, k, v; matrix-product EC ``q k^T`` (scale folded);
  EC softmax; MT after softmax; matrix-product EC ``attn v``; MT before ``proj``;
* MLP: MT before ``fc1``; EC GELU; MT before ``fc2``;
* every LayerNorm after the patch embedding (``norm1``, ``norm2``, final ``norm``, ``fc_norm``, ...)
  is an EC;
* the patch embedding sees the analog image at every step (:class:`AnalogEmbed`); class token
  and position embedding are added to it; residual adds stay plain; the head (both heads of a
  distilled DeiT, averaged as timm does in eval) gets the analog EC-norm output.

:class:`SpikingViT` simulates layer by layer (multi-step, the default): the image is embedded
once, each block runs all T steps on a ``[T*B, N, D]`` batch before the next block starts (every
Linear and matrix product is one large call; only the MT membranes loop over t) and the block's
state is dropped when it is done. The single-step path (one full forward per step, streaming)
gives the same logits. The readout after step t is the mean of the logits of steps ``1..t``.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from spikingjelly.activation_based import functional
from timm.layers import DropPath, LayerScale, PatchEmbed
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from csdlab.convert.passes import describe_modules, swap_modules, unknown_modules
from csdlab.eval.api import AllReduce, Converter, SpikingModel
from csdlab.snn.ecmt import ECFunction, ECMatMul, TimeFlatModule
from csdlab.snn.neurons import MTNeuron

__all__ = ["ECMTConverter", "SpikingViT", "ECMTAttention", "ECMTMlp", "AnalogEmbed", "convert_vit", "mt_sites",
           "site_modules", "percentile", "percentile_pair", "site_overrides", "thresholds_from_percentiles",
           "set_thresholds"]

log = logging.getLogger(__name__)

SOFTMAX_SITE = "mt_attn"  # the MT neuron after the softmax (docs/methods.md §2.2 override)
GELU_SITE = "mt_fc2"  # the MT neuron after the MLP activation (docs/methods.md §2.2 override)
ATTENTION_SITES = ("mt_in", "mt_q", "mt_k", "mt_v", "mt_attn", "mt_proj")
MLP_SITES = ("mt_fc1", "mt_fc2")


def _neuron(levels: int, spiking: bool, inplace: bool = False) -> nn.Module:
    # spiking=False keeps every site but passes values through: the "EC only" network;
    # inplace only where the input current is a fresh tensor of this module that nothing else reads
    return MTNeuron(levels=levels, inplace=inplace) if spiking else nn.Identity()


def _ec_or_identity(m: nn.Module) -> nn.Module:
    return m if isinstance(m, nn.Identity) else ECFunction(m)


class ECMTAttention(nn.Module):
    """timm ``Attention`` with MT neurons and EC modules (docs/methods.md §2.3); reuses ``qkv``/``proj``.

    Works unchanged in both step modes: single-step on ``[B, N, D]``, multi-step on the
    time-flattened ``[T*B, N, D]`` (its EC / MT modules know T).

    Args:
        attn: the timm module (no gate; ``qk_norm`` / ``scale_norm`` norms become ECs).
        levels: MT levels per sign n.
        spiking: MT neurons at the six sites (False: identity, for the EC-only check).
    """

    def __init__(self, attn: Attention, levels: int = 8, spiking: bool = True) -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated timm Attention (gate=True) is not supported by ECMT conversion")
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.qkv, self.proj = attn.qkv, attn.proj
        self.q_norm, self.k_norm = _ec_or_identity(attn.q_norm), _ec_or_identity(attn.k_norm)
        self.norm = _ec_or_identity(attn.norm)
        self.mt_in, self.mt_q, self.mt_k, self.mt_v = (_neuron(levels, spiking) for _ in range(4))
        self.mt_attn, self.mt_proj = _neuron(levels, spiking, inplace=True), _neuron(levels, spiking, inplace=True)
        self.qk = ECMatMul(scale=attn.scale)
        self.softmax = ECFunction(nn.Softmax(dim=-1), inplace=True)  # its input: the q k^T product
        self.av = ECMatMul()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("ECMT attention does not support attention masks or causal attention")
        B, N, _ = x.shape  # B is T*B in multi-step mode
        # [B, N, 3 * H * d] -> [3, B, H, N, d]
        qkv = self.qkv(self.mt_in(x)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.softmax(self.qk(self.mt_q(q), self.mt_k(k).transpose(-2, -1)))  # [B, H, N, N]
        x = self.av(self.mt_attn(attn), self.mt_v(v))  # [B, H, N, d]
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj(self.mt_proj(x))


class ECMTMlp(nn.Module):
    """timm ``Mlp`` with MT neurons before ``fc1`` and ``fc2`` and an EC activation.

    Args:
        mlp: the timm module (its activation, GELU or any other, becomes an EC).
        levels: MT levels per sign n.
        spiking: MT neurons at both sites (False: identity).
    """

    def __init__(self, mlp: Mlp, levels: int = 8, spiking: bool = True) -> None:
        super().__init__()
        self.fc1, self.fc2 = mlp.fc1, mlp.fc2
        self.act, self.norm = ECFunction(mlp.act, inplace=True), _ec_or_identity(mlp.norm)  # act: fc1's output
        self.mt_fc1, self.mt_fc2 = _neuron(levels, spiking), _neuron(levels, spiking, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.mt_fc2(self.norm(self.act(self.fc1(self.mt_fc1(x))))))


class AnalogEmbed(nn.Module):
    """The patch embedding, fed the same analog image at every step (docs/methods.md §2.3).

    Multi-step, :class:`SpikingViT` calls it once per image; :meth:`count_ops` still charges its
    dense MACs at every one of the T steps, as a chip re-reading the image would spend them.
    Attributes of the wrapped embedding (``img_size``, ``grid_size``, ...) read through.

    Args:
        embed: the timm ``PatchEmbed`` (a Conv2d ``proj``; its norm, if any, stays a plain
            function: its input is constant over time).
    """

    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed
        self.flat_steps: int | None = None  # T when called once for T steps (multi-step)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "embed":
                raise
            return getattr(self.embed, name)

    def count_ops(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[float | Tensor, float | Tensor]:
        """Dense MACs of the projection per step: floats (single-step) or ``[T]`` tensors."""
        proj = self.embed.proj
        kh, kw = proj.kernel_size
        macs = float(output.numel() * (proj.in_channels // proj.groups) * kh * kw)  # [B, N, D] = conv output
        if self.flat_steps is None:
            return macs, 0.0
        steps = self.flat_steps
        return (torch.full((steps,), macs, dtype=torch.float64, device=output.device),
                torch.zeros(steps, dtype=torch.float64, device=output.device))


# Modules allowed to remain after the swap: they are linear, constant over time, or converted.
_KNOWN = (VisionTransformer, VisionTransformerDistilled, Block, nn.Sequential, AnalogEmbed, nn.Linear, nn.Identity,
          nn.Dropout, DropPath, LayerScale, ECMTAttention, ECMTMlp, ECFunction, ECMatMul, MTNeuron)


def _unknown_modules(model: nn.Module) -> dict[str, str]:
    # an EC wraps any function F, evaluated as a whole; the patch embedding is analog and constant
    # over time (computed as in the ANN), but it must be timm's conv PatchEmbed
    unknown = unknown_modules(model, _KNOWN, opaque=(ECFunction, AnalogEmbed))
    for name, m in model.named_modules():
        if isinstance(m, AnalogEmbed) and (type(m.embed) is not PatchEmbed or not isinstance(m.embed.proj, nn.Conv2d)):
            unknown[f"{name}.embed"] = type(m.embed).__name__
    return unknown


def _skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parameter and buffer on the meta device (no data)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _convert_(net: nn.Module, levels: int, spiking: bool) -> list[str]:
    """Swap, in place, the modules of the (copied) ViT ``net``; returns the swapped names."""
    rules: dict[type, Callable[[nn.Module], nn.Module]] = {
        Attention: lambda m: ECMTAttention(m, levels, spiking),
        Mlp: lambda m: ECMTMlp(m, levels, spiking),
    }
    for m in net.modules():  # every LayerNorm class present (torch's, timm's, subclasses)
        if isinstance(m, nn.LayerNorm):
            rules.setdefault(type(m), ECFunction)
    swapped = []
    for name, child in list(net.named_children()):
        if name == "patch_embed":
            net.patch_embed = AnalogEmbed(child)  # not descended into: analog, no EC needed
            swapped.append(name)
        elif type(child) in rules:
            setattr(net, name, rules[type(child)](child))
            swapped.append(name)
        else:
            swapped += swap_modules(child, rules, f"{name}.")
    return swapped


def convert_vit(model: nn.Module, levels: int = 8, spiking: bool = True) -> nn.Module:
    """ECMT SNN of a timm ``VisionTransformer`` (a converted deep copy; ``model`` is untouched).

    Thresholds start at 1 (set them with :func:`set_thresholds`); the modules are in single-step
    mode until :class:`SpikingViT` sets the mode it simulates in.

    Args:
        model: a ``VisionTransformer`` from ``timm.create_model`` (ViT / DeiT, any size, class
            token or average pooling, ``fc_norm``, qkv with or without bias, distilled DeiT).
        levels: MT levels per sign n (docs/methods.md §2.1).
        spiking: False keeps identity at every MT site (EC only: exact at every t).

    Raises:
        ValueError: the model holds modules ECMT cannot convert (listed by name and type), e.g.
            a Swin or ConvNeXt model, attention pooling, or another block type.
    """
    if isinstance(model, VisionTransformer) and getattr(model, "attn_pool", None) is not None:
        raise ValueError("cannot convert a VisionTransformer with attention pooling (attn_pool); "
                         "use global_pool='token' or 'avg'")
    snn = copy.deepcopy(model).eval()
    swapped = _convert_(snn, levels, spiking)
    unknown = _unknown_modules(snn)
    if unknown or not isinstance(model, VisionTransformer):
        raise ValueError(f"cannot ECMT-convert {type(model).__name__}: ECMT converts timm VisionTransformer "
                         f"models (Block, Attention, Mlp, LayerNorm; distilled DeiT); unknown modules: "
                         f"{describe_modules(unknown)}")
    functional.invalidate_reset_cache(snn)  # SpikingJelly caches the resettable modules
    log.debug("ECMT: swapped %d modules (attention, MLP, norms, patch embedding), %d MT sites, levels=%d",
              len(swapped), len(mt_sites(snn)), levels)
    return snn


def site_modules(snn: nn.Module) -> dict[str, nn.Module]:
    """Every MT site of a converted network by qualified name (``MTNeuron``, or ``nn.Identity``
    in an EC-only network), block by block in module order."""
    sites = {}
    for name, m in snn.named_modules():
        leaves = ATTENTION_SITES if isinstance(m, ECMTAttention) else MLP_SITES if isinstance(m, ECMTMlp) else ()
        for leaf in leaves:
            sites[f"{name}.{leaf}"] = getattr(m, leaf)
    return sites


def mt_sites(snn: nn.Module) -> dict[str, MTNeuron]:
    """The MT neurons of ``snn`` by qualified name (block by block, in module order)."""
    return {name: m for name, m in snn.named_modules() if isinstance(m, MTNeuron)}


#: image-steps (images x T) simulated together by default: the layers' batches stay as large as a
#: few ANN batches (large GEMMs), memory stays within a few ANN forwards' (docs/methods.md §2.3)
IMAGE_STEPS_PER_PASS = 160


class SpikingViT(SpikingModel):
    """An ECMT-converted timm ViT, simulated for ``time_steps`` steps with a readout after each.

    Args:
        net: a converted network (:func:`convert_vit`), thresholds set.
        time_steps: T (>= 1), the number of steps simulated.
        multi_step: simulate layer by layer (each block runs all T steps on ``[T*B, ...]``, then
            its state is dropped); False: one full forward per step on ``[B, ...]`` (streaming).
            Both give the same logits.
        images_per_pass: multi-step only: simulate at most this many images at once (memory is
            about proportional to ``images_per_pass x T``); None: ``ceil(IMAGE_STEPS_PER_PASS / T)``
            (16 at T = 10), so one pass holds about as many image-steps as a few ANN batches.
    """

    def __init__(self, net: nn.Module, time_steps: int, multi_step: bool = True,
                 images_per_pass: int | None = None) -> None:
        super().__init__()
        if not isinstance(time_steps, int) or time_steps < 1:
            raise ValueError(f"time_steps must be an integer >= 1, got {time_steps!r}")
        if images_per_pass is not None and images_per_pass < 1:
            raise ValueError(f"images_per_pass must be >= 1 or None (ceil(160 / T)), got {images_per_pass!r}")
        self.net = net
        self.time_steps = time_steps
        self.readout_steps = list(range(1, time_steps + 1))
        self.multi_step = multi_step
        self.images_per_pass = images_per_pass or math.ceil(IMAGE_STEPS_PER_PASS / time_steps)
        for m in net.modules():
            if isinstance(m, TimeFlatModule):
                m.step_mode = "m" if multi_step else "s"
                m.keep_state = not multi_step  # all T steps in one call, reset after: no state to keep
            if isinstance(m, (TimeFlatModule, AnalogEmbed)):
                m.flat_steps = time_steps if multi_step else None
        functional.invalidate_reset_cache(net)

    def time_flattened(self) -> bool:
        return self.multi_step

    def sites(self) -> dict[str, nn.Module]:
        return dict(mt_sites(self.net))

    def analog_layers(self) -> list[nn.Module]:
        """Conv/Linear layers fed analog values (docs/methods.md §2.3): patch embedding (with its
        wrapper, which counts its own MACs) and head(s)."""
        layers = [m for m in self.net.patch_embed.modules() if isinstance(m, (nn.Conv2d, nn.Linear, AnalogEmbed))]
        heads = [self.net.head] + ([self.net.head_dist] if hasattr(self.net, "head_dist") else [])
        return layers + [m for h in heads for m in h.modules() if isinstance(m, nn.Linear)]

    def uncounted_modules(self) -> dict[nn.Module, str]:
        out = {self.net: "class token and position embedding: additions (not counted on either side)"}
        for ec in self.net.modules():
            if isinstance(ec, ECFunction):
                out.update({m: "EC function F (a norm's affine): element-wise, not counted on either side"
                            for m in ec.fn.modules() if any(True for _ in m.parameters(recurse=False))})
        return out

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Reset, simulate T steps on ``images [B, C, H, W]`` (fed at every step), return the
        readout ``[T, B, classes]``: row t-1 is the mean of the logits of steps ``1..t``."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        functional.reset_net(self.net)
        if not self.multi_step:
            logits = torch.stack([self.net(images) for _ in range(self.time_steps)])
        else:
            logits = torch.cat([self._layer_by_layer(x) for x in images.split(self.images_per_pass)], dim=1)
        functional.reset_net(self.net)
        # running mean with the single-step path's operations: total += logits(t); total / t
        readout = torch.empty_like(logits)
        total = logits[0]
        for t in range(self.time_steps):
            if t:
                total = total + logits[t]
            torch.div(total, t + 1, out=readout[t])
        return readout

    def _layer_by_layer(self, images: Tensor) -> Tensor:
        """Logits of every step ``[T, B, classes]``, one block at a time (timm's forward_features
        and forward_head, with the constant embedding computed once)."""
        net, steps = self.net, self.time_steps
        functional.reset_net(net)  # each pass of images starts at t = 1
        x = net.patch_drop(net._pos_embed(net.patch_embed(images)))  # analog: the same at every step
        x = x.repeat(steps, *[1] * (x.dim() - 1))  # [T*B, N, D], step-major
        x = net.norm_pre(x)
        for block in net.blocks:
            x = block(x)
            functional.reset_net(block)  # all T steps done: its state is not needed any more
        logits = net.forward_head(net.norm(x))  # [T*B, classes]
        return logits.unflatten(0, (steps, -1))

    def extra_repr(self) -> str:
        return f"time_steps={self.time_steps}, multi_step={self.multi_step}, images_per_pass={self.images_per_pass}"


# -- calibration (docs/methods.md §2.2) -----------------------------------------------------------

_EXACT_BELOW = 1 << 16  # kthvalue directly on tensors this small


def _kth_smallest(flat: Tensor, k: int) -> Tensor:
    """Exactly ``flat.kthvalue(k)`` (1-based), in about three cheap passes on a large tensor: a
    bound from a small random sample keeps only the tail holding the answer (a bit more than the
    rank from the nearer end), and ``kthvalue`` runs on that tail; the full ``kthvalue`` (a copy
    and an int64 index of the whole tensor) is the fallback when the bound was too tight."""
    n = flat.numel()
    if n <= _EXACT_BELOW:
        return flat.kthvalue(k).values
    from_top = k > n // 2
    r = n - k + 1 if from_top else k  # rank counted from the nearer end
    bound = _tail_bound(flat, _sample(flat), r, from_top)
    tail = flat[flat >= bound] if from_top else flat[flat <= bound]
    c = tail.numel()
    if c < r:
        return flat.kthvalue(k).values
    return tail.kthvalue(c - r + 1 if from_top else r).values


def _tail_bound(flat: Tensor, sample: Tensor, rank: int, from_top: bool) -> Tensor:
    """A bound with (almost always) at least ``rank`` elements of ``flat`` beyond it, from ``sample``."""
    m, n = sample.numel(), flat.numel()
    expected = rank / n * m  # sample elements expected beyond the answer; pass 1.5x that + 4 sigma
    j = min(m, int(1.5 * expected + 4 * math.sqrt(expected) + 16))
    return sample.kthvalue(m - j + 1 if from_top else j).values


def _sample(flat: Tensor) -> Tensor:
    g = torch.Generator(device=flat.device).manual_seed(0)
    return flat[torch.randint(flat.numel(), (4096,), generator=g, device=flat.device)]


def _rank(q: float, n: int) -> int:
    # nearest rank, computed in float32 as this code always has (thresholds stay bit-identical)
    return min(max(int(torch.tensor(q / 100 * n).ceil()), 1), n)


_SLABS = 8  # the prefilter of _beyond views a tensor as [8, n / 8]


def _beyond(flat: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """Every element of ``flat`` that is ``>= hi`` or ``<= lo`` (in some order; selection does not
    care). Boolean selection on a CPU costs several times a reduction, so it runs on a fraction:
    ``flat`` viewed as ``[8, n/8]``, a column is kept when its max or min reaches a bound (two
    vectorised reductions; ~20 % of the columns at the 1.5 % tails of calibration) and only the
    kept columns are filtered element by element."""
    if flat.numel() % _SLABS == 0:
        view = flat.view(_SLABS, -1)
        keep = torch.ge(view.amax(0), hi).logical_or_(torch.le(view.amin(0), lo))
        flat = view.index_select(1, keep.nonzero().squeeze(1)).flatten()
    return flat[torch.ge(flat, hi).logical_or_(torch.le(flat, lo))]


def percentile_pair(x: Tensor, p: float) -> Tensor:
    """``[p-th, (100-p)-th]`` nearest-rank percentiles of all of ``x`` (float32, exact), p > 50:
    bounds from a small sample, both tails cut out together (:func:`_beyond`), then ``kthvalue``
    ranks each answer within them."""
    flat = x.detach().flatten().float()
    n = flat.numel()
    k_hi, k_lo = _rank(p, n), _rank(100 - p, n)
    if n <= _EXACT_BELOW:
        return torch.stack([flat.kthvalue(k_hi).values, flat.kthvalue(k_lo).values])
    if flat.device.type != "cpu":
        return _topk_pair(flat, n - k_hi + 1, k_lo)
    sample = _sample(flat)
    r_hi, r_lo = n - k_hi + 1, k_lo  # ranks from the top / from the bottom
    hi_bound, lo_bound = _tail_bound(flat, sample, r_hi, True), _tail_bound(flat, sample, r_lo, False)
    if bool(lo_bound < hi_bound):
        tails = _beyond(flat, hi_bound, lo_bound)  # ~1.5x both tails: all that can hold the two answers
        # each answer is ranked within the tails (both sides: counting beats another selection)
        # once its side holds enough elements, i.e. the answer lies beyond its bound
        c = tails.numel()
        if int(torch.ge(tails, hi_bound).sum()) >= r_hi and int(torch.le(tails, lo_bound).sum()) >= r_lo:
            return torch.stack([tails.kthvalue(c - r_hi + 1).values, tails.kthvalue(r_lo).values])
    return torch.stack([_kth_smallest(flat, k_hi), _kth_smallest(flat, k_lo)])  # the bounds missed (rare)


def _topk_pair(flat: Tensor, r_hi: int, r_lo: int) -> Tensor:
    """``[r_hi-th largest, r_lo-th smallest]`` of ``flat`` by ``topk`` of each tail: the path off
    the CPU, where boolean selection reads its size on the host (a synchronisation per site) and
    ``kthvalue`` runs one thread block per slice. The same values as :func:`percentile_pair`'s."""
    hi = flat.topk(r_hi, largest=True, sorted=False).values.amin()
    lo = flat.topk(r_lo, largest=False, sorted=False).values.amax()
    return torch.stack([hi, lo])


def percentile(x: Tensor, q: float) -> Tensor:
    """Nearest-rank ``q``-th percentile of all of ``x`` in float32 (exact; no 16M-element limit)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    flat = x.detach().flatten().float()
    return _kth_smallest(flat, _rank(q, flat.numel()))


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
            ``ceil(160 / T)``, see :class:`SpikingViT`).
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

    def check(self, model: nn.Module) -> None:
        convert_vit(_skeleton(model), self.levels)  # the conversion itself, on a copy without data

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

        def hook(i: int) -> Callable[..., None]:
            def fn(mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                sums[i] += percentile_pair(inputs[0], p)

            return fn

        handles = [sites[name].register_forward_hook(hook(i)) for i, name in enumerate(observed)]
        count = 0
        try:
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                # one pass over the whole batch: the percentiles are those of the batch (passes of
                # fewer images would each add their own percentiles to the sums)
                float_net.images_per_pass = max(len(x), 1)
                float_net(x.to(device))
                count += 1
        finally:
            for h in handles:
                h.remove()
        total = all_reduce(torch.cat([sums.flatten(), torch.tensor([float(count)], dtype=torch.float64,
                                                                    device=device)]))
        n_batches = float(total[-1])
        if n_batches == 0:
            raise ValueError("calibration saw no batches: pass at least one batch of training images")
        means = (total[:-1].view(-1, 2) / n_batches).tolist()
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
