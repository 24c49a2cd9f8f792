"""Progress lines for the long, silent steps of a conversion run: calibration batch by batch, the
conversion itself, and each spiking variant as it simulates a test batch (an MBE batch can take tens
of seconds). Lines go through ``logging`` (above a live rich bar, ``csdlab.cli.CurrentStderrHandler``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

from torch import nn

__all__ = ["Heartbeat"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Heartbeat:
    """Says what a long step is doing.

    Args:
        interval: seconds between two routine lines (:meth:`watch`); a line that would come sooner
            goes to DEBUG. Calibration lines (:meth:`batches`) always show.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.batch = 0  # the test batch being scored (set by the caller)
        self.batches_total: int | None = None
        self._last = float("-inf")  # the first line always shows

    def say(self, msg: str, *args: Any, always: bool = False) -> None:
        now = time.monotonic()
        routine = not always and now - self._last < self.interval
        log.log(logging.DEBUG if routine else logging.INFO, msg, *args)
        if not routine:
            self._last = now

    def batches(self, items: Iterable[T], what: str, total: int) -> Iterator[T]:
        """Yield ``items``, saying ``what: batch i/total`` before each and when they are used up."""
        i = 0
        for i, item in enumerate(items, 1):
            self.say("%s: batch %d/%d", what, i, total, always=True)
            yield item
        self.say("%s: %d batches observed, fixing the constants", what, i, always=True)

    def watch(self, variants: Mapping[str, nn.Module]) -> list[Any]:
        """A forward pre-hook on every variant: ``test batch i/n: simulating <variant>``. Returns
        the hook handles."""
        def hook(name: str) -> Any:
            def fn(module: nn.Module, inputs: Any) -> None:
                total = f"/{self.batches_total}" if self.batches_total else ""
                self.say("test batch %d%s: simulating %s", self.batch + 1, total, name)
            return fn

        return [m.register_forward_pre_hook(hook(v)) for v, m in variants.items()]
