"""Public fused operations, their plain-PyTorch references and the implementation switch.

Every op has a reference ``<op>_ref`` (the specification) and a public ``<op>`` that takes the fast
path or the reference according to :func:`set_impl`, :func:`use_impl` or ``IFBF_IMPL``
(docs/DESIGN.md section 2).
"""

from ._impl import FastPathUnavailable, IMPLS, get_impl, set_impl, use_impl
from .fbf import fbf, fbf_ref
from .inplace_abn import inplace_abn, inplace_abn_ref
from .ohem_ce import ohem_cross_entropy, ohem_cross_entropy_ref
from .ohem_ce_upsampled import ohem_cross_entropy_upsampled, ohem_cross_entropy_upsampled_ref

__all__ = [
    "IMPLS", "FastPathUnavailable", "get_impl", "set_impl", "use_impl",
    "fbf", "fbf_ref", "ohem_cross_entropy", "ohem_cross_entropy_ref", "ohem_cross_entropy_upsampled",
    "ohem_cross_entropy_upsampled_ref", "inplace_abn", "inplace_abn_ref",
]
