"""csdlab.snn.counting: the fast event counts equal the direct definitions exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csdlab.snn import counting
from csdlab.snn.counting import conv_cover, count_spikes, nonzero_per_row, synaptic_events


def occupancy_events(module: nn.Module, x: Tensor) -> Tensor:
    """The definition: events in each output window (a ones-kernel conv of the mask), x C_out/groups."""
    mask = (x != 0).to(torch.float64)
    if isinstance(module, nn.Linear):
        return mask.flatten(1).sum(1) * module.out_features
    g = module.groups
    ones = torch.ones(g, module.in_channels // g, *module.kernel_size, dtype=torch.float64)
    occ = F.conv2d(mask, ones, None, module.stride, module.padding, module.dilation, g)
    return occ.flatten(1).sum(1) * (module.out_channels // g)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(8, 16, 3, 1, 1), nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(8, 16, (3, 5), (2, 3), (1, 2), dilation=(1, 2)),
    nn.Conv2d(8, 16, 3, 2, 0, groups=2), nn.Conv2d(8, 4, 4, 3, 1), nn.Conv2d(8, 8, 1),
], ids=["3x3", "stride2", "rect-dilated", "groups", "k4s3", "1x1"])
@pytest.mark.parametrize("hw", [(9, 9), (10, 7), (16, 16)])
def test_conv_synaptic_events(conv: nn.Conv2d, hw: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(hw[0] * hw[1])
    x = (torch.rand(6, 8, *hw, generator=g) < 0.3).float() * torch.randn(6, 8, *hw, generator=g)  # non-binary
    assert torch.equal(synaptic_events(conv, x), occupancy_events(conv, x))


def test_conv_cover_counts_windows() -> None:
    cover = conv_cover(nn.Conv2d(1, 1, 3, 1, 1), (4, 4))
    assert cover[0].tolist() == [4.0, 6.0, 6.0, 4.0] and cover[1].tolist() == [6.0, 9.0, 9.0, 6.0]


def test_linear_and_binary_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(5, 7, 33, generator=g) < 0.3).float()
    x[0, 0, 0] = float("nan")  # NaN != 0: an event, as in the definition
    lin = nn.Linear(33, 4)
    assert torch.equal(synaptic_events(lin, x), occupancy_events(lin, x))
    assert nonzero_per_row(x).tolist() == torch.count_nonzero(x.flatten(1), 1).double().tolist()
    spikes = (torch.rand(3, 1000, generator=g) < 0.5).float()
    assert float(count_spikes(spikes)) == float(torch.count_nonzero(spikes))
    # the chunked float32 path (rows longer than the exact-sum limit) gives the same integers
    monkeypatch.setattr(counting, "_CHUNK", 64)
    assert float(count_spikes(spikes)) == float(torch.count_nonzero(spikes))
    assert nonzero_per_row(x).tolist() == torch.count_nonzero(x.flatten(1), 1).double().tolist()


@pytest.mark.parametrize("scratch", [1 << 20, 40])  # 40: rows wider than the scratch buffer, and row blocks
def test_nonzero_per_row_through_the_scratch_buffer(monkeypatch: pytest.MonkeyPatch, scratch: int) -> None:
    monkeypatch.setattr(counting.CountCache, "SCRATCH_ELEMS", scratch)
    g = torch.Generator().manual_seed(1)
    with counting.counting_cache() as cache:
        for shape in [(7, 33), (50, 3, 4), (1, 1), (0, 5)]:
            x = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.4)
            for dtype in (torch.float32, torch.float64, torch.float16):
                y = x.to(dtype)
                assert nonzero_per_row(y).tolist() == torch.count_nonzero(y.flatten(1), 1).double().tolist()
        t = torch.randn(6, 20, generator=g).t()  # non-contiguous
        assert nonzero_per_row(t).tolist() == torch.count_nonzero(t, 1).double().tolist()
        assert cache.scratch or scratch < 40  # the buffer was used
    assert not cache.scratch and not cache.records  # nothing outlives the counting


def test_scratch_buffer_made_under_inference_mode_works_outside() -> None:
    x = torch.tensor([[0.0, 1.0, -2.0], [0.0, 0.0, 3.0]])
    with counting.counting_cache():
        with torch.inference_mode():  # the evaluation (Trainer.test) counts first ...
            assert nonzero_per_row(x).tolist() == [2.0, 1.0]
        with torch.no_grad():  # ... then a training-time callback, outside inference mode
            assert nonzero_per_row(x).tolist() == [2.0, 1.0]
        with torch.inference_mode():
            assert nonzero_per_row(x).tolist() == [2.0, 1.0]


def test_recorded_counts_are_counted_once_and_die_with_the_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, generator=g) * (torch.rand(4, 10, generator=g) < 0.5)
    expected = torch.count_nonzero(x, 1).double().tolist()
    calls = []
    real = counting._count_rows
    monkeypatch.setattr(counting, "_count_rows", lambda t, cache: calls.append(1) or real(t, cache))
    counting.record_nonzero_rows(x)  # not counting: no record is kept
    assert nonzero_per_row(x).tolist() == expected and len(calls) == 1
    with counting.counting_cache() as cache:
        counting.record_nonzero_rows(x)  # computed on the first request, then kept
        assert nonzero_per_row(x).tolist() == expected and nonzero_per_row(x).tolist() == expected
        assert len(calls) == 2
        y = x.clone()  # another tensor (same values): no record, counted directly
        assert nonzero_per_row(y).tolist() == expected and len(calls) == 3
        key = id(x)
        del x
        assert key not in cache.records  # the record went with its tensor


def test_mt_output_counted_once_for_both_counters() -> None:
    """The firing counter (count_events) and the next layer's op counter share one count of a
    multi-step MT output, under inference mode as in Trainer.test."""
    from csdlab.snn.neurons import MTNeuron

    n = MTNeuron(0.3, 0.2, levels=4)
    n.step_mode, n.flat_steps = "m", 3
    lin = nn.Linear(20, 5)
    with torch.inference_mode(), counting.counting_cache() as cache:
        y = n(torch.randn(3 * 2, 20, generator=torch.Generator().manual_seed(3)))
        events, steps = n.count_events((), y)
        assert events.item() == torch.count_nonzero(y).item() > 0 and steps == y.numel()
        assert id(y) in cache.records and cache.records[id(y)][1] is not None
        assert torch.equal(synaptic_events(lin, y), occupancy_events(lin, y))
