"""Lightning callbacks: the side jobs around training and conversion (checks, conversion, reporting)."""

from csdlab.callbacks.conversion import ConversionCallback
from csdlab.callbacks.replicas import ReplicaConsistency
from csdlab.callbacks.report import ConversionReport

__all__ = ["ConversionCallback", "ConversionReport", "ReplicaConsistency"]
