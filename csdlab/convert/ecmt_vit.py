"""The ECMT network of a timm ``VisionTransformer`` (docs/methods.md §2.3): its blocks and its simulator.

The converter (:mod:`csdlab.convert.ecmt`) swaps timm's ``Attention``, ``Mlp`` and ``PatchEmbed``
for the blocks below, which reuse the same ``Linear`` layers; timm's own ``Block`` /
``forward_head`` code then runs the SNN:

* attention (:class:`ECMTAttention`): MT before ``qkv``; MT on q, k, v; matrix-product EC
  ``q k^T`` (scale folded); EC softmax; MT after softmax; matrix-product EC ``attn v``; MT
  before ``proj``;
* MLP (:class:`ECMTMlp`): MT before ``fc1``; EC activation; MT before ``fc2``;
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

import math
from typing import Any

import torch
from spikingjelly.activation_based import functional
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from torch import Tensor, nn

from csdlab.convert.vit import (analog_layers, check_images, merge_heads, refuse_mask, sites_of, split_heads,
                                uncounted_modules)
from csdlab.eval.api import SpikingModel
from csdlab.snn.ecmt import ECFunction, ECMatMul
from csdlab.snn.neurons import MTNeuron
from csdlab.snn.timeflat import TimeFlatModule, repeat_steps, unflatten_steps

__all__ = ["ECMTAttention", "ECMTMlp", "AnalogEmbed", "SpikingViT", "site_modules", "mt_sites", "ATTENTION_SITES",
           "MLP_SITES", "IMAGE_STEPS_PER_PASS"]

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
        attn: the timm module (not gated: :func:`~csdlab.convert.vit.check_vit`; ``qk_norm`` /
            ``scale_norm`` norms become ECs).
        levels: MT levels per sign n.
        spiking: MT neurons at the six sites (False: identity, for the EC-only check).
    """

    def __init__(self, attn: Attention, levels: int = 8, spiking: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.qkv, self.proj = attn.qkv, attn.proj
        self.q_norm, self.k_norm = _ec_or_identity(attn.q_norm), _ec_or_identity(attn.k_norm)
        self.norm = _ec_or_identity(attn.norm)
        self.mt_in, self.mt_q, self.mt_k, self.mt_v = (_neuron(levels, spiking) for _ in range(4))
        self.mt_attn, self.mt_proj = _neuron(levels, spiking, inplace=True), _neuron(levels, spiking, inplace=True)
        self.qk = ECMatMul(scale=attn.scale)
        self.softmax = ECFunction(nn.Softmax(dim=-1), inplace=True)  # its input: the q k^T product
        self.av = ECMatMul()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        refuse_mask("ECMT", attn_mask, is_causal)
        q, k, v = split_heads(self.qkv(self.mt_in(x)), self.num_heads, self.head_dim)  # B is T*B multi-step
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.softmax(self.qk(self.mt_q(q), self.mt_k(k).transpose(-2, -1)))  # [B, H, N, N]
        x = self.av(self.mt_attn(attn), self.mt_v(v))  # [B, H, N, d]
        return self.proj(self.mt_proj(self.norm(merge_heads(x))))


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
    return sites_of(snn, MTNeuron)


#: image-steps (images x T) simulated together by default: the layers' batches stay as large as a
#: few ANN batches (large GEMMs), memory stays within a few ANN forwards' (docs/methods.md §2.3)
IMAGE_STEPS_PER_PASS = 160


class SpikingViT(SpikingModel):
    """An ECMT-converted timm ViT, simulated for ``time_steps`` steps with a readout after each.

    Args:
        net: a converted network (:func:`csdlab.convert.ecmt.convert_vit`), thresholds set.
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
        super().__init__(time_steps)
        if images_per_pass is not None and images_per_pass < 1:
            raise ValueError(f"images_per_pass must be >= 1 or None (ceil(160 / T)), got {images_per_pass!r}")
        self.net = net
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
        return analog_layers(self.net, counted=(AnalogEmbed,))

    def uncounted_modules(self) -> dict[nn.Module, str]:
        # the EC functions F run LayerNorm's affine in floating point
        return uncounted_modules(self.net, element_wise=(nn.LayerNorm,))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Reset, simulate T steps on ``images [B, C, H, W]`` (fed at every step), return the
        readout ``[T, B, classes]``: row t-1 is the mean of the logits of steps ``1..t``.

        Raises:
            ValueError: not ``[B, C, H, W]``, or NaN / inf pixels (:func:`~csdlab.convert.vit.check_images`).
        """
        check_images(images)
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
        x = repeat_steps(x, steps)  # [T*B, N, D], step-major
        x = net.norm_pre(x)
        for block in net.blocks:
            x = block(x)
            functional.reset_net(block)  # all T steps done: its state is not needed any more
        logits = net.forward_head(net.norm(x))  # [T*B, classes]
        return unflatten_steps(logits, steps)

    def extra_repr(self) -> str:
        return f"time_steps={self.time_steps}, multi_step={self.multi_step}, images_per_pass={self.images_per_pass}"
