"""One converter per method (``Converter`` subclasses, registered in ``csdlab.eval.api.CONVERTERS``
by name when their module is imported): CSDformer, ECMT, MBE."""

from csdlab.convert.csdformer import CSDformerConverter
from csdlab.convert.ecmt import ECMTConverter
from csdlab.convert.mbe import MBEConverter

__all__ = ["CSDformerConverter", "ECMTConverter", "MBEConverter"]
