"""The one conversion-evaluation path shared by every converter (CSDformer, ECMT, MBE).

A converter supplies :class:`Converter` / :class:`SpikingModel` (``csdlab/eval/api.py``);
:class:`ConversionEvaluation` (a LightningModule run by ``Trainer.test``) and
:class:`ConversionData` do the rest, :class:`csdlab.eval.report.ConversionReport` writes the output;
:class:`csdlab.cli.ConvertCLI` (``convert.py``) wires them.
"""

from csdlab.eval.api import Converter, SpikingModel
from csdlab.eval.data import ConversionData
from csdlab.eval.metrics import ConversionMetrics
from csdlab.eval.module import ConversionEvaluation

__all__ = ["Converter", "SpikingModel", "ConversionData", "ConversionMetrics", "ConversionEvaluation"]
