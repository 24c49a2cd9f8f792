"""Lightning callbacks for training: conversion during training, the DDP replica check."""

from csdlab.callbacks.conversion import ConversionCallback
from csdlab.callbacks.replicas import ReplicaConsistency

__all__ = ["ConversionCallback", "ReplicaConsistency"]
