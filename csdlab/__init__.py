"""csdlab: spiking transformers by conversion (CSDformer, ECMT)."""

from csdlab import models  # noqa: F401  registers csdformer_* with timm

__version__ = "0.1.0"
