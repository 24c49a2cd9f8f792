"""Command-line plumbing shared by the entry points (no maths here)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def _underscore_options(argv: Sequence[str]) -> list[str]:
    # jsonargparse names options after Python parameters (--calib_batches); accept --calib-batches too.
    out = []
    for a in argv:
        if a.startswith("--") and not a.startswith("---"):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def convert_main(argv: Sequence[str] | None = None) -> None:
    """``convert.py {csdformer,ecmt} ...``: subcommands built from the two functions' signatures."""
    from jsonargparse import CLI

    from csdlab.commands.csdformer import csdformer
    from csdlab.commands.ecmt import ecmt

    CLI([csdformer, ecmt], args=_underscore_options(sys.argv[1:] if argv is None else argv))
