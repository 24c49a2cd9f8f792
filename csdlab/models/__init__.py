"""Model families; importing this registers their names in timm's registry."""

from csdlab.models.csdformer import CSDformer

__all__ = ["CSDformer"]
