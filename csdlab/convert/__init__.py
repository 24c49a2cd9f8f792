"""One converter per method (``Converter`` subclasses, registered in ``csdlab.eval.api.CONVERTERS``
by name when their module is imported): CSDformer, ECMT (and its burst-neuron variant), MBE, and
SpikingJelly's STA recipe."""

from csdlab.convert.csdformer import CSDformerConverter
from csdlab.convert.ecmt import ECMTConverter
from csdlab.convert.ecmt_burst import ECMTBurstConverter
from csdlab.convert.mbe import MBEConverter
from csdlab.convert.sta import STAConverter

__all__ = ["CSDformerConverter", "ECMTConverter", "ECMTBurstConverter", "MBEConverter", "STAConverter"]
