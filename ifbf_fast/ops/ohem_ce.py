"""OHEM cross-entropy (paper eq. 5-7 and section 4.3.4; DESIGN section 2).

    loss_i = logsumexp(logits_i) - logits_i[target_i]      for valid pixels (target != ignore_index)
    k      = ceil(keep_ratio * n_valid)
    kept   = the k largest loss_i; with ``thresh``, also every pixel whose probability of its true
             class is below ``thresh`` (loss_i > -log(thresh))
    result = mean of loss over kept; 0.0 (not NaN) with zero gradients when n_valid == 0

The result is an fp32 scalar whatever the logits' dtype. Its value does not depend on how ties at the
k-th largest loss are broken: any k of the tied pixels have the same sum. With ``thresh`` the kept set is
the hard set when it holds at least k pixels (it then contains the k largest), else the k largest.

Fast path (``ohem_cross_entropy_fast``, kernels in ``ifbf_fast.kernels.ohem_ce``): Triton, no host
synchronisation, exact on-device k-th value by radix select, one fp32 per pixel saved for backward,
three device launches for forward and backward. Eager calls go through one C++ autograd node around
the launchers (``make_eager_route``, the lightest path); under ``torch.compile`` and on fake tensors
the same launchers run as custom ops (``ifbf_fast::ohem_ce_fwd`` / ``ohem_ce_bwd``, with fake kernels
and autograd), so the compiled graph keeps the loss in one piece.
Its gradient equals the reference's wherever no tie sits at the k-th largest loss; with a tie, the
tied pixels share the remaining weight equally. A label outside ``[0, C)`` that is not
``ignore_index`` turns the loss and the whole gradient into NaN (``set_label_check(True)`` or
``IFBF_OHEM_CHECK_LABELS=1`` raises the reference's ValueError instead, at the cost of a host sync).

``ohem_cross_entropy_upsampled`` (``ohem_ce_upsampled.py``) takes the head's 1/4-resolution logits and
applies the loss to their bilinear upsampling to the labels' size; its fast path (kernels in
``ifbf_fast.kernels.ohem_ce_upsampled``) interpolates on the fly and never stores the full-size logits.

``ohem_cross_entropy_with_bad_labels`` returns, besides the loss, the number of labels outside
``[0, C)`` that are not ``ignore_index`` as a 0-d fp32 tensor on the device (the fast path counts them
in its kernels, no host read; the reference raises its ValueError instead, so there it is 0).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from ifbf_fast.kernels import SUPPORTED_DTYPES

from ._impl import choose, get_impl, triton_unavailable_reason


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
    ``ignore_index``. Any integer target dtype (the loaders give uint8): widened with ``.long()`` here
    for ``gather``, a copy the fast path does not make. Host-synchronising (``.item()``, ``topk`` of a
    data-dependent size): it is the specification, not the fast path.
    """
    check_ohem_args(logits, target, keep_ratio, thresh, ignore_index)
    c = logits.shape[1]
    target = target.long()
    _raise_on_bad_labels(target, c, ignore_index)
    valid = target != ignore_index
    logp = torch.log_softmax(logits.float(), dim=1)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    loss = -logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)             # (N, H, W) fp32

    n_valid = int(valid.sum())
    kept = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)  # row-major: .view(-1) below
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



# --- the fast path: Triton kernels (kernels/ohem_ce.py) ------------------------------------------
#
# Eager: a C++ autograd node calls the launchers directly (custom_op's Python dispatch, and even a
# torch.autograd.Function's own Python, cost more host time than the kernels' launches). Compiled
# (torch.compiler.is_compiling()) and on fake tensors (FakeTensorMode, the memory account):
# torch.library.custom_op (not triton_op: it does not trace under TRITON_INTERPRET, docs/DESIGN.md
# section 7) with fake kernels and an autograd registration, so that torch.compile(fullgraph=True)
# keeps a loss call in one graph. Both return, besides the loss, the per-pixel fp32 losses (the one
# value per pixel the backward may keep), the small int32 state (counts, the cut and weights) and the
# bad-label count; only the loss is differentiable (no zero gradients are materialised for the others).

_FAST_DTYPES = SUPPORTED_DTYPES
_MAX_CLASSES = 256

# Opt-in eager label check for the fast path: the kernels never read out of bounds for a label
# outside [0, C) (they poison the result and the gradient with NaN and count the bad labels), but
# raising the reference's ValueError needs a host synchronisation, so it is off by default. Turn it
# on with IFBF_OHEM_CHECK_LABELS=1 or set_label_check(True) while debugging a data pipeline (under
# torch.compile it costs a graph break).
# What applies now: set_label_check's value, or (None) the environment variable, read at the first call
# and again after set_label_check(None) (os.environ is a few Python frames per read, on every loss call
# otherwise).
_label_check: Optional[bool] = None


def set_label_check(enabled: Optional[bool]) -> None:
    """Make the fast path raise ValueError on a bad label (a host sync); ``None``: read the env var
    (IFBF_OHEM_CHECK_LABELS) again at the next call."""
    global _label_check
    _label_check = enabled


def _label_check_enabled() -> bool:
    global _label_check
    if _label_check is None:
        _label_check = os.environ.get("IFBF_OHEM_CHECK_LABELS", "0") not in ("", "0")
    return _label_check


def _raise_on_bad_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """The reference's check, also the fast path's opt-in one: ValueError naming the first label outside
    ``[0, num_classes)`` that is not ``ignore_index`` (a host sync)."""
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"ohem_cross_entropy: target holds label {value}, outside [0, {num_classes}) "
                         f"and not ignore_index={ignore_index}")


_KERNELS = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        from ifbf_fast.kernels import ohem_ce
        _KERNELS = ohem_ce
    return _KERNELS


def _fwd_fake_outputs(logits: torch.Tensor, pixel_shape) -> tuple:
    from ifbf_fast.kernels.ohem_ce import STATE_SIZE
    return (logits.new_empty((), dtype=torch.float32), logits.new_empty(pixel_shape, dtype=torch.float32),
            logits.new_empty((STATE_SIZE,), dtype=torch.int32), logits.new_empty((), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    logits, target = inputs[0], inputs[1]
    _, losses, state, _ = output
    ctx.save_for_backward(logits, target, losses, state)


def make_ops(stem: str, kernels, pixel_shape):
    """The custom-op stack of one OHEM variant (this module's and ops/ohem_ce_upsampled.py's):
    ``ifbf_fast::<stem>_fwd`` -> (loss, per-pixel fp32 losses of ``pixel_shape(logits, target)``, state,
    bad-label count; ``thresh < 0`` means no threshold) and ``ifbf_fast::<stem>_bwd`` -> grad_logits
    (the logits' dtype, laid out like ``torch.empty_like(logits)``), both calling the launchers of the
    same names in the module ``kernels()`` returns, with fake kernels and the autograd registration
    (only the loss is differentiable). Returns (fwd_op, bwd_op)."""
    fwd_name, bwd_name = f"{stem}_fwd", f"{stem}_bwd"

    # flexible_layout: the launchers take logits and target in any strides, so inductor passes its own
    # layouts instead of copying them to eager's.
    @torch.library.custom_op(f"ifbf_fast::{fwd_name}", mutates_args=(), tags=(torch.Tag.flexible_layout,))
    def fwd_op(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float, thresh: float,
               ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return getattr(kernels(), fwd_name)(logits, target, keep_ratio, thresh, ignore_index)

    @fwd_op.register_fake
    def _fwd_fake(logits, target, keep_ratio, thresh, ignore_index):
        return _fwd_fake_outputs(logits, pixel_shape(logits, target))

    @torch.library.custom_op(f"ifbf_fast::{bwd_name}", mutates_args=(), tags=(torch.Tag.flexible_layout,))
    def bwd_op(grad: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, losses: torch.Tensor,
               state: torch.Tensor) -> torch.Tensor:
        return getattr(kernels(), bwd_name)(grad, logits, target, losses, state)

    @bwd_op.register_fake
    def _bwd_fake(grad, logits, target, losses, state):
        return torch.empty_like(logits)

    def backward(ctx, grad_loss, grad_losses, grad_state, grad_bad):
        # Only the loss is differentiable; the per-pixel losses, the state and the count are internal.
        logits, target, losses, state = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = bwd_op(grad_loss, logits, target, losses, state)
        return grad_logits, None, None, None, None

    fwd_op.register_autograd(backward, setup_context=_setup_context)
    return fwd_op, bwd_op


# per-pixel losses at the logits' (H, W)
_ohem_ce_fwd_op, _ohem_ce_bwd_op = make_ops("ohem_ce", lambda: _kernels(),
                                            lambda logits, target: (logits.shape[0],) + tuple(logits.shape[2:]))


def make_eager_route(node_name: str, kernels, fwd_name: str, bwd_name: str):
    """The eager route of one OHEM variant: ``apply(logits, target, keep_ratio, thresh, ignore_index)``
    -> (loss, bad-label count), the launchers ``fwd_name`` / ``bwd_name`` of the module ``kernels()``
    returns (looked up at each call, so a test may wrap them) under one C++ autograd node
    (``_C.launcher_apply``, csrc/launcher_node.cpp) named ``node_name``. The node keeps logits, target,
    the per-pixel losses and the state; only the loss is differentiable, and its backward is the one
    backward launch. Python runs the launchers and nothing else: no autograd.Function context, no
    zero gradients for the other outputs."""
    def forward(logits, target, keep_ratio, thresh, ignore_index):
        loss, losses, state, bad = getattr(kernels(), fwd_name)(logits, target, keep_ratio, thresh, ignore_index)
        return (loss, bad), (logits, target, losses, state), None

    def backward(grad_loss, logits, target, losses, state, _):
        return getattr(kernels(), bwd_name)(grad_loss, logits, target, losses, state)

    route = []

    def apply(logits, target, keep_ratio, thresh, ignore_index):
        if not route:
            from ._ext import launcher_apply    # ImportError names the build command
            route.append(launcher_apply)
        return route[0](node_name, forward, backward, 1, logits, target, keep_ratio, thresh, ignore_index)

    return apply


_eager_apply = make_eager_route("OhemCEBackward", lambda: _kernels(), "ohem_ce_fwd", "ohem_ce_bwd")


def _eager(logits: torch.Tensor) -> bool:
    """True where the eager route (``make_eager_route``) runs: eager calls on real tensors."""
    return type(logits) is torch.Tensor and not torch.compiler.is_compiling()


# Argument checks already passed for these (shapes, dtypes, devices, keep_ratio, thresh): a call in a
# training loop repeats the same key, and the checks cost more host time than the launches.
_CHECKED: set = set()


def _check_cached(logits, target, keep_ratio, thresh, ignore_index) -> None:
    key = (logits.shape, target.shape, logits.dtype, target.dtype, logits.device, target.device, keep_ratio, thresh)
    if key not in _CHECKED:
        check_ohem_args(logits, target, keep_ratio, thresh, ignore_index)
        if len(_CHECKED) > 1024:
            _CHECKED.clear()
        _CHECKED.add(key)


def _ohem_fast_with_bad_labels(logits, target, keep_ratio, thresh, ignore_index):
    eager = _eager(logits)
    if eager:
        _check_cached(logits, target, keep_ratio, thresh, ignore_index)
    else:
        check_ohem_args(logits, target, keep_ratio, thresh, ignore_index)
    if _label_check_enabled():
        _raise_on_bad_labels(target, logits.shape[1], ignore_index)
    thresh_arg = -1.0 if thresh is None else float(thresh)
    if eager:
        return _eager_apply(logits, target, float(keep_ratio), thresh_arg, int(ignore_index))
    out = _ohem_ce_fwd_op(logits, target, float(keep_ratio), thresh_arg, int(ignore_index))
    return out[0], out[3]


def ohem_cross_entropy_fast(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float = 0.75,
                            thresh: Optional[float] = None, ignore_index: int = 255) -> torch.Tensor:
    """The fused Triton OHEM cross-entropy (no host synchronisation; see kernels/ohem_ce.py).

    Same value as :func:`ohem_cross_entropy_ref` up to fp32 rounding, ties included. Gradient: the
    reference's wherever no tie sits at the k-th largest loss; with ties, each tied pixel gets the
    fraction ``(k - n_greater) / n_tied`` of a kept pixel's weight. A label outside ``[0, C)`` that
    is not ``ignore_index`` makes the loss and every gradient element NaN (never an out-of-bounds
    read; :func:`ohem_cross_entropy_with_bad_labels` counts them on the device);
    :func:`set_label_check` turns on the reference's ValueError instead (a host sync).
    Targets may be uint8, int32 or int64 (read as they are, no conversion copy).
    """
    return _ohem_fast_with_bad_labels(logits, target, keep_ratio, thresh, ignore_index)[0]


# Fast-path availability by what it depends on (dtype, device type, classes, the interpreter flag for
# CPU tensors): computing the reason string on every call cost more than the launches.
_AVAILABLE: dict = {}


def _fast_unavailable(logits: torch.Tensor) -> str | None:
    if logits.is_cuda:
        key = (logits.dtype, logits.dim() == 4 and logits.shape[1] > _MAX_CLASSES)
    else:   # CPU tensors: the kernels module's import-time interpreter flag decides
        try:
            interpreted = _kernels().INTERPRETER
        except ImportError as exc:
            return f"the Triton OHEM kernel is not available ({exc})"
        key = (logits.dtype, logits.dim() == 4 and logits.shape[1] > _MAX_CLASSES,
               "cpu" if logits.is_cpu else logits.device.type, interpreted)     # no torch.device on CPU
    try:
        return _AVAILABLE[key]
    except KeyError:
        pass
    try:
        kernels = _kernels()
    except ImportError as exc:
        return f"the Triton OHEM kernel is not available ({exc})"
    if logits.dtype not in _FAST_DTYPES:
        reason = f"the Triton OHEM kernel takes fp32/fp16/bf16 logits; got {logits.dtype}"
    elif key[1]:
        reason = f"the Triton OHEM kernel holds at most {_MAX_CLASSES} classes; got {logits.shape[1]}"
    else:
        reason = triton_unavailable_reason(kernels.INTERPRETER, logits)
    _AVAILABLE[key] = reason
    return reason


def _use_fast(op: str, reason_fn, *args) -> bool:
    """The switch, with the availability reason computed only where it is needed (the implementation
    read once: ``choose`` only for the unavailable case, which raises under "fast")."""
    if get_impl() == "reference":
        return False
    reason = reason_fn(*args)
    return True if reason is None else choose(op, reason)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float = 0.75,
                       thresh: Optional[float] = None, ignore_index: int = 255) -> torch.Tensor:
    """OHEM cross-entropy through the implementation switch (fast Triton path or the reference)."""
    if _use_fast("ohem_cross_entropy", _fast_unavailable, logits):
        return _ohem_fast_with_bad_labels(logits, target, keep_ratio, thresh, ignore_index)[0]
    return ohem_cross_entropy_ref(logits, target, keep_ratio, thresh, ignore_index)


def ohem_cross_entropy_with_bad_labels(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float = 0.75,
                                       thresh: Optional[float] = None, ignore_index: int = 255) -> tuple:
    """``(ohem_cross_entropy(...), bad_labels)`` through the switch; ``bad_labels`` is a 0-d fp32 tensor
    on the logits' device: the labels outside ``[0, C)`` that are not ``ignore_index`` (counted by the
    fast kernels without a host read; 0 on the reference path, which raises ValueError on them)."""
    if _use_fast("ohem_cross_entropy", _fast_unavailable, logits):
        return _ohem_fast_with_bad_labels(logits, target, keep_ratio, thresh, ignore_index)
    loss = ohem_cross_entropy_ref(logits, target, keep_ratio, thresh, ignore_index)
    return loss, torch.zeros((), dtype=torch.float32, device=logits.device)
