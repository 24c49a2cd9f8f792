"""The one time-flattening reshape (csdlab/snn/timeflat.py), in both its forms: the wrapper of a
multi-step module (CSDformer) and the base of ECMT's modules, against ``[T, B, ...]`` runs."""

from __future__ import annotations

import torch
from spikingjelly.activation_based import functional

from csdlab.snn.neurons import DelayedIFNode, MTNeuron
from csdlab.snn.timeflat import TimeFlattened, call_flat, repeat_steps, unflatten_steps


def test_flatten_helpers_are_step_major() -> None:
    x = torch.arange(6.0).view(2, 3)
    flat = repeat_steps(x, 4)
    assert flat.shape == (8, 3) and torch.equal(unflatten_steps(flat, 4), x.expand(4, 2, 3))
    assert torch.equal(call_flat(lambda s: s.cumsum(0), 4, flat), x.expand(4, 2, 3).cumsum(0).flatten(0, 1))


def test_wrapper_equals_the_multi_step_module() -> None:
    torch.manual_seed(0)
    seq = torch.rand(4, 3, 5)  # [T, B, ...]
    ref = DelayedIFNode(0.5, delay=3)
    ref.step_mode = "m"
    wrapped = TimeFlattened(DelayedIFNode(0.5, delay=3), 4)
    wrapped.module.step_mode = "m"
    assert torch.equal(wrapped(seq.flatten(0, 1)), ref(seq).flatten(0, 1))


def test_base_flattens_only_when_told() -> None:
    torch.manual_seed(0)
    seq = torch.randn(5, 2, 7)
    ref, flat = MTNeuron(0.3, 0.2, levels=4), MTNeuron(0.3, 0.2, levels=4)
    for m in (ref, flat):
        m.step_mode = "m"
    flat.flat_steps = 5
    out = flat(seq.flatten(0, 1))
    assert out.shape == (10, 7) and torch.equal(out, ref(seq).flatten(0, 1))
    assert flat.steps_per_call(seq.flatten(0, 1)) == 5 and ref.steps_per_call(seq) == 5
    functional.reset_net(flat)
    flat.step_mode = "s"
    assert flat.steps_per_call(seq[0]) == 1
