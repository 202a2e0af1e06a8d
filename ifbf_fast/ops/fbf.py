"""FBF, the inter-level feature balanced fusion (paper eq. 2-3 plus the residual; DESIGN section 2).

    x   = cat(high, low, dim=1)
    w   = sigmoid(weight @ mean_hw(x) + bias)          # (N, C)
    out = x * (1 + w[:, :, None, None])

``fbf_ref`` is the specification. ``fbf`` is the public entry point that the model calls; it takes the
fast path or the reference according to ``ifbf_fast.ops.set_impl`` / ``use_impl`` / ``IFBF_IMPL``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._impl import choose


def check_fbf_args(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Readable errors for shapes, dtypes and devices, shared by the reference and the fast path."""
    if high.dim() != 4 or low.dim() != 4:
        raise ValueError(f"fbf: high and low must be 4-D (N, C, H, W); got high {tuple(high.shape)}, "
                         f"low {tuple(low.shape)}")
    if high.shape[0] != low.shape[0] or high.shape[2:] != low.shape[2:]:
        raise ValueError(f"fbf: high {tuple(high.shape)} and low {tuple(low.shape)} must agree in N, H and W")
    if high.dtype != low.dtype:
        raise ValueError(f"fbf: high ({high.dtype}) and low ({low.dtype}) must have the same dtype")
    c = high.shape[1] + low.shape[1]
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        wshape = tuple(weight.shape[:2])
    else:
        wshape = tuple(weight.shape)
    if wshape != (c, c):
        raise ValueError(f"fbf: weight must be ({c}, {c}) or ({c}, {c}, 1, 1) for C = {high.shape[1]} + "
                         f"{low.shape[1]}; got {tuple(weight.shape)}")
    if tuple(bias.shape) != (c,):
        raise ValueError(f"fbf: bias must be ({c},); got {tuple(bias.shape)}")
    devices = {t.device for t in (high, low, weight, bias)}
    if len(devices) != 1:
        raise ValueError(f"fbf: all tensors must be on one device; got {sorted(map(str, devices))}")


def fbf_ref(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            upcast: bool = True) -> torch.Tensor:
    """Reference FBF in plain PyTorch (autograd gives every gradient).

    With ``upcast`` (default) the pooling, the matrix-vector product and the re-weighting are computed
    in fp32 and the result is cast back to the input dtype, which is what the fast path promises;
    ``upcast=False`` computes in the input dtype, used by the tests to measure how much error the
    low-precision reference itself makes.
    """
    check_fbf_args(high, low, weight, bias)
    x = torch.cat([high, low], dim=1)
    c = x.shape[1]
    compute = torch.float32 if upcast else x.dtype
    xc = x.to(compute)
    w2 = weight.reshape(c, c).to(compute)
    pooled = xc.mean(dim=(2, 3))                                   # (N, C)
    gate = torch.sigmoid(pooled @ w2.t() + bias.to(compute))       # (N, C)
    out = xc * (1.0 + gate[:, :, None, None])
    return out.to(x.dtype)


# --- the fast path: custom ops over the Triton launchers in ifbf_fast.kernels.fbf --------------------
#
# Layers (STYLE.md, flash-attention): Triton kernels + launchers (kernels/fbf.py) -> two custom ops
# with fake kernels -> autograd registration -> the public ``fbf``. ``torch.library.custom_op`` rather
# than ``triton_op`` so that torch.compile can also trace it under the Triton interpreter (GPU.md 5).
# The kernels module is imported lazily, inside the op bodies: importing ``ifbf_fast.ops`` neither
# imports Triton nor fixes the interpreter mode (decided when the kernels are first imported).
#
# CPU tensors: the ops run on them only under the Triton interpreter (TRITON_INTERPRET=1 before the
# kernels were imported). Otherwise ``fbf`` with impl="auto" takes ``fbf_ref``, impl="fast" raises
# FastPathUnavailable, and a direct call of the ops raises RuntimeError naming the reason.

def _memory_format_of(t: torch.Tensor) -> torch.memory_format:
    from ifbf_fast.kernels.fbf import memory_format_of
    return memory_format_of(t)


@torch.library.custom_op("ifbf_fast::fbf_fwd", mutates_args=())
def fbf_fwd(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused FBF forward: ``(out, gate, pooled)``; gate and pooled are (N, C) fp32, saved for backward."""
    from ifbf_fast.kernels.fbf import fbf_forward
    return fbf_forward(high, low, weight, bias)


@fbf_fwd.register_fake
def _fbf_fwd_fake(high, low, weight, bias):
    n, c0, h, w = high.shape
    c = c0 + low.shape[1]
    out = torch.empty((n, c, h, w), dtype=high.dtype, device=high.device, memory_format=_memory_format_of(high))
    gate = high.new_empty((n, c), dtype=torch.float32)
    return out, gate, torch.empty_like(gate)


@torch.library.custom_op("ifbf_fast::fbf_bwd", mutates_args=())
def fbf_bwd(grad_out: torch.Tensor, high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
            gate: torch.Tensor, pooled: torch.Tensor, grad_gate: Optional[torch.Tensor],
            grad_pooled: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused FBF backward: ``(grad_high, grad_low, grad_weight (C, C) fp32, grad_bias (C,) fp32)``."""
    from ifbf_fast.kernels.fbf import fbf_backward
    return fbf_backward(grad_out, high, low, weight, gate, pooled, grad_gate, grad_pooled)


@fbf_bwd.register_fake
def _fbf_bwd_fake(grad_out, high, low, weight, gate, pooled, grad_gate, grad_pooled):
    c = high.shape[1] + low.shape[1]
    grad_high = torch.empty(high.shape, dtype=high.dtype, device=high.device,
                            memory_format=_memory_format_of(high))
    grad_low = torch.empty(low.shape, dtype=low.dtype, device=low.device, memory_format=_memory_format_of(low))
    return grad_high, grad_low, gate.new_empty((c, c)), gate.new_empty((c,))


def _fbf_setup_context(ctx, inputs, output):
    high, low, weight, bias = inputs
    _, gate, pooled = output
    ctx.save_for_backward(high, low, weight, gate, pooled)
    ctx.bias_dtype = bias.dtype


def _fbf_backward(ctx, grad_out, grad_gate, grad_pooled):
    high, low, weight, gate, pooled = ctx.saved_tensors
    if grad_out is None:  # only gate / pooled were used
        n, c0, h, w = high.shape
        grad_out = high.new_zeros((n, c0 + low.shape[1], h, w))
    grad_high, grad_low, grad_weight, grad_bias = fbf_bwd(grad_out, high, low, weight, gate, pooled,
                                                          grad_gate, grad_pooled)
    # The weight may be a conv's (C, C, 1, 1) and fp32 under autocast while x is bf16: each gradient
    # takes its input's shape and dtype.
    return grad_high, grad_low, grad_weight.reshape(weight.shape).to(weight.dtype), grad_bias.to(ctx.bias_dtype)


fbf_fwd.register_autograd(_fbf_backward, setup_context=_fbf_setup_context)


def _fast_unavailable(high: torch.Tensor, low: torch.Tensor) -> str | None:
    try:
        from ifbf_fast.kernels.fbf import unsupported_reason
    except ImportError as exc:
        return f"the Triton FBF kernels are not available ({exc})"
    # The kernels module's own test (not the environment now): whether it was imported under the
    # interpreter decides whether CPU tensors can run.
    return unsupported_reason(high, low)


def fbf(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """FBF through the implementation switch (the fused Triton custom op or ``fbf_ref``).

    high (N, Ch, H, W), low (N, Cl, H, W) in fp32/fp16/bf16, any layout; weight (C, C) or (C, C, 1, 1);
    bias (C,). Returns (N, Ch + Cl, H, W) in high's dtype and memory format.
    """
    check_fbf_args(high, low, weight, bias)
    if choose("fbf", _fast_unavailable(high, low)):
        return fbf_fwd(high, low, weight, bias)[0]
    return fbf_ref(high, low, weight, bias)
