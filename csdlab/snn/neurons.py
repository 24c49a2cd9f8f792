"""Spiking neurons built on SpikingJelly 2.0's stateful ``MemoryModule``.

* :class:`DelayedIFNode`: the delayed integrate-and-fire (DIF) neuron of CSDformer (METHODS 1.4,
  Algorithm 1). With ``delay >= T - 1`` its spike count equals the LSQ quantizer's level.
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import base
from torch import Tensor

from csdlab.quant.lsq import ActQuantizer

__all__ = ["DelayedIFNode"]


class DelayedIFNode(base.MemoryModule):
    """Delayed IF neuron (CSDformer Alg. 1); multi-step, inference only.

    ``v = theta/2``; for ``t = 1..T+D``: if ``t <= T``: ``v += I(t)``; if ``t > D``:
    ``s(t-D) = [v >= theta]``, ``v -= theta s(t-D)`` (reset by subtraction). A ``[T, ...]`` input
    gives a ``[T, ...]`` binary spike train; the D extra steps let late input be counted, so for
    ``D >= T-1`` the count is exactly ``clip(floor(sum I / theta + 1/2), 0, T)``.

    Args:
        v_threshold: firing threshold theta (> 0).
        delay: extra integration steps D (>= 0); 0 is the plain IF neuron.
    """

    def __init__(self, v_threshold: float | Tensor, delay: int = 3) -> None:
        super().__init__()
        theta = torch.as_tensor(v_threshold, dtype=torch.get_default_dtype()).detach().clone()
        if theta.numel() != 1 or not bool(theta > 0):
            raise ValueError(f"v_threshold must be a positive scalar, got {v_threshold!r}")
        if not isinstance(delay, int) or isinstance(delay, bool) or delay < 0:
            raise ValueError(f"delay must be an integer >= 0 (0 = plain IF), got {delay!r}")
        self.delay = delay
        # a buffer, so .double() / .to(device) follow the model and state_dict saves it
        self.register_buffer("v_threshold", theta.reshape(()))
        self.register_memory("v", None)  # materialized as v_threshold / 2 at the first step
        self.step_mode = "m"

    def supported_step_mode(self) -> tuple[str, ...]:
        return ("m",)

    @classmethod
    def from_quantizer(cls, q: ActQuantizer, delay: int = 3) -> DelayedIFNode:
        """The neuron replacing quantizer ``q`` when its input current is ``T x`` the QANN's
        pre-activation (theta = s*L = clip value; METHODS 1.3.2)."""
        return cls(q.threshold.detach(), delay)

    def materialize_states(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                           step_mode: str) -> tuple[Tensor]:
        (v,) = states
        if v is None:
            # initial membrane theta/2 turns truncation into round-half-up
            v = torch.full_like(inputs[0][0], 0.5) * self.v_threshold
        return (v,)

    def multi_step_functional_forward(self, inputs: tuple[Tensor, ...], states: tuple[object, ...],
                                      **kwargs: object) -> tuple[tuple[Tensor], tuple[Tensor]]:
        x_seq, (v,) = inputs[0], states
        theta = self.v_threshold.to(x_seq.dtype)
        steps = x_seq.shape[0]
        spikes = []
        for t in range(steps + self.delay):
            if t < steps:
                v = v + x_seq[t]
            if t >= self.delay:
                s = (v >= theta).to(x_seq.dtype)
                v = v - s * theta
                spikes.append(s)
        return (torch.stack(spikes),), (v,)

    def extra_repr(self) -> str:
        return f"v_threshold={float(self.v_threshold):.4g}, delay={self.delay}"
