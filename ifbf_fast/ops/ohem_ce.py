"""OHEM cross-entropy (paper eq. 5-7 and section 4.3.4; DESIGN section 2).

    loss_i = logsumexp(logits_i) - logits_i[target_i]      for valid pixels (target != ignore_index)
    k      = ceil(keep_ratio * n_valid)
    kept   = the k largest loss_i; with ``thresh``, also every pixel whose probability of its true
             class is below ``thresh`` (loss_i > -log(thresh))
    result = mean of loss over kept; 0.0 (not NaN) with zero gradients when n_valid == 0

The result is an fp32 scalar whatever the logits' dtype. Its value does not depend on how ties at the
k-th largest loss are broken: any k of the tied pixels have the same sum. With ``thresh`` the kept set is
the hard set when it holds at least k pixels (it then contains the k largest), else the k largest.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._impl import choose, triton_unavailable_reason


def check_ohem_args(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float,
                    thresh: Optional[float], ignore_index: int) -> None:
    """Readable errors for the arguments, shared by the reference and the fast path."""
    if logits.dim() != 4:
        raise ValueError(f"ohem_cross_entropy: logits must be (N, C, H, W); got {tuple(logits.shape)}")
    if target.dim() != 3:
        raise ValueError(f"ohem_cross_entropy: target must be (N, H, W); got {tuple(target.shape)}")
    n, _, h, w = logits.shape
    if tuple(target.shape) != (n, h, w):
        raise ValueError(f"ohem_cross_entropy: target {tuple(target.shape)} does not match logits "
                         f"{tuple(logits.shape)} (expected ({n}, {h}, {w}))")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"ohem_cross_entropy: target must hold integer class ids; got {target.dtype}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"ohem_cross_entropy: logits must be floating point; got {logits.dtype}")
    if target.device != logits.device:
        raise ValueError(f"ohem_cross_entropy: target is on {target.device}, logits on {logits.device}")
    if not (0.0 < float(keep_ratio) <= 1.0):
        raise ValueError(f"ohem_cross_entropy: keep_ratio must be in (0, 1]; got {keep_ratio}")
    if thresh is not None and not (0.0 < float(thresh) <= 1.0):
        raise ValueError(f"ohem_cross_entropy: thresh must be in (0, 1] or None; got {thresh}")


def num_kept(n_valid: int, keep_ratio: float) -> int:
    """k = ceil(keep_ratio * n_valid), computed in float64 as both paths must agree on it."""
    return int(math.ceil(float(keep_ratio) * n_valid))


def ohem_cross_entropy_ref(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float = 0.75,
                           thresh: Optional[float] = None, ignore_index: int = 255) -> torch.Tensor:
    """Reference OHEM cross-entropy: per-pixel CE in fp32, a ``topk`` of the valid losses, the mean.

    Raises ``ValueError`` naming the value when a label is outside ``[0, C)`` and is not
    ``ignore_index``. Host-synchronising (``.item()``, ``topk`` of a data-dependent size): it is the
    specification, not the fast path.
    """
    check_ohem_args(logits, target, keep_ratio, thresh, ignore_index)
    c = logits.shape[1]
    target = target.long()
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= c))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"ohem_cross_entropy: target holds label {value}, outside [0, {c}) and not "
                         f"ignore_index={ignore_index}")
    logp = torch.log_softmax(logits.float(), dim=1)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    loss = -logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)             # (N, H, W) fp32

    n_valid = int(valid.sum())
    kept = torch.zeros_like(valid)
    if n_valid > 0:
        k = num_kept(n_valid, keep_ratio)
        flat_valid = valid.flatten().nonzero().squeeze(1)
        top = loss.detach().flatten()[flat_valid].topk(k).indices
        kept.view(-1)[flat_valid[top]] = True
        if thresh is not None:
            kept |= valid & (loss.detach() > -math.log(float(thresh)))
    # torch.where (not a multiply) so that dropped or ignored pixels contribute exactly zero gradient.
    total = torch.where(kept, loss, torch.zeros_like(loss)).sum()
    return total / kept.sum().clamp_min(1).to(total.dtype)


def _fast_unavailable(logits: torch.Tensor) -> str | None:
    try:
        from ifbf_fast.kernels import ohem_ce as _k  # noqa: F401
    except ImportError as exc:
        return f"the Triton OHEM kernel is not available ({exc})"
    return triton_unavailable_reason(logits)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float = 0.75,
                       thresh: Optional[float] = None, ignore_index: int = 255) -> torch.Tensor:
    """OHEM cross-entropy through the implementation switch (fast Triton path or the reference)."""
    if choose("ohem_cross_entropy", _fast_unavailable(logits)):
        from ifbf_fast.kernels.ohem_ce import ohem_cross_entropy_fast
        check_ohem_args(logits, target, keep_ratio, thresh, ignore_index)
        return ohem_cross_entropy_fast(logits, target, keep_ratio, thresh, ignore_index)
    return ohem_cross_entropy_ref(logits, target, keep_ratio, thresh, ignore_index)
