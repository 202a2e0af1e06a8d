"""FBF, the inter-level feature balanced fusion (paper eq. 2-3 plus the residual; DESIGN section 2).

    x   = cat(high, low, dim=1)
    w   = sigmoid(weight @ mean_hw(x) + bias)          # (N, C)
    out = x * (1 + w[:, :, None, None])

``fbf_ref`` is the specification. ``fbf`` is the public entry point that the model calls; it takes the
fast path or the reference according to ``ifbf_fast.ops.set_impl`` / ``use_impl`` / ``IFBF_IMPL``.
"""

from __future__ import annotations

import torch

from ._impl import choose, triton_unavailable_reason


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


def _fast_unavailable(high: torch.Tensor, low: torch.Tensor) -> str | None:
    try:
        from ifbf_fast.kernels import fbf as _k  # noqa: F401
    except ImportError as exc:
        return f"the Triton FBF kernel is not available ({exc})"
    return triton_unavailable_reason(high, low)


def fbf(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """FBF through the implementation switch (fast Triton path or ``fbf_ref``)."""
    if choose("fbf", _fast_unavailable(high, low)):
        from ifbf_fast.kernels.fbf import fbf_fast  # registered custom op with autograd
        check_fbf_args(high, low, weight, bias)
        return fbf_fast(high, low, weight, bias)
    return fbf_ref(high, low, weight, bias)
