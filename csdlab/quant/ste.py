"""Straight-through helpers shared by the quantizers."""

from torch import Tensor


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by `scale` (LSQ, Esser et al. 2020)."""
    return (x - x * scale).detach() + x * scale


def round_half_up_ste(x: Tensor) -> Tensor:
    """floor(x + 1/2) forward, identity gradient.

    Round-half-up (not torch.round, which rounds half to even) is what an integrate-and-fire
    neuron with initial membrane theta/2 computes, so the QANN and the SNN agree at ties.
    """
    return (x + 0.5).floor().detach() + x - x.detach()
