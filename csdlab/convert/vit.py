"""ECMT conversion of a timm ``VisionTransformer`` into an SNN, training-free (METHODS 2).

The timm model is not rewritten: :func:`convert_vit` deep-copies it and swaps its ``Attention``,
``Mlp`` and ``LayerNorm`` modules for converted ones that reuse the same ``Linear`` layers. The
model's own ``forward`` then runs one SNN time step per call (stateful single-step modules):

* attention: MT before ``qkv``; MT on q, k, v; matrix-product EC ``q k^T`` (scale folded);
  EC softmax; MT after softmax; matrix-product EC ``attn v``; MT before ``proj``;
* MLP: MT before ``fc1``; EC GELU; MT before ``fc2``;
* every LayerNorm (``norm1``, ``norm2``, final ``norm``, ``fc_norm``, ...) is an EC;
* patch embedding, class token and position embedding see the analog image at every step;
  residual adds stay plain; the head gets the (analog) EC-norm output.

:func:`simulate` feeds the same image for ``T`` steps and returns the running mean of the logits
at every ``t`` (the readout). Thresholds come from :func:`calibrate` (percentiles of the float
activations at each MT site over training batches) or any other source via
:func:`set_thresholds`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from spikingjelly.activation_based import functional
from timm.layers import DropPath, LayerScale, PatchEmbed
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from csdlab.convert.passes import swap_modules
from csdlab.snn.ecmt import ECFunction, ECMatMul
from csdlab.snn.neurons import MTNeuron

__all__ = ["ECMTAttention", "ECMTMlp", "convert_vit", "simulate", "mt_sites", "analog_layers", "percentile",
           "calibrate", "observe_sites", "set_thresholds", "site_overrides", "thresholds_from_percentiles",
           "finalize_thresholds"]

log = logging.getLogger(__name__)

SOFTMAX_SITE = "mt_attn"  # the MT neuron after the softmax (METHODS 2.2 override)
GELU_SITE = "mt_fc2"  # the MT neuron after the MLP activation (METHODS 2.2 override)


def _neuron(levels: int, spiking: bool) -> nn.Module:
    # spiking=False keeps every site but passes values through: the "EC only" network
    return MTNeuron(levels=levels) if spiking else nn.Identity()


def _ec_or_identity(m: nn.Module) -> nn.Module:
    return m if isinstance(m, nn.Identity) else ECFunction(m)


class ECMTAttention(nn.Module):
    """timm ``Attention`` with MT neurons and EC modules (METHODS 2.3); reuses ``qkv``/``proj``.

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
        self.mt_in, self.mt_q, self.mt_k, self.mt_v, self.mt_attn, self.mt_proj = (
            _neuron(levels, spiking) for _ in range(6))
        self.qk = ECMatMul(scale=attn.scale)
        self.softmax = ECFunction(nn.Softmax(dim=-1))
        self.av = ECMatMul()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("ECMT attention does not support attention masks or causal attention")
        B, N, _ = x.shape
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
        self.act, self.norm = ECFunction(mlp.act), _ec_or_identity(mlp.norm)
        self.mt_fc1, self.mt_fc2 = _neuron(levels, spiking), _neuron(levels, spiking)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.mt_fc2(self.norm(self.act(self.fc1(self.mt_fc1(x))))))


# Modules allowed to remain after the swap: they are linear, constant over time, or converted.
_KNOWN = (VisionTransformer, Block, nn.Sequential, PatchEmbed, nn.Linear, nn.Conv2d, nn.Identity,
          nn.Dropout, DropPath, LayerScale, ECMTAttention, ECMTMlp, ECFunction, ECMatMul, MTNeuron)


def _unknown_modules(model: nn.Module) -> dict[str, str]:
    unknown, skip = {}, []
    for name, m in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, ECFunction):
            skip.append(name)  # the wrapped function is evaluated as a whole: any F is fine
        elif type(m) not in _KNOWN:
            unknown[name or "<root>"] = type(m).__name__
    return unknown


def convert_vit(model: nn.Module, levels: int = 8, spiking: bool = True) -> nn.Module:
    """ECMT SNN of a timm ``VisionTransformer`` (a converted deep copy; ``model`` is untouched).

    Thresholds start at 1; set them with :func:`calibrate` or :func:`set_thresholds`.

    Args:
        model: a ``VisionTransformer`` from ``timm.create_model`` (ViT / DeiT, any size, class
            token or average pooling, ``fc_norm``, qkv with or without bias).
        levels: MT levels per sign n (METHODS 2.1).
        spiking: False keeps identity at every MT site (EC only: exact at every t).

    Raises:
        ValueError: the model holds modules ECMT cannot convert (listed by name and type), e.g.
            a Swin or ConvNeXt model, attention pooling, or another block type.
    """
    if isinstance(model, VisionTransformer) and getattr(model, "attn_pool", None) is not None:
        raise ValueError("cannot convert a VisionTransformer with attention pooling (attn_pool)")
    snn = copy.deepcopy(model).eval()
    rules: dict[type, Callable[[nn.Module], nn.Module]] = {
        Attention: lambda m: ECMTAttention(m, levels, spiking),
        Mlp: lambda m: ECMTMlp(m, levels, spiking),
    }
    for m in snn.modules():  # every LayerNorm class present (torch's, timm's, subclasses)
        if isinstance(m, nn.LayerNorm):
            rules.setdefault(type(m), ECFunction)
    swapped = swap_modules(snn, rules)
    unknown = _unknown_modules(snn)
    if unknown or not isinstance(model, VisionTransformer):
        by_type: dict[str, list[str]] = {}
        for name, type_name in unknown.items():
            by_type.setdefault(type_name, []).append(name)
        listing = "; ".join(f"{t} x{len(ns)} ({', '.join(ns[:3])}{', ...' if len(ns) > 3 else ''})"
                            for t, ns in by_type.items()) or "none"
        raise ValueError(f"cannot ECMT-convert {type(model).__name__}: ECMT converts timm VisionTransformer "
                         f"models (Block, Attention, Mlp, LayerNorm); unknown modules: {listing}")
    functional.invalidate_reset_cache(snn)  # SpikingJelly caches the resettable modules
    log.info("ECMT: swapped %d modules (attention, MLP, norms), %d MT sites, levels=%d",
             len(swapped), len(mt_sites(snn)), levels)
    return snn


def mt_sites(snn: nn.Module) -> dict[str, MTNeuron]:
    """The MT neurons of ``snn`` by qualified name (block by block, in module order)."""
    return {name: m for name, m in snn.named_modules() if isinstance(m, MTNeuron)}


def analog_layers(snn: nn.Module) -> list[nn.Module]:
    """Conv/Linear layers fed analog values (METHODS 2.3): patch embedding and head (MACs)."""
    layers = [m for m in snn.patch_embed.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return layers + [m for m in snn.head.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def simulate(snn: nn.Module, x: Tensor, T: int, step_hook: Callable[[int], None] | None = None) -> Tensor:
    """Run ``T`` steps on the analog image ``x``; returns the readout ``[T, B, classes]``.

    The readout at ``t`` is the mean of the logits of steps ``1..t``. The network is reset first.

    Args:
        snn: a converted network (:func:`convert_vit`).
        x: images ``[B, C, H, W]``, fed at every step.
        T: number of time steps (>= 1).
        step_hook: called as ``step_hook(t)`` after each step (e.g. to read an op counter).
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    functional.reset_net(snn)
    total, out = None, []
    for t in range(1, T + 1):
        logits = snn(x)
        total = logits if total is None else total + logits
        out.append(total / t)
        if step_hook is not None:
            step_hook(t)
    return torch.stack(out)


def percentile(x: Tensor, q: float) -> Tensor:
    """Nearest-rank ``q``-th percentile of all of ``x`` (``kthvalue``: no 16M-element limit)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    flat = x.detach().flatten().float()
    k = min(max(int(torch.tensor(q / 100 * flat.numel()).ceil()), 1), flat.numel())
    return flat.kthvalue(k).values


@contextmanager
def observe_sites(snn: nn.Module, p: float) -> Iterator[dict[str, list[Tensor]]]:
    """While entered, every MT site passes its input through unchanged (so one step of the SNN is
    the float ANN) and appends ``[p-th, (100-p)-th percentile]`` of that input to its list."""
    stats: dict[str, list[Tensor]] = {name: [] for name in mt_sites(snn)}

    def hook(name: str) -> Callable[..., Tensor]:
        def fn(mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            x = inputs[0]
            stats[name].append(torch.stack([percentile(x, p), percentile(x, 100 - p)]))
            return x

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mt_sites(snn).items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        for m in mt_sites(snn).values():
            m.clear_counts()
        functional.reset_net(snn)


def site_overrides(snn: nn.Module, softmax_threshold: float | None = 0.0125,
                   gelu_thresholds: tuple[float, float] | None = None) -> dict[str, tuple[float, float]]:
    """Fixed thresholds of METHODS 2.2 for the sites after softmax / after GELU (None: percentile)."""
    out = {}
    for name in mt_sites(snn):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == SOFTMAX_SITE and softmax_threshold is not None:
            out[name] = (softmax_threshold, softmax_threshold)
        elif leaf == GELU_SITE and gelu_thresholds is not None:
            out[name] = tuple(gelu_thresholds)
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


def finalize_thresholds(snn: nn.Module, mean_percentiles: dict[str, tuple[float, float]],
                        overrides: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Thresholds from averaged ``(hi, lo)`` percentiles, with ``overrides`` taking precedence;
    sets them on ``snn`` and returns them."""
    th = {n: thresholds_from_percentiles(*hl) for n, hl in mean_percentiles.items()}
    th.update(overrides)
    set_thresholds(snn, th)
    return th


@torch.no_grad()
def calibrate(snn: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]], p: float = 99.0,
              softmax_threshold: float | None = 0.0125,
              gelu_thresholds: tuple[float, float] | None = None) -> dict[str, tuple[float, float]]:
    """Set every MT site's thresholds from the float activations (METHODS 2.2), single process.

    ``th1`` = p-th percentile, ``th2`` = -(100-p)-th percentile of the site's whole batch tensor,
    averaged over ``batches`` (training images; ``(x, y)`` tuples are accepted).

    Args:
        snn: a converted network.
        batches: calibration images.
        p: percentile (e.g. 99).
        softmax_threshold: fixed post-softmax thresholds (None: percentile).
        gelu_thresholds: fixed post-GELU ``(th1, th2)`` (None: percentile).
    """
    with observe_sites(snn, p) as stats:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            functional.reset_net(snn)
            snn(x)
    if not all(stats.values()):
        raise ValueError("calibration saw no batches")
    means = {n: tuple(torch.stack(v).mean(0).tolist()) for n, v in stats.items()}
    return finalize_thresholds(snn, means, site_overrides(snn, softmax_threshold, gelu_thresholds))

