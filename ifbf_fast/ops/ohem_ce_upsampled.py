"""OHEM cross-entropy of bilinearly upsampled logits (the heads' x4 upsampling fused into the loss).

``ohem_cross_entropy_upsampled(logits (N, C, h, w), target (N, H, W))`` is
``ohem_cross_entropy(interpolate(logits, (H, W), bilinear, align_corners=False), target)``. Its fast path
(kernels in ``ifbf_fast.kernels.ohem_ce_upsampled``) interpolates on the fly and never stores the
full-size logits or their gradient: three device launches for forward and backward, the same select
pass as the plain op. Eager calls run through one C++ autograd node (``ohem_ce.make_eager_route``);
compiled calls and fake tensors through the custom ops ``ifbf_fast::ohem_ce_up_fwd`` / ``ohem_ce_up_bwd``
(see ``ohem_ce.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ohem_ce as _oc
from ._impl import get_impl


def ohem_cross_entropy_upsampled_ref(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float = 0.75,
                                     thresh: Optional[float] = None, ignore_index: int = 255) -> torch.Tensor:
    """Reference: ``F.interpolate(logits, target's (H, W), bilinear, align_corners=False)`` then
    :func:`ohem_cross_entropy_ref` (the head's upsampling followed by the loss)."""
    _check_upsampled_args(logits, target)
    up = torch.nn.functional.interpolate(logits, size=tuple(target.shape[-2:]), mode="bilinear",
                                         align_corners=False)
    return _oc.ohem_cross_entropy_ref(up, target, keep_ratio, thresh, ignore_index)


def _check_upsampled_args(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"ohem_cross_entropy_upsampled: logits (N, C, h, w) and target (N, H, W) expected; "
                         f"got {tuple(logits.shape)} and {tuple(target.shape)}")


_KERNELS = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        from ifbf_fast.kernels import ohem_ce_upsampled
        _KERNELS = ohem_ce_upsampled
    return _KERNELS


# the kernels' ohem_ce_up_fwd / ohem_ce_up_bwd; per-pixel losses at the target's (H, W)
_ohem_ce_up_fwd_op, _ohem_ce_up_bwd_op = _oc.make_ops("ohem_ce_up", lambda: _kernels(),
                                                      lambda logits, target: tuple(target.shape))

_eager_apply = _oc.make_eager_route("OhemCEUpsampledBackward", lambda: _kernels(), "ohem_ce_up_fwd",
                                    "ohem_ce_up_bwd")

_CHECKED: set = set()


def _check_fused(logits: torch.Tensor, target: torch.Tensor, keep_ratio, thresh, ignore_index) -> None:
    _check_upsampled_args(logits, target)
    reason = _kernels().upsample_unsupported_reason(tuple(logits.shape[-2:]), tuple(target.shape[-2:]))
    if reason is not None:
        raise ValueError(f"ohem_cross_entropy_upsampled: {reason}")
    h_in, w_in = logits.shape[-2:]
    # The shared checks (dtypes, device, keep_ratio, thresh) on a view of the target at the logits' size.
    _oc.check_ohem_args(logits, target[:, :h_in, :w_in], keep_ratio, thresh, ignore_index)


def _up_fast_with_bad_labels(logits, target, keep_ratio, thresh, ignore_index):
    eager = _oc._eager(logits)
    key = (logits.shape, target.shape, logits.dtype, target.dtype, logits.device, target.device, keep_ratio, thresh)
    if not (eager and key in _CHECKED):
        _check_fused(logits, target, keep_ratio, thresh, ignore_index)
        if eager:
            if len(_CHECKED) > 1024:
                _CHECKED.clear()
            _CHECKED.add(key)
    if _oc._label_check_enabled():
        _oc._raise_on_bad_labels(target, logits.shape[1], ignore_index)
    thresh_arg = -1.0 if thresh is None else float(thresh)
    if eager:
        return _eager_apply(logits, target, float(keep_ratio), thresh_arg, int(ignore_index))
    out = _ohem_ce_up_fwd_op(logits, target, float(keep_ratio), thresh_arg, int(ignore_index))
    return out[0], out[3]


def ohem_cross_entropy_upsampled_fast(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float = 0.75,
                                      thresh: Optional[float] = None, ignore_index: int = 255) -> torch.Tensor:
    """OHEM cross-entropy of the bilinearly upsampled logits, the full-size logits never stored.

    The interpolation is computed in fp32 (the unfused path rounds the upsampled logits to their
    dtype first); ties, gradients and bad labels as in :func:`ohem_cross_entropy_fast`. The gradient
    is bitwise deterministic (each low-resolution element written once, no atomics).
    """
    return _up_fast_with_bad_labels(logits, target, keep_ratio, thresh, ignore_index)[0]


_AVAILABLE: dict = {}


def _fast_upsampled_unavailable(logits: torch.Tensor, target: torch.Tensor) -> str | None:
    reason = _oc._fast_unavailable(logits)
    if reason is None and logits.dim() == 4 and target.dim() == 3:
        key = (logits.shape, target.shape)      # the Size objects as they are: no slicing per call
        try:
            reason = _AVAILABLE[key]
        except KeyError:
            if len(_AVAILABLE) > 1024:
                _AVAILABLE.clear()
            reason = _AVAILABLE[key] = _kernels().upsample_unsupported_reason(tuple(logits.shape[-2:]),
                                                                             tuple(target.shape[-2:]))
    return reason


def _unfused(logits, target, keep_ratio, thresh, ignore_index, with_bad):
    _check_upsampled_args(logits, target)
    up = torch.nn.functional.interpolate(logits, size=tuple(target.shape[-2:]), mode="bilinear",
                                         align_corners=False)
    if with_bad:
        return _oc.ohem_cross_entropy_with_bad_labels(up, target, keep_ratio, thresh, ignore_index)
    return _oc.ohem_cross_entropy(up, target, keep_ratio, thresh, ignore_index)


def ohem_cross_entropy_upsampled(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float = 0.75,
                                 thresh: Optional[float] = None, ignore_index: int = 255) -> torch.Tensor:
    """``ohem_cross_entropy(interpolate(logits, target's size, bilinear), target, ...)`` through the switch.

    "fast"/"auto": the fused kernels where they apply (Triton, an upsampling factor of about 3.5 or more,
    the network's x4). Where they do not, "auto" upsamples with ``F.interpolate`` and calls
    :func:`ohem_cross_entropy`, which still takes the unfused fast OHEM where that can run; "fast" raises
    ``FastPathUnavailable``. "reference": :func:`ohem_cross_entropy_upsampled_ref`.
    """
    if _oc._use_fast("ohem_cross_entropy_upsampled", _fast_upsampled_unavailable, logits, target):
        return _up_fast_with_bad_labels(logits, target, keep_ratio, thresh, ignore_index)[0]
    if get_impl() == "reference":
        return ohem_cross_entropy_upsampled_ref(logits, target, keep_ratio, thresh, ignore_index)
    return _unfused(logits, target, keep_ratio, thresh, ignore_index, False)


def ohem_cross_entropy_upsampled_with_bad_labels(logits: torch.Tensor, target: torch.Tensor,
                                                 keep_ratio: float = 0.75, thresh: Optional[float] = None,
                                                 ignore_index: int = 255) -> tuple:
    """``(ohem_cross_entropy_upsampled(...), bad_labels)``, see ``ohem_ce.ohem_cross_entropy_with_bad_labels``."""
    if _oc._use_fast("ohem_cross_entropy_upsampled", _fast_upsampled_unavailable, logits, target):
        return _up_fast_with_bad_labels(logits, target, keep_ratio, thresh, ignore_index)
    if get_impl() == "reference":
        loss = ohem_cross_entropy_upsampled_ref(logits, target, keep_ratio, thresh, ignore_index)
        return loss, torch.zeros((), dtype=torch.float32, device=logits.device)
    return _unfused(logits, target, keep_ratio, thresh, ignore_index, True)
