"""SpikingJelly's STA transformer recipe as a csdlab :class:`~csdlab.eval.api.Converter` (docs/peers.md).

STA (Spatio-Temporal Approximation, Jiang et al., ICLR 2024) as SpikingJelly 2.0 ships it
(``ann2snn.STATransformerRecipe``, ``mode="spiking_encoder"``) converts a *torchvision*
``VisionTransformer``: every Linear / Conv2d, LayerNorm, GELU and ``nn.MultiheadAttention`` becomes a
temporal-difference (TD) module (its output at step t is ``f(sum of inputs up to t) - f(sum up to
t-1)``, in floating point), and a calibrated *spike encoder* follows every LayerNorm, GELU and
attention block. An encoder integrates its input and sends ``trunc(v / theta)`` spikes at once (a
burst: a signed integer count per neuron and step, per-channel ``theta``), keeping the remainder.

This module:

* ports a timm ``VisionTransformer`` to torchvision's (:func:`to_torchvision`), checks the two give
  the same logits to 1e-5 (in float64) and refuses anything else with a ``ValueError`` naming the
  modules it cannot map;
* calibrates the encoders' thresholds with the recipe's own observers on csdlab's calibration
  batches (:meth:`STAConverter.calibrate`);
* wraps the recipe's graph so that csdlab's firing counter and op counter can count it
  (:class:`EncoderSite`, :class:`CountedAffine`, :class:`CountedAttention`), and keeps, per encoder,
  the largest burst it sent in one step (the payload, :meth:`STASpikingModel.payload`).

The image is fed at step 1 and zeros after ("first real then zero", as SpikingJelly's example
does); the readout after step t is the sum of the network's outputs over steps ``1..t``.

Counting (csdlab's rules, docs/methods.md §3). With ``count="event"`` (default) a burst of any size
is one event (a graded spike, like ECMT's multi-level spikes); with ``count="spike"`` a burst of k
spikes is k events. Firing rates and the synaptic ACs of the Linear layers fed by an encoder
(``qkv``, ``fc1``, ``fc2``, head) follow the chosen rule (the per-channel threshold folds into the
weights, so each spike or event is an addition per target). Layers fed by floating-point values
(the patch embedding on the image, the attention products on the accumulated q, k, v, the output
projection of attention) cost MACs; a TD layer whose input did not change at a step costs nothing
at that step. LayerNorm, GELU, softmax and residual additions cost nothing, as for every csdlab
converter (the ANN's count has only its convolutions, linear layers and matrix products).
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, fx, nn

from csdlab.eval.api import AllReduce, Converter, Payload, SpikingModel
from csdlab.snn.counting import synaptic_events

__all__ = ["STAConverter", "STASpikingModel", "EncoderSite", "CountedAffine", "CountedAttention", "to_torchvision",
           "check_port", "unsupported_modules", "PORT_TOLERANCE"]

log = logging.getLogger(__name__)

#: largest |timm logit - torchvision logit| the port may show (float64, random images)
PORT_TOLERANCE = 1e-5
COUNT_RULES = ("event", "spike")


# --------------------------------------------------------------------------------------------------
# timm ViT -> torchvision ViT (what the recipe traces: it knows nn.MultiheadAttention, not timm's
# Attention, whose fused scaled_dot_product_attention call it does not convert)
# --------------------------------------------------------------------------------------------------

def _affine_layernorm(m: nn.Module) -> bool:
    # torch's or timm's LayerNorm (a subclass with the same function), with weight and bias
    return isinstance(m, nn.LayerNorm) and m.weight is not None and m.bias is not None


def unsupported_modules(model: nn.Module) -> dict[str, str]:
    """Modules of ``model`` that :func:`to_torchvision` cannot map, by name -> why (empty: portable).

    Portable: a timm ``VisionTransformer`` with a class token and no other prefix tokens, a learned
    position embedding added to every token, a square non-overlapping Conv2d patch embedding,
    ``Block``s of fused-qkv ``Attention`` and ``Mlp`` with exact GELU, LayerNorms with one eps,
    class-token pooling, no LayerScale / qk-norm / fc_norm / attention pooling, a Linear head.
    """
    from timm.layers import PatchEmbed
    from timm.layers.attention import Attention
    from timm.layers.mlp import Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    if type(model) is not VisionTransformer:
        return {"": f"{type(model).__name__} (only timm VisionTransformer is supported)"}
    bad: dict[str, str] = {}
    ident = (nn.Identity, nn.Dropout)

    def need(name: str, ok: bool, why: str) -> None:
        if not ok:
            bad[name] = why

    need("global_pool", model.global_pool == "token", f"global_pool={model.global_pool!r} (needs 'token')")
    need("cls_token", model.cls_token is not None and model.num_prefix_tokens == 1,
         f"{model.num_prefix_tokens} prefix tokens (needs the class token only, no register tokens)")
    need("pos_embed", model.pos_embed is not None and not model.no_embed_class,
         "no position embedding, or not added to the class token (no_embed_class)")
    need("dynamic_img_size", not getattr(model, "dynamic_img_size", False), "dynamic image size")
    need("attn_pool", getattr(model, "attn_pool", None) is None, "attention pooling")
    for name in ("fc_norm", "norm_pre", "patch_drop", "head_drop", "pos_drop"):
        m = getattr(model, name, None)
        need(name, m is None or isinstance(m, ident), f"{type(m).__name__} (needs Identity)")
    need("head", isinstance(model.head, nn.Linear), f"{type(model.head).__name__} (needs a Linear head)")
    need("norm", _affine_layernorm(model.norm), f"{type(model.norm).__name__} (needs an affine LayerNorm)")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        bad["patch_embed"] = f"{type(pe).__name__} (needs timm PatchEmbed with a Conv2d)"
    else:
        k, s = tuple(pe.proj.kernel_size), tuple(pe.proj.stride)
        need("patch_embed", k == s and k[0] == k[1] and pe.proj.padding in ((0, 0), 0, "valid")
             and pe.proj.groups == 1 and pe.img_size is not None and pe.img_size[0] == pe.img_size[1]
             and isinstance(pe.norm, nn.Identity) and pe.flatten,
             "needs square non-overlapping patches of a square image, no patch norm")
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    need("norm.eps", len(eps) <= 1, f"LayerNorms with different eps {sorted(eps)}")
    if not all(type(b) is Block for b in model.blocks):
        bad["blocks"] = "blocks other than timm Block"
        return bad
    heads, hidden = set(), set()  # torchvision's ViT has one of each for all blocks
    for i, b in enumerate(model.blocks):
        p = f"blocks.{i}."
        for name in ("ls1", "ls2"):
            need(p + name, isinstance(getattr(b, name), nn.Identity), "LayerScale (not mapped)")
        for name in ("norm1", "norm2"):
            need(p + name, _affine_layernorm(getattr(b, name)),
                 f"{type(getattr(b, name)).__name__} (needs an affine LayerNorm)")
        a, m = b.attn, b.mlp
        if type(a) is not Attention:
            bad[p + "attn"] = f"{type(a).__name__} (needs timm Attention)"
        else:
            need(p + "attn", all(isinstance(getattr(a, n, nn.Identity()), nn.Identity)
                                 for n in ("q_norm", "k_norm", "norm")) and getattr(a, "gate", None) is None,
                 "qk-norm, attention norm or gate (not mapped)")
            heads.add(a.num_heads)
        if type(m) is not Mlp or type(m.act) is not nn.GELU or m.act.approximate != "none" \
                or not isinstance(m.norm, nn.Identity) or not isinstance(m.fc1, nn.Linear):
            bad[p + "mlp"] = f"{type(m).__name__} with {type(getattr(m, 'act', None)).__name__} " \
                             "(needs Mlp with exact GELU, no norm)"
        else:
            hidden.add(m.fc1.out_features)
    need("blocks", len(heads) <= 1 and len(hidden) <= 1, "blocks differ in heads or MLP width")
    return bad


def to_torchvision(model: nn.Module) -> nn.Module:
    """The torchvision ``VisionTransformer`` computing what the timm ``model`` computes (a copy).

    Raises:
        ValueError: ``model`` is not a portable timm ViT (:func:`unsupported_modules`, listed).
    """
    from torchvision.models.vision_transformer import VisionTransformer as TVViT

    bad = unsupported_modules(model)
    if bad:
        listing = "; ".join(f"{k or type(model).__name__}: {v}" for k, v in bad.items())
        raise ValueError(f"cannot map {type(model).__name__} to the torchvision ViT the STA recipe takes: {listing}")
    pe, blocks = model.patch_embed, list(model.blocks)
    width, patch = model.embed_dim, pe.proj.kernel_size[0]
    ref = next(model.parameters())
    tv = TVViT(image_size=pe.img_size[0], patch_size=patch, num_layers=len(blocks),
               num_heads=blocks[0].attn.num_heads, hidden_dim=width, mlp_dim=blocks[0].mlp.fc1.out_features,
               num_classes=model.head.out_features, norm_layer=partial(nn.LayerNorm, eps=model.norm.eps))
    tv.conv_proj = nn.Conv2d(pe.proj.in_channels, width, patch, patch, bias=True)  # torchvision assumes RGB

    def bias(b: Tensor | None, n: int) -> Tensor:
        return b if b is not None else torch.zeros(n, dtype=ref.dtype, device=ref.device)

    sd = {"conv_proj.weight": pe.proj.weight, "conv_proj.bias": bias(pe.proj.bias, width),
          "class_token": model.cls_token, "encoder.pos_embedding": model.pos_embed,
          "encoder.ln.weight": model.norm.weight, "encoder.ln.bias": model.norm.bias,
          "heads.head.weight": model.head.weight, "heads.head.bias": bias(model.head.bias, model.head.out_features)}
    for i, b in enumerate(blocks):
        q = f"encoder.layers.encoder_layer_{i}."
        a, m = b.attn, b.mlp
        sd.update({q + "ln_1.weight": b.norm1.weight, q + "ln_1.bias": b.norm1.bias,
                   q + "self_attention.in_proj_weight": a.qkv.weight,
                   q + "self_attention.in_proj_bias": bias(a.qkv.bias, 3 * width),
                   q + "self_attention.out_proj.weight": a.proj.weight,
                   q + "self_attention.out_proj.bias": bias(a.proj.bias, width),
                   q + "ln_2.weight": b.norm2.weight, q + "ln_2.bias": b.norm2.bias,
                   q + "mlp.0.weight": m.fc1.weight, q + "mlp.0.bias": bias(m.fc1.bias, m.fc1.out_features),
                   q + "mlp.3.weight": m.fc2.weight, q + "mlp.3.bias": bias(m.fc2.bias, width)})
    tv.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return tv.to(ref.device, ref.dtype).eval().requires_grad_(False)


@torch.no_grad()
def check_port(model: nn.Module, port: nn.Module, images: int = 4, seed: int = 0) -> float:
    """Largest |logit difference| of ``model`` and ``port`` on random images, both in float64.

    float64 makes the comparison about the mapping, not float32 rounding of two operation orders.

    Raises:
        ValueError: the difference exceeds :data:`PORT_TOLERANCE`.
    """
    pe = model.patch_embed
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(images, pe.proj.in_channels, *pe.img_size, generator=gen, dtype=torch.float64)
    a, b = copy.deepcopy(model).double().eval(), copy.deepcopy(port).double().eval()
    diff = float((a(x) - b(x)).abs().max())
    if not diff <= PORT_TOLERANCE:
        raise ValueError(f"the torchvision port differs from the timm ViT by {diff:.3g} (> {PORT_TOLERANCE:g}) "
                         "in its logits: a module the port does not map changes the output")
    return diff


# --------------------------------------------------------------------------------------------------
# counting wrappers around the recipe's modules
# --------------------------------------------------------------------------------------------------

class EncoderSite(nn.Module):
    """One STA spike encoder, counted: bursts (non-zero outputs) or spikes (|counts|), and the payload.

    The encoder's output is ``count * theta`` (per-channel ``theta``); the count is recovered by
    rounding ``output / theta``. Every call adds to ``events``, ``spikes``, ``neuron_steps`` and
    raises ``max_count`` (the largest burst one neuron sent in one step); :meth:`clear_counts`
    zeroes them (they outlive ``reset_net``: they are not memories).

    Args:
        encoder: SpikingJelly's ``_STASpikeEncoder``.
        rule: ``"event"`` (a burst is one event) or ``"spike"`` (a burst of k is k events).
    """

    def __init__(self, encoder: nn.Module, rule: str = "event") -> None:
        super().__init__()
        self.encoder, self.rule = encoder, rule
        for name in ("events", "spikes", "neuron_steps", "max_count"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float64), persistent=False)
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # events, spikes, largest burst

    def counts(self, output: Tensor) -> Tensor:
        """|spike count| per neuron and step of an output of this encoder."""
        theta = self.encoder.v_threshold.to(output).clamp(min=torch.finfo(output.dtype).eps)
        shape = [1] * output.dim()
        shape[self.encoder.channel_dim] = theta.numel()
        return (output / theta.view(shape)).abs_().round_()  # one new tensor, the rest in place

    def forward(self, x: Tensor) -> Tensor:
        out = self.encoder(x)
        with torch.no_grad():
            c = self.counts(out)
            events, spikes = torch.count_nonzero(c).to(torch.float64), c.sum(dtype=torch.float64)
            largest = c.max().to(torch.float64) if c.numel() else torch.zeros((), dtype=torch.float64)
            self.events += events
            self.spikes += spikes
            self.neuron_steps += out.numel()
            self.max_count.copy_(torch.maximum(self.max_count, largest))
            self._last = (events, spikes, largest)
        return out

    def spike_units(self, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """The signed burst size per neuron and step (the payload counter's reading of this site)."""
        theta = self.encoder.v_threshold.to(output).clamp(min=torch.finfo(output.dtype).eps)
        shape = [1] * output.dim()
        shape[self.encoder.channel_dim] = theta.numel()
        return (output / theta.view(shape)).round_()

    def count_events(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, int]:
        """Events of the call just run (the firing counter's hook), by this site's rule."""
        events, spikes, _ = self._last if self._last is not None else (torch.zeros(()),) * 3
        return (spikes if self.rule == "spike" else events), output.numel()

    def count_spikes(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, Tensor]:
        """(spikes, largest burst) of the call just run: the payload hook proposed for the contract
        (a binary neuron would return its events and 1)."""
        _, spikes, largest = self._last if self._last is not None else (torch.zeros(()),) * 3
        return spikes, largest

    def clear_counts(self) -> None:
        for b in (self.events, self.spikes, self.neuron_steps, self.max_count):
            b.zero_()


def _per_step_nonzero(x: Tensor) -> Tensor:
    return torch.count_nonzero(x.reshape(x.shape[0], -1), dim=1).to(torch.float64)


def _per_step_events(src: EncoderSite | None, x: Tensor, rule: str) -> Tensor:
    """Events (``rule="event"``: non-zero bursts) or unit spikes (``"spike"``) of ``x`` per step."""
    if src is not None and rule == "spike":
        return src.counts(x).reshape(x.shape[0], -1).sum(1, dtype=torch.float64)
    return _per_step_nonzero(x)


class CountedAffine(nn.Module):
    """A TD Linear / Conv2d of the recipe that counts its operations per step (``count_ops``).

    Fed by an encoder (``source``): one AC per event (or spike, by ``source.rule``) and target.
    Fed by floating-point values: one MAC per non-zero input entry and target (the exact fan-out of
    a convolution, :func:`csdlab.snn.counting.synaptic_events`): a TD layer whose input did not
    change does no work.
    """

    #: a synaptic site of the spike-driven check (csdlab.eval.checks), like the Linear / Conv2d it
    #: wraps. The encoders are not declared spike sources (their alphabet, count x per-channel
    #: threshold with no bound on the count, is not a finite alphabet), so bursts read as analog
    synaptic_product = True

    def __init__(self, layer: nn.Module, source: EncoderSite | None) -> None:
        super().__init__()
        self.layer = layer
        self._source = [source]  # a plain list: the site is registered where it runs, not here
        # the layer's geometry as a weightless (meta) torch layer, for synaptic_events; in a list so
        # that it is not a submodule (.to() cannot move meta tensors)
        if hasattr(layer, "kernel_size"):
            geometry: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                       layer.padding, layer.dilation, layer.groups, bias=False, device="meta")
            if source is not None:
                raise ValueError("a spiking input to a convolution is not counted (STA feeds it the image)")
        else:
            geometry = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        self._geometry = [geometry]

    @property
    def source(self) -> EncoderSite | None:
        return self._source[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def count_ops(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, Tensor]:
        """(MACs, ACs) per step of one multi-step call on ``[T, B, ...]``: two ``[T]`` tensors."""
        x = inputs[0].detach()
        steps = x.shape[0]
        zero = torch.zeros(steps, dtype=torch.float64)
        src = self.source
        if src is None:
            rows = synaptic_events(self._geometry[0], x.reshape(-1, *x.shape[2:]))  # [T*B]
            return rows.view(steps, -1).sum(1).cpu(), zero
        fan_out = self._geometry[0].out_features
        return zero, (_per_step_events(src, x, src.rule) * fan_out).cpu()

    def count_spike_acs(self, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """ACs per step under the unit-spike rule (a burst of k spikes: k ACs per target)."""
        x = inputs[0].detach()
        src = self.source
        if src is None:
            return torch.zeros(x.shape[0], dtype=torch.float64)
        return (_per_step_events(src, x, "spike") * self._geometry[0].out_features).cpu()


class CountedAttention(nn.Module):
    """The recipe's ``TDMultiheadAttention`` (self-attention), counting its operations per step.

    q, k, v projections on the encoder's bursts: one AC per event (or spike) and each of their
    ``3 D`` targets. The two attention products and the output projection act on floating-point
    accumulated values: for every image whose input changed at a step, the dense MACs of
    ``q k^T`` and ``attn v`` (``2 N^2 D``) and of the output projection (``N D^2``).
    """

    #: a site of the spike-driven check. It sees only the block's input (bursts); the products
    #: inside act on floating-point accumulated q, k, v, which no hook can observe: were the
    #: encoders ever declared spike sources, this site would need to report those operands itself
    synaptic_product = True

    def __init__(self, attention: nn.Module, source: EncoderSite | None) -> None:
        super().__init__()
        self.attention = attention
        self._source = [source]

    @property
    def source(self) -> EncoderSite | None:
        return self._source[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.attention(*args, **kwargs)

    def count_ops(self, inputs: tuple[Tensor, ...], output: Any) -> tuple[Tensor, Tensor]:
        x = inputs[0].detach()  # [T, B, N, D]; query, key and value are the same tensor
        if len(inputs) >= 3 and not (inputs[1] is x or inputs[1] is inputs[0]):
            raise ValueError("CountedAttention counts self-attention only (query = key = value)")
        steps, _, n, d = x.shape
        src = self.source
        acs = _per_step_events(src, x, src.rule if src is not None else "event") * 3 * d
        active = (x.reshape(steps, x.shape[1], -1) != 0).any(-1).sum(1).to(torch.float64)  # images per step
        macs = active * float(2 * n * n * d + n * d * d)
        if src is None:  # a floating-point input: the projections are MACs too
            macs, acs = macs + acs, torch.zeros_like(acs)
        return macs.cpu(), acs.cpu()

    def count_spike_acs(self, inputs: tuple[Tensor, ...], output: Any) -> Tensor:
        """The q, k, v projections' ACs per step under the unit-spike rule."""
        x = inputs[0].detach()
        if self.source is None:
            return torch.zeros(x.shape[0], dtype=torch.float64)
        return (_per_step_events(self.source, x, "spike") * 3 * x.shape[-1]).cpu()


_PASS_THROUGH_OPS = {operator.getitem}


def _source_encoder(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The encoder whose output reaches ``node``'s first input through shape-only ops, if any."""
    arg = node.args[0] if node.args else None
    while isinstance(arg, fx.Node):
        if arg.op == "call_module":
            mod = modules[arg.target]
            kind = type(mod).__name__
            if kind == "_STASpikeEncoder":
                return str(arg.target)
            if kind == "_StepModeTensorOp" and getattr(mod, "op_name", "") in ("getitem", "reshape", "view",
                                                                                 "permute", "flatten"):
                arg = arg.args[0]
                continue
            if isinstance(mod, nn.Dropout):
                arg = arg.args[0]
                continue
            return None
        if arg.op == "call_function" and arg.target in _PASS_THROUGH_OPS:
            arg = arg.args[0]
            continue
        return None
    return None


def _site_name(node: fx.Node) -> str:
    """A readable name for an encoder: the module whose output it encodes."""
    src = node.args[0]
    if isinstance(src, fx.Node) and src.op == "call_function" and src.target is operator.getitem:
        src = src.args[0]  # the attention output (MultiheadAttention returns a tuple)
    return str(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else str(node.target)


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def instrument(net: fx.GraphModule, rule: str = "event") -> dict[str, EncoderSite]:
    """Wrap, in place, the encoders, TD affine layers and TD attention of a converted graph in
    counting modules; returns the encoder sites by readable name (network order)."""
    modules = dict(net.named_modules())
    sites: dict[str, EncoderSite] = {}
    by_target: dict[str, EncoderSite] = {}
    for node in net.graph.nodes:
        if node.op != "call_module":
            continue
        mod, kind = modules[node.target], type(modules[node.target]).__name__
        if kind == "_STASpikeEncoder":
            site = EncoderSite(mod, rule)
            by_target[node.target] = site
            sites[_site_name(node)] = site
            _set_module(net, node.target, site)
        elif kind in ("TDLinear", "TDConv2d", "TDMultiheadAttention"):
            src = _source_encoder(node, modules)
            source = by_target[src] if src is not None else None
            wrapped = CountedAttention(mod, source) if kind == "TDMultiheadAttention" else CountedAffine(mod, source)
            _set_module(net, node.target, wrapped)
    return sites


# --------------------------------------------------------------------------------------------------
# the spiking model and the converter
# --------------------------------------------------------------------------------------------------

class STASpikingModel(SpikingModel):
    """A network converted by SpikingJelly's STA recipe, simulated for T steps (readout after each).

    Args:
        net: the recipe's graph, instrumented (:func:`instrument`).
        sites: its encoder sites by name.
        time_steps: T (the recipe's; its thresholds are ``best / T``).
        images_per_pass: simulate at most this many images at once (None: the whole batch).
    """

    def __init__(self, net: fx.GraphModule, sites: dict[str, EncoderSite], time_steps: int,
                 images_per_pass: int | None = None) -> None:
        super().__init__(int(time_steps))
        from spikingjelly.activation_based import functional

        self.net = net
        self._sites = dict(sites)
        self.images_per_pass = images_per_pass
        functional.set_step_mode(self.net, "m")

    def forward(self, images: Tensor) -> Tensor:
        from spikingjelly.activation_based import functional

        outs = []
        chunk = self.images_per_pass or len(images)
        for part in images.split(max(chunk, 1)):
            functional.reset_net(self.net)
            seq = part.new_zeros(self.time_steps, *part.shape)
            seq[0] = part  # the image at step 1, nothing after (the recipe's input convention)
            outs.append(self.net(seq).cumsum(0))  # [T, b, K]: readout after every step
        functional.reset_net(self.net)
        return torch.cat(outs, dim=1)

    def sites(self) -> dict[str, nn.Module]:
        return dict(self._sites)

    def analog_layers(self) -> list[nn.Module]:
        # the patch embedding (fed the image); every layer counts itself (count_ops), so this only
        # exempts it from the spike-driven check
        return [m for m in self.net.modules() if isinstance(m, CountedAffine) and m.source is None]

    def time_flattened(self) -> bool:
        return True  # layers see [T, B, ...] once; their count_ops return per-step tensors

    def uncounted_modules(self) -> dict[nn.Module, str]:
        """The class token and position embedding (a constant sent at step 1: additions) and the
        recipe's LayerNorms (element-wise floating point), which neither side counts."""
        out: dict[nn.Module, str] = {}
        for m in self.net.modules():
            if not any(True for _ in m.parameters(recurse=False)) or hasattr(m, "count_ops"):
                continue
            if "LayerNorm" in type(m).__name__:
                out[m] = "LayerNorm: element-wise floating point, not counted on either side"
            elif not isinstance(m, (nn.Linear, nn.Conv2d)):
                out[m] = "class token / position embedding: constants added once, not counted on either side"
        return out

    def clear_counts(self) -> None:
        for s in self._sites.values():
            s.clear_counts()

    def payload(self) -> dict[str, Any]:
        """The largest burst one neuron sent in one step, per site and overall, and what it takes
        to send it: ``bits = ceil(log2(max_count + 1)) + 1`` (the count and its sign), spikes per
        burst (mean), events and spikes since the last :meth:`clear_counts`."""
        per_site = {}
        for name, s in self._sites.items():
            k = int(s.max_count)
            per_site[name] = {"max_count": k, "bits": _bits(k), "events": float(s.events), "spikes": float(s.spikes),
                              "spikes_per_event": float(s.spikes) / max(float(s.events), 1.0)}
        events = sum(v["events"] for v in per_site.values())
        spikes = sum(v["spikes"] for v in per_site.values())
        k = max((v["max_count"] for v in per_site.values()), default=0)
        return {"max_count": k, "bits": _bits(k), "spikes_per_event": spikes / max(events, 1.0),
                "events": events, "spikes": spikes, "sites": per_site}


def _bits(max_count: int) -> int:
    return 0 if max_count <= 0 else math.ceil(math.log2(max_count + 1)) + 1  # magnitude + sign


class STAConverter(Converter):
    """SpikingJelly's ``STATransformerRecipe`` on a timm ViT (ported to torchvision's, checked).

    Args:
        T: the recipe's time steps (it divides its calibrated thresholds by T: larger bursts).
        threshold_mode: ``"mse"`` (the recipe's default: per-channel search of the factor of the
            max |activation| minimising the truncation error) or ``"max"``.
        threshold_scale: factor on every calibrated threshold (the recipe's; its ImageNet
            example uses 0.5).
        momentum: the recipe's running-average momentum of per-batch thresholds.
        mode: ``"spiking_encoder"`` (encoders after LayerNorm, GELU, attention) or
            ``"equivalent"`` (no encoder: every value floating point, the ANN at every t; no
            calibration).
        count: ``"event"`` (a burst is one event, csdlab's rule for graded spikes) or
            ``"spike"`` (a burst of k spikes is k events) for firing rates and ACs.
        images_per_pass: simulate at most this many images at once (None: the whole batch).
    """

    name = "sta"
    origin = "spikingjelly"
    # the encoders send bursts of unbounded size and the attention products run on floating point
    # inside the recipe's modules: the spike-driven check fails it (docs/peers.md)
    spike_driven = False
    # the recipe keeps a momentum running average of per-batch thresholds: processes average their
    # own, which is not the one-process average (every process still ends with the same thresholds)
    calibration_is_exact_across_processes = False

    def __init__(self, T: int = 8, threshold_mode: str = "mse", threshold_scale: float = 1.0, momentum: float = 0.1,
                 mode: str = "spiking_encoder", count: str = "event", images_per_pass: int | None = None) -> None:
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise ValueError(f"T must be an integer >= 1, got {T!r}")
        if threshold_mode not in ("mse", "max"):
            raise ValueError(f"threshold_mode must be 'mse' or 'max', got {threshold_mode!r}")
        if not threshold_scale > 0:
            raise ValueError(f"threshold_scale must be > 0, got {threshold_scale!r}")
        if mode not in ("spiking_encoder", "equivalent"):
            raise ValueError(f"mode must be 'spiking_encoder' or 'equivalent' (the recipe's step-mode backend "
                             f"has no spiking affine mode), got {mode!r}")
        if count not in COUNT_RULES:
            raise ValueError(f"count must be one of {COUNT_RULES}, got {count!r}")
        self.T, self.threshold_mode, self.threshold_scale = T, threshold_mode, float(threshold_scale)
        self.momentum, self.mode, self.count, self.images_per_pass = float(momentum), mode, count, images_per_pass
        self.thresholds: dict[str, Tensor] = {}

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "spiking_encoder"

    def payload(self) -> Payload:
        """A signed burst with no bound on its size (``trunc(v / theta)`` spikes at once)."""
        return Payload.burst(None)

    def check(self, model: nn.Module) -> None:
        """Refuse a model the port cannot map, or whose port does not reproduce its logits."""
        check_port(model, to_torchvision(model))

    def _recipe_convert(self, port: nn.Module, batches: Iterable[Tensor]) -> fx.GraphModule:
        from spikingjelly.activation_based.ann2snn import Converter as SJConverter, STATransformerRecipe

        recipe = STATransformerRecipe(dataloader=batches, time_steps=self.T, mode=self.mode,
                                      threshold_mode=self.threshold_mode, threshold_scale=self.threshold_scale,
                                      momentum=self.momentum)
        device = next(port.parameters()).device
        return SJConverter(recipe=recipe, device=device).convert(port)

    @staticmethod
    def _encoders(net: nn.Module) -> dict[str, Tensor]:
        return {n: m.v_threshold for n, m in net.named_modules() if type(m).__name__ == "_STASpikeEncoder"}

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]],
                  all_reduce: AllReduce) -> dict[str, Any]:
        """The recipe's thresholds from its observers on this process's calibration batches.

        The recipe keeps a running average (``momentum``) of per-batch thresholds, which depends on
        the batch order; with several processes the per-process results are averaged.
        """
        if self.mode != "spiking_encoder":
            return {}
        port = to_torchvision(model)
        seen = [0]

        def images() -> Iterator[Tensor]:
            for b in batches:
                seen[0] += 1
                yield b[0] if isinstance(b, (tuple, list)) else b

        net = self._recipe_convert(port, images())
        thr = self._encoders(net)
        if seen[0] == 0:
            raise ValueError("calibration saw no batches: pass at least one batch of training images")
        device = next(model.parameters()).device
        flat = torch.cat([t.flatten().to(device, torch.float64) for t in thr.values()] +
                         [torch.ones(1, dtype=torch.float64, device=device)])
        total = all_reduce(flat)
        mean = total[:-1] / total[-1]
        out, i = {}, 0
        for name, t in thr.items():
            out[name] = mean[i:i + t.numel()].view_as(t).to(t.dtype).cpu()
            i += t.numel()
        self.thresholds = out
        log.info("STA: calibrated %d encoders on %d batches (T=%d, %s, scale %g)", len(out), seen[0], self.T,
                 self.threshold_mode, self.threshold_scale)
        return {"batches": seen[0], "encoders": len(out),
                "thresholds": {n: {"min": float(t.min()), "median": float(t.median()), "max": float(t.max())}
                               for n, t in out.items()}}

    def convert(self, model: nn.Module) -> dict[str, SpikingModel]:
        port = to_torchvision(model)
        check_port(model, port)
        if self.mode == "spiking_encoder" and not self.thresholds:
            raise ValueError("STA thresholds are not set: run calibrate() first")
        pe = model.patch_embed
        ref = next(model.parameters())
        # the recipe calibrates while converting: it gets one blank image, then its thresholds are
        # replaced by the calibrated ones (same graph, same encoder names)
        probe = [torch.zeros(1, pe.proj.in_channels, *pe.img_size, dtype=ref.dtype, device=ref.device)]
        net = self._recipe_convert(port, probe)
        encoders = self._encoders(net)
        if set(encoders) != set(self.thresholds) and self.mode == "spiking_encoder":
            raise ValueError(f"the recipe's encoders {sorted(encoders)} differ from the calibrated ones "
                             f"{sorted(self.thresholds)}: calibrate and convert the same model")
        for name, buf in encoders.items():
            buf.copy_(self.thresholds[name].to(buf))
        sites = instrument(net, self.count)
        return {f"T{self.T}": STASpikingModel(net, sites, self.T, self.images_per_pass)}
