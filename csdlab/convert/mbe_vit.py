"""The MBE network of a timm ``VisionTransformer`` (docs/methods.md §4.3): its blocks and its model.

The converter (:mod:`csdlab.convert.mbe`) swaps timm's modules for these, reusing the ANN's own
``Linear`` layers (weights untouched):

* ``Attention`` -> :class:`MBEAttention`: identity neuron before ``qkv`` and ``proj``
  (``linear_inputs``), ``q k^T`` and ``attn v`` as spiking products of identity-coded operands
  (``products``), :class:`~csdlab.snn.mbe_ops.MBESoftmax` (``softmax``);
* ``Mlp`` -> :class:`MBEMlp`: identity neuron before ``fc1`` (``linear_inputs``), the GELU neuron
  (``gelu``), whose spikes drive ``fc2``.

:class:`MBESpikingModel` runs the converted network: one presentation runs all ``T`` steps of every
neuron (value presented once), so no tensor carries a time axis; the readout is the logits after
``T`` (``readout_steps = [T]``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from spikingjelly.activation_based import functional
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from torch import Tensor, nn

from csdlab.convert.vit import (analog_layers, check_images, merge_heads, refuse_mask, sites_of, split_heads,
                                uncounted_modules)
from csdlab.eval.api import SpikingModel
from csdlab.snn.mbe import MBECode, MBENeuron
from csdlab.snn.mbe_ops import MBELinear, MBEProduct, MBESoftmax

__all__ = ["NeuronFactory", "EXACT_GROUPS", "IDENTITY_ROLES", "check_exact_groups", "MBEAttention", "MBEMlp",
           "MBESpikingModel", "mbe_sites"]


# neuron groups that :class:`NeuronFactory` can make exact one at a time (the per-group ablation,
# docs/mbe.md §5): the four fitted primitives, and the identity neurons by the role of their site
EXACT_GROUPS = ("gelu", "exp2", "recip", "rsqrt", "centred", "products", "linear_inputs")
IDENTITY_ROLES = ("centred", "products", "linear_inputs")


def check_exact_groups(groups: Iterable[str]) -> frozenset[str]:
    """``groups`` as a set, each a member of :data:`EXACT_GROUPS` or ``"identity"``.

    Raises:
        ValueError: an unknown group (named, with the choices).
    """
    groups = frozenset(groups)
    unknown = sorted(groups - set(EXACT_GROUPS) - {"identity"})
    if unknown:
        raise ValueError(f"unknown MBE exact group(s) {unknown}: choose from {list(EXACT_GROUPS)} or 'identity'")
    return groups


class NeuronFactory:
    """Builds the neurons of one network: one shared code per primitive (tables built once).

    Args:
        codes: the code of every primitive.
        gelu_code: the GELU code (its own number of bases).
        fast: exact-table neurons.
        exact: every neuron replaced by its exact function.
        exact_groups: groups of :data:`EXACT_GROUPS` (or ``"identity"``: all identity roles) whose
            neurons are replaced by their exact function; the others spike.
    """

    def __init__(self, codes: dict[str, MBECode], gelu_code: MBECode, fast: bool, exact: bool,
                 exact_groups: frozenset[str] = frozenset()) -> None:
        self.codes, self.gelu_code, self.fast, self.exact = codes, gelu_code, fast, exact
        self.exact_groups = check_exact_groups(exact_groups)

    def neuron(self, primitive: str, role: str | None = None) -> MBENeuron:
        """A neuron for ``primitive``; identity neurons name their site's ``role`` (:data:`IDENTITY_ROLES`)."""
        if primitive == "identity" and role not in IDENTITY_ROLES:
            raise ValueError(f"an identity neuron needs a role in {IDENTITY_ROLES}, got {role!r}")
        group = role if primitive == "identity" else primitive
        exact = (self.exact or group in self.exact_groups
                 or (primitive == "identity" and "identity" in self.exact_groups))
        code = self.gelu_code if primitive == "gelu" else self.codes[primitive]
        return MBENeuron(code, fast=self.fast, exact=exact)


class MBEAttention(nn.Module):
    """timm ``Attention`` with MBE neurons (docs/methods.md §4.3); reuses ``qkv`` / ``proj``.

    Args:
        attn: the timm module (not gated: :func:`~csdlab.convert.vit.check_vit`; its ``q_norm`` /
            ``k_norm`` / ``norm`` are kept, already converted when they are LayerNorms).
        make: neuron factory.
        softmax: spiking softmax (else torch's).
        products: spiking ``q k^T`` and ``attn v`` (else dense products of the exact values).
        linear_inputs: identity neurons before ``qkv`` and ``proj``.
    """

    def __init__(self, attn: Attention, make: NeuronFactory, softmax: bool = True, products: bool = True,
                 linear_inputs: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.scale = float(attn.scale)
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.qkv = MBELinear(attn.qkv, make.neuron("identity", "linear_inputs")) if linear_inputs else attn.qkv
        self.proj = MBELinear(attn.proj, make.neuron("identity", "linear_inputs")) if linear_inputs else attn.proj
        self.qk = (MBEProduct(make.neuron("identity", "products"), make.neuron("identity", "products"), True,
                              self.scale) if products else None)
        self.av = (MBEProduct(make.neuron("identity", "products"), make.neuron("identity", "products"), True)
                   if products else None)
        self.softmax = MBESoftmax(make.neuron("exp2"), make.neuron("recip")) if softmax else nn.Softmax(dim=-1)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        refuse_mask("MBE", attn_mask, is_causal)
        q, k, v = split_heads(self.qkv(x), self.num_heads, self.head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        kt = k.transpose(-2, -1)
        scores = self.qk(q, kt) if self.qk is not None else (q @ kt) * self.scale  # [B, H, N, N]
        attn = self.softmax(scores)
        out = self.av(attn, v) if self.av is not None else attn @ v  # [B, H, N, d]
        return self.proj(self.norm(merge_heads(out)))


class MBEMlp(nn.Module):
    """timm ``Mlp`` with MBE neurons; reuses ``fc1`` / ``fc2``.

    Args:
        mlp: the timm module (activation ``nn.GELU``).
        make: neuron factory.
        gelu: the GELU neuron (else the exact GELU).
        linear_inputs: identity neuron before ``fc1`` (and before ``fc2`` when its input is not the
            GELU neuron's spikes).
    """

    def __init__(self, mlp: Mlp, make: NeuronFactory, gelu: bool = True, linear_inputs: bool = True) -> None:
        super().__init__()
        if not isinstance(mlp.act, nn.GELU) or getattr(mlp.act, "approximate", "none") != "none":
            raise ValueError(f"MBE converts Mlp blocks with nn.GELU(approximate='none'), got {mlp.act}")
        self.fc1 = MBELinear(mlp.fc1, make.neuron("identity", "linear_inputs")) if linear_inputs else mlp.fc1
        self.norm = mlp.norm
        direct = gelu and isinstance(mlp.norm, nn.Identity)  # the GELU spikes drive fc2 themselves
        self.act = nn.Identity() if direct else (make.neuron("gelu") if gelu else mlp.act)
        if direct:
            self.fc2 = MBELinear(mlp.fc2, make.neuron("gelu"))
        else:
            self.fc2 = MBELinear(mlp.fc2, make.neuron("identity", "linear_inputs")) if linear_inputs else mlp.fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


def mbe_sites(snn: nn.Module) -> dict[str, MBENeuron]:
    """The MBE neurons of ``snn`` by qualified name (module order)."""
    return sites_of(snn, MBENeuron)


class MBESpikingModel(SpikingModel):
    """A converted ViT with readout after the ``T`` steps of its neurons (``readout_steps = [T]``).

    Args:
        snn: the network from :func:`csdlab.convert.mbe.convert_vit_mbe`.
        T: time steps per neuron.
    """

    def __init__(self, snn: nn.Module, T: int) -> None:
        super().__init__(T, readout_steps=[T])
        self.snn = snn

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Reset, run the ``T`` steps of every neuron on ``images [B, C, H, W]``, return the readout
        ``[1, B, classes]``.

        Raises:
            ValueError: not ``[B, C, H, W]``, or NaN / inf pixels (:func:`~csdlab.convert.vit.check_images`).
        """
        check_images(images)
        functional.reset_net(self.snn)
        return self.snn(images).unsqueeze(0)  # [1, B, classes]

    def sites(self) -> dict[str, nn.Module]:
        return dict(mbe_sites(self.snn))

    def analog_layers(self) -> list[nn.Module]:
        """Patch-embedding conv and head(s) (they see analog values: MACs)."""
        return analog_layers(self.snn)

    def uncounted_modules(self) -> dict[nn.Module, str]:
        return uncounted_modules(self.snn)

    def time_flattened(self) -> bool:
        # each layer runs once per image batch and that call covers all T steps of its neurons;
        # the counts of count_events / count_ops are totals over the T steps
        return False
