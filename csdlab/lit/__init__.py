"""Lightning pieces: the training module and the data modules."""

from csdlab.lit.data import ImageDataModule
from csdlab.lit.module import ClassificationModule, load_classifier

__all__ = ["ClassificationModule", "ImageDataModule", "load_classifier"]
