"""Ctrl-C stops the whole test session, also inside a Lightning run.

Lightning answers a KeyboardInterrupt during ``fit`` / ``test`` with a graceful shutdown and then
``sys.exit(1)`` (raised while handling the interrupt, so the ``SystemExit``'s context is the
``KeyboardInterrupt``). pytest records a ``SystemExit`` as one failed test and goes on with the
next one, so a Ctrl-C during ``pytest -m slow`` only skipped the test it hit. This plugin turns
that exit back into the end of the session."""

from __future__ import annotations

from collections.abc import Generator

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    outcome = yield
    exc = outcome.excinfo[1] if outcome.excinfo else None
    if isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt):
        pytest.exit(f"interrupted (Ctrl-C) during {item.nodeid}: Lightning shut the run down; "
                    "stopping the session", returncode=2)
