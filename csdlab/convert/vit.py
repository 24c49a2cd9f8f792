"""What every converter of a timm ``VisionTransformer`` shares (ECMT, MBE; docs/methods.md §2, §4).

A ViT converter deep-copies the model, swaps its ``Attention`` / ``Mlp`` / ``LayerNorm`` modules
for spiking ones that reuse the ANN's layers, and lets timm's own code run the rest. The parts
that do not depend on the method live here, so that the converters agree on what they accept:

* :func:`check_vit`: the architecture, before anything is copied: a timm ``VisionTransformer``
  (ViT, DeiT, distilled DeiT) with timm's conv patch embedding and without attention pooling or
  gated attention; any other model is named with the modules a ViT converter cannot convert;
* :func:`rewrite_vit`: the copy, the method's swap, and the unknown-module error after it (only
  :data:`VIT_MODULES` and the method's own modules may remain);
* :func:`skeleton`: a copy without data, so a converter's ``check`` can run the real conversion;
* :func:`sites_of`, :func:`analog_layers`: the neuron sites of a converted network by qualified
  name, and its layers fed analog values;
* :func:`observe_sites` and :func:`all_reduce_with_count`: the calibration loop (a forward hook
  per site accumulating a statistic of its input over the batches) and its sum over processes;
* :func:`split_heads`, :func:`merge_heads`, :func:`refuse_mask`: the attention forward's reshapes;
* :func:`check_images`: a spiking ViT refuses an image batch it would read wrongly.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from spikingjelly.activation_based import functional
from timm.layers import DropPath, LayerNorm, LayerScale, PatchEmbed
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from csdlab.convert.passes import describe_modules, unknown_modules
from csdlab.eval.api import AllReduce
from csdlab.eval.metrics import check_finite

__all__ = ["VIT_MODULES", "check_vit", "rewrite_vit", "skeleton", "sites_of", "analog_layers", "observe_sites",
           "all_reduce_with_count", "split_heads", "merge_heads", "refuse_mask", "check_images"]

#: modules a ViT converter leaves as they are: containers, linear layers (their inputs are
#: spikes after conversion, or the analog head input), and what is the identity at inference
VIT_MODULES: tuple[type, ...] = (VisionTransformer, VisionTransformerDistilled, Block, nn.Sequential, nn.Linear,
                                 nn.Identity, nn.Dropout, DropPath, LayerScale)

_SUPPORTED = "timm VisionTransformer models (ViT, DeiT, distilled DeiT: Block, Attention, Mlp, LayerNorm)"

# the modules of a timm ViT before conversion (the blocks are judged as a whole by the converter)
_ANN_BLOCKS = (PatchEmbed, Attention, Mlp)
_ANN_MODULES = VIT_MODULES + _ANN_BLOCKS + (nn.LayerNorm, LayerNorm)

_M = TypeVar("_M", bound=nn.Module)


def check_vit(model: nn.Module, method: str) -> None:
    """Raise ``ValueError`` unless ``model`` is a timm ViT a ViT converter can take.

    Another architecture (Swin, ConvNeXt, a CNN) is named, with the modules of it that are no part
    of a ViT, before any method-specific module (an activation, a norm) is looked at.
    """
    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        unknown = unknown_modules(model, _ANN_MODULES, opaque=_ANN_BLOCKS)
        raise ValueError(f"cannot {method}-convert {name}: {method} converts {_SUPPORTED}, and {name} is another "
                         f"architecture; modules it cannot convert: {describe_modules(unknown)}")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"cannot {method}-convert a {name} with attention pooling (attn_pool); "
                         "use global_pool='token' or 'avg'")
    embed = model.patch_embed  # analog and computed as in the ANN: only timm's conv one is counted
    if type(embed) is not PatchEmbed or not isinstance(embed.proj, nn.Conv2d):
        bad = {"patch_embed": type(embed).__name__} if type(embed) is not PatchEmbed else \
            {"patch_embed.proj": type(embed.proj).__name__}
        raise ValueError(f"cannot {method}-convert {name}: the patch embedding must be timm's PatchEmbed with a "
                         f"Conv2d projection; unknown modules: {describe_modules(bad)}")
    gated = [n for n, m in model.named_modules() if isinstance(m, Attention) and getattr(m, "gate", None) is not None]
    if gated:
        raise ValueError(f"cannot {method}-convert gated timm Attention (gated=True): "
                         f"{describe_modules(dict.fromkeys(gated, 'Attention'))}")


def rewrite_vit(model: nn.Module, method: str, swap: Callable[[nn.Module], list[str]], known: tuple[type, ...],
                opaque: tuple[type, ...] = ()) -> tuple[nn.Module, list[str]]:
    """A converted deep copy of ``model`` (in eval mode; ``model`` is untouched).

    Args:
        model: the timm ViT (checked by :func:`check_vit` first).
        method: the method's name, for the errors (``ECMT``, ``MBE``).
        swap: swaps modules of the copy in place; returns the swapped names.
        known: the method's module types allowed to remain, besides :data:`VIT_MODULES`.
        opaque: converted module types evaluated as a whole (their children are not inspected).

    Returns:
        The copy and the names :func:`swap` reported.

    Raises:
        ValueError: ``model`` is not a supported ViT, or modules remain that the method cannot
            convert (listed by type and name).
    """
    check_vit(model, method)
    snn = copy.deepcopy(model).eval()
    swapped = swap(snn)
    unknown = unknown_modules(snn, VIT_MODULES + known, opaque)
    if unknown:
        raise ValueError(f"cannot {method}-convert {type(model).__name__}: {method} converts {_SUPPORTED}; "
                         f"unknown modules: {describe_modules(unknown)}")
    functional.invalidate_reset_cache(snn)  # SpikingJelly caches the resettable modules
    return snn, swapped


def skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parameter and buffer on the meta device (no data): a
    converter's ``check`` converts it to find every problem without copying the weights."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def sites_of(net: nn.Module, kind: type[_M]) -> dict[str, _M]:
    """Every module of type ``kind`` (a method's neuron) in ``net`` by qualified name, module order."""
    return {name: m for name, m in net.named_modules() if isinstance(m, kind)}


def uncounted_modules(net: nn.Module, element_wise: tuple[type, ...] = ()) -> dict[nn.Module, str]:
    """Parameterised modules of a converted ViT that do no counted work: the network itself (class
    token and position embedding: additions) and the modules of the ``element_wise`` types
    (floating-point norms with an affine), which neither side of the energy ratio counts."""
    out = {net: "class token and position embedding: additions (not counted on either side)"}
    for m in net.modules():
        if isinstance(m, element_wise) and any(True for _ in m.parameters(recurse=False)):
            out[m] = f"{type(m).__name__}: element-wise floating point (not counted on either side)"
    return out


def analog_layers(net: nn.Module, counted: tuple[type, ...] = ()) -> list[nn.Module]:
    """The layers of a converted ViT fed analog values (they cost MACs): the patch embedding's conv
    (and ``counted`` wrappers of it that count their own operations) and the head(s) (both heads of
    a distilled DeiT)."""
    layers = [m for m in net.patch_embed.modules() if isinstance(m, (nn.Conv2d, nn.Linear, *counted))]
    heads = [net.head] + ([net.head_dist] if hasattr(net, "head_dist") else [])
    return layers + [m for h in heads for m in h.modules() if isinstance(m, nn.Linear)]


def _images_of(batch: Tensor | Sequence[Tensor]) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def observe_sites(run: Callable[[Tensor], Any], sites: Sequence[nn.Module], stat: Callable[[Tensor], Tensor],
                  out: Tensor, batches: Iterable[Tensor | Sequence[Tensor]],
                  device: torch.device) -> tuple[int, int]:
    """Run ``run(images)`` on every batch with a forward hook on each site: ``out[i] += stat(x)``
    for the input ``x`` of ``sites[i]`` (hooks removed afterwards, also on an error).

    Args:
        run: one pass of the (float) network the sites belong to.
        sites: the observed modules.
        stat: a statistic of one site input, shaped like ``out[i]``.
        out: the per-site accumulator (``[len(sites), ...]``).
        batches: images, or ``(images, labels, ...)`` tuples.
        device: where the images go.

    Returns:
        ``(batches, images)`` seen by this process.
    """

    def hook(i: int) -> Callable[..., None]:
        def fn(mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            out[i] += stat(inputs[0]).to(out)

        return fn

    handles = [site.register_forward_hook(hook(i)) for i, site in enumerate(sites)]
    seen = images = 0
    try:
        for batch in batches:
            x = _images_of(batch).to(device)
            run(x)
            seen += 1
            images += len(x)
    finally:
        for h in handles:
            h.remove()
    return seen, images


def all_reduce_with_count(stats: Tensor, count: float, all_reduce: AllReduce, device: torch.device,
                          method: str) -> tuple[Tensor, float]:
    """``stats`` and ``count`` summed over processes in one ``all_reduce`` (float64, on ``device``).

    Returns:
        The summed statistics (on ``stats``' device, its shape) and the summed count.

    Raises:
        ValueError: the count is 0 on every process (no calibration batch anywhere).
    """
    packed = torch.cat([stats.flatten().double().to(device), torch.tensor([float(count)], dtype=torch.float64,
                                                                           device=device)])
    total = all_reduce(packed).to(stats.device)
    if float(total[-1]) == 0:
        raise ValueError(f"{method} calibration saw no batches (no images on any process): pass at least one "
                         "batch of training images")
    return total[:-1].view(stats.shape), float(total[-1])


def split_heads(qkv: Tensor, num_heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv`` ``[B, N, 3 H d]`` -> ``q, k, v``, each ``[B, H, N, d]`` (as timm's ``Attention``)."""
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: Tensor) -> Tensor:
    """``[B, H, N, d]`` -> ``[B, N, H d]``."""
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)


def refuse_mask(method: str, attn_mask: Tensor | None, is_causal: bool) -> None:
    """A converted attention has no masked form: refuse a mask instead of ignoring it."""
    if attn_mask is not None or is_causal:
        raise ValueError(f"{method} attention does not support attention masks or causal attention")


def check_images(images: Tensor) -> None:
    """Refuse a batch a spiking ViT would read wrongly: not ``[B, C, H, W]``, or holding NaN / inf
    (a neuron reads NaN as silence, an MBE table cannot index it; the ANN gives NaN)."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    check_finite(images, "image batch")
