from csdlab.quant.lsq import ACTIVATIONS, ActQuantizer, LSQQuantizer, QCFSQuantizer, make_activation

__all__ = ["ACTIVATIONS", "ActQuantizer", "LSQQuantizer", "QCFSQuantizer", "make_activation"]
