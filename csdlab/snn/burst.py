"""The burst neuron: ECMT's multi-threshold neuron with uniform levels (docs/peers.md).

STA (SpikingJelly's recipe) reaches the ANN after one step because its encoders send a *burst*: a
signed count of unit spikes, as many as the membrane holds, with a unit ``theta`` small next to the
activation range. ECMT's neuron sends one power-of-two level ``th 2^k`` per step with its smallest
level at the calibrated range, so the first step is a coarse, logarithmic code. :class:`BurstNeuron`
keeps everything of :class:`~csdlab.snn.neurons.MTNeuron` (membrane from 0, reset by subtraction,
one call per step or one multi-step call, expectation compensation around it) and changes only what
one step may send: ``k`` unit spikes of ``q = th / L``, ``k = 0..L`` (``L`` = ``levels``), i.e. a
uniform code whose largest value is the calibrated range ``th`` itself::

    m = v + I
    k = min(floor(m / q + 1/2), L)        (q = th1 / L; the negative side with th2)
    x = k q;  v = m - x

The payload is a bounded burst (``Payload.burst(L)``): ``ceil(log2(2L + 1))`` bits per event.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from csdlab.snn.neurons import MTNeuron

__all__ = ["BurstNeuron"]


class BurstNeuron(MTNeuron):
    """A signed burst of up to ``levels`` unit spikes ``th / levels`` per step (module docstring).

    A subclass of :class:`MTNeuron`: ECMT's sites, calibration and simulator take it unchanged.

    Args:
        th1: positive range (> 0): the largest value one step sends.
        th2: negative range magnitude (> 0).
        levels: the largest burst L (>= 1).
        inplace: as :class:`MTNeuron`.
    """

    def __init__(self, th1: float = 1.0, th2: float = 1.0, levels: int = 16, inplace: bool = False) -> None:
        super().__init__(th1, th2, levels=levels, count_levels=False, inplace=inplace)

    def _units(self, dtype: torch.dtype, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """``(q1, -q2)``: the signed unit of each side, as :meth:`_fire` computes it in ``dtype``."""
        half_sum, half_diff, _ = self._constants(torch.empty((), dtype=dtype, device=device))
        return (half_sum + half_diff) / self.levels, (-half_sum + half_diff) / self.levels

    def spike_alphabet(self, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """``0`` and ``k q1``, ``-k q2`` for ``k = 1..L`` as :meth:`_fire` computes them."""
        q1, q2 = self._units(dtype, device)
        k = torch.arange(1, self.levels + 1, dtype=dtype, device=device)
        return torch.cat([torch.zeros(1, dtype=dtype, device=device), k * q1, k * q2])

    def spike_units(self, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """The signed burst size ``k`` of every output entry."""
        q1, q2 = self._units(output.dtype, output.device)
        return torch.where(output >= 0, output / q1, output / -q2).round_()  # q2 < 0: -th2 / L

    def _fire(self, m: Tensor, sth: Tensor | None = None, out: Tensor | None = None,
              constants: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        half_sum, half_diff, half = constants if constants is not None else self._constants(m)
        # the signed range of each neuron's side (th1 or -th2, as MTNeuron), then its unit
        sth = torch.copysign(half_sum, m, out=sth).add_(half_diff).div_(self.levels)
        k = torch.addcdiv(half, m, sth, out=out).floor_().clamp_(max=float(self.levels))  # m / q + 1/2 >= 0
        return k.mul_(sth)

    def _count(self, spikes: Tensor) -> None:  # pragma: no cover - count_levels is off
        raise NotImplementedError("BurstNeuron counts through the payload counter, not per level")

    def extra_repr(self) -> str:
        return f"th1={float(self.th1):.4g}, th2={float(self.th2):.4g}, burst<={self.levels}"


def swap_to_bursts(net: nn.Module, levels: int) -> int:
    """Replace, in place, every :class:`MTNeuron` of ``net`` by a :class:`BurstNeuron` of ``levels``
    with the same thresholds and in-place setting; returns how many were swapped."""
    swapped = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is MTNeuron:
                burst = BurstNeuron(float(child.th1), float(child.th2), levels, inplace=child.inplace)
                burst.step_mode = child.step_mode
                for attr in ("flat_steps", "keep_state"):
                    if hasattr(child, attr):
                        setattr(burst, attr, getattr(child, attr))
                setattr(parent, name, burst.to(child.th1.device))
                swapped += 1
    return swapped
