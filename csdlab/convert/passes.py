"""Generic model-rewriting passes used by the converters. Every pass reports what it changed."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from csdlab.models.csdformer import ConvBN, LinearBN

__all__ = ["swap_modules", "fold_batchnorm_", "fold_bn_into_", "scale_input_", "unknown_modules", "describe_modules"]


def swap_modules(model: nn.Module, rules: Mapping[type, Callable[[nn.Module], nn.Module]],
                 prefix: str = "") -> list[str]:
    """Replace children whose exact type is in ``rules`` by ``rules[type](child)``.

    Walks the module tree (no name matching); a replaced child is not descended into.

    Args:
        model: the network, edited in place.
        rules: exact module type -> factory building its replacement from it.
        prefix: qualified-name prefix for the returned names (used by the recursion).

    Returns:
        The qualified names of the swapped modules, in tree order.
    """
    swapped = []
    for name, child in model.named_children():
        factory = rules.get(type(child))
        if factory is not None:
            setattr(model, name, factory(child))
            swapped.append(prefix + name)
        else:
            swapped += swap_modules(child, rules, f"{prefix}{name}.")
    return swapped


@torch.no_grad()
def fold_bn_into_(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    """Fold an eval-mode BN into the layer before it (docs/methods.md §1.3.1), per output channel:
    ``W' = g/sqrt(var+eps) W``, ``b' = g (b - mu)/sqrt(var+eps) + beta``."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold a BatchNorm without running statistics: {bn}")
    inv_std = (bn.running_var + bn.eps).rsqrt()
    gain = inv_std if bn.weight is None else bn.weight * inv_std
    shift = torch.zeros_like(gain) if bn.bias is None else bn.bias
    bias = torch.zeros_like(gain) if layer.bias is None else layer.bias
    layer.weight.mul_(gain.view(-1, *[1] * (layer.weight.dim() - 1)))  # [C_out, ...] rows
    new_bias = gain * (bias - bn.running_mean) + shift
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
    else:
        layer.bias.copy_(new_bias)


def fold_batchnorm_(model: nn.Module) -> list[str]:
    """Fold the BN of every :class:`ConvBN` / :class:`LinearBN` into its conv / linear layer and
    replace the BN by ``nn.Identity``. Returns the qualified names of the folded blocks."""
    folded = []
    for name, m in model.named_modules():
        if type(m) is ConvBN or type(m) is LinearBN:
            fold_bn_into_(m.conv if type(m) is ConvBN else m.linear, m.bn)
            m.bn = nn.Identity()
            folded.append(name)
    return folded


@torch.no_grad()
def scale_input_(layer: nn.Module, scale: float | Tensor) -> None:
    """Multiply a conv / linear layer's weight by ``scale``, so a spike (1) fed to it acts as the
    value ``scale`` (the threshold of the neuron that fired it). The bias is left unchanged."""
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"scale_input_ takes nn.Conv2d or nn.Linear, got {type(layer).__name__}")
    layer.weight.mul_(torch.as_tensor(scale, dtype=layer.weight.dtype, device=layer.weight.device))


def unknown_modules(model: nn.Module, known: tuple[type, ...], opaque: tuple[type, ...] = ()) -> dict[str, str]:
    """Modules of ``model`` whose exact type is not in ``known``, as ``{qualified name: type name}``.

    Children of an ``opaque`` module (a converted module evaluated as a whole) are not inspected.
    Used by the converters to refuse a network they would convert only in part.
    """
    unknown: dict[str, str] = {}
    skip: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, opaque):
            skip.append(name)
        elif type(m) not in known:
            unknown[name or "<root>"] = type(m).__name__
    return unknown


def describe_modules(unknown: dict[str, str], limit: int = 3) -> str:
    """``"Type xN (name, name, ...); ..."`` for an error message ("none" when empty)."""
    by_type: dict[str, list[str]] = {}
    for name, type_name in unknown.items():
        by_type.setdefault(type_name, []).append(name)
    return "; ".join(f"{t} x{len(ns)} ({', '.join(ns[:limit])}{', ...' if len(ns) > limit else ''})"
                     for t, ns in by_type.items()) or "none"
