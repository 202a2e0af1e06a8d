"""Modules: norm-activation layers and their factory, the FBF module, the losses.

Every module calls the public ops of ``ifbf_fast.ops`` (never a kernel), so the implementation switch
(``ifbf_fast.ops.set_impl`` / ``use_impl`` / ``IFBF_IMPL``) chooses the fast path or the reference.
"""

from .abn import (ABN, ABN_ACTIVATIONS, BN_ACTIVATIONS, NORM_ACT_KINDS, BatchNormAct2d, InPlaceABN,
                  InPlaceABNSync, NormAct, activation_fn, norm_act)
from .fbf import FBF
from .loss import IFBFLoss, OHEMCrossEntropy

__all__ = [
    "ABN", "InPlaceABN", "InPlaceABNSync", "BatchNormAct2d", "NormAct", "norm_act", "activation_fn",
    "ABN_ACTIVATIONS", "BN_ACTIVATIONS", "NORM_ACT_KINDS", "FBF", "OHEMCrossEntropy", "IFBFLoss",
]
