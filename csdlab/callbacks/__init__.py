"""Lightning callbacks: the side jobs around training (checks, conversion, reporting)."""

from csdlab.callbacks.replicas import ReplicaConsistency

__all__ = ["ReplicaConsistency"]
