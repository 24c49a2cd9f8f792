"""Hand-built parts shared by the evaluation tests: a site that passes its 0/1 input on, and the
``SpikingModel`` methods of a network with one neuron site (``self.site``), no analog layer, run on a
time-flattened ``[T*B, ...]`` batch."""

from __future__ import annotations

from torch import Tensor, nn

from csdlab.eval.api import SpikingModel


class PassSite(nn.Module):
    """Passes a 0/1 tensor on (no spike_units: the evaluation reads the output itself)."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def count_events(self, inputs, output):
        return (output != 0).sum(), output.numel()


class OneSiteModel(SpikingModel):
    """A hand-built network's ``sites`` / ``analog_layers`` / ``time_flattened``: its one site is
    ``self.site``; subclasses set ``time_steps``, ``readout_steps`` and ``forward``."""

    def sites(self):
        return {"site": self.site}

    def analog_layers(self):
        return []

    def time_flattened(self):
        return True
