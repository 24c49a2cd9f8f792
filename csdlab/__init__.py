"""csdlab: spiking transformers by conversion (CSDformer, ECMT).

Importing the package is cheap: ``csdlab.models`` (which registers the ``csdformer_*`` names with
timm) loads on first use, e.g. ``csdlab.models`` or ``from csdlab.models import CSDformer``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

# SpikingJelly 2.0.0 declares torchaudio, which has no build for the torch csdlab pins (2.14), so
# pip cannot resolve it as a requirement of csdlab: it is installed on its own, without its
# requirements (its run-time needs are csdlab's own dependencies). Say so at import, not at the
# first neuron built.
SPIKINGJELLY_INSTALL = "pip install --no-deps spikingjelly==2.0.0"


def _require_spikingjelly() -> None:
    if importlib.util.find_spec("spikingjelly") is None:
        raise ImportError(
            "csdlab needs SpikingJelly 2.0.0, which is not installed. Its declared requirements "
            "(torchaudio) have no build for torch 2.14, so pip does not install it with csdlab: run "
            f"`{SPIKINGJELLY_INSTALL}` (its run-time needs come with csdlab)", name="spikingjelly")


_require_spikingjelly()


def __getattr__(name: str) -> Any:
    # lazy submodules: `csdlab.models` registers the csdformer_* names with timm when first used
    if not name.startswith("_") and importlib.util.find_spec(f"csdlab.{name}") is not None:
        return importlib.import_module(f"csdlab.{name}")
    raise AttributeError(f"module 'csdlab' has no attribute {name!r}")
