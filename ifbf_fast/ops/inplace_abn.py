"""InPlace-ABN(-Sync): batch norm with |weight| + eps, bias and an invertible activation, fused.

    y = act( (x - mean) / sqrt(var + eps) * (|weight| + eps) + bias )

DESIGN section 2 and mapillary/inplace_abn (Rota Bulo et al., CVPR 2018). In training, ``mean`` and the
biased ``var`` are the batch statistics; with a process group they are those of the union of every
rank's batch (ranks may hold different batch sizes, a rank with no samples still takes part). The
running statistics take the unbiased variance. In evaluation the running statistics are used.

``inplace_abn_ref`` is the specification: ``F``-level PyTorch with autograd through the statistics
(and through the collectives, via ``torch.distributed.nn.functional``). ``inplace_abn`` is the public
entry point, routed by the implementation switch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._impl import choose

ACTIVATIONS = ("leaky_relu", "elu", "identity")
ELU_ALPHA = 1.0  # elu uses the standard alpha; ``slope`` is the leaky_relu negative slope only


def check_abn_args(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                   training: bool, momentum: float, eps: float, activation: str, slope: float) -> None:
    """Readable errors for the arguments, shared by the reference and the fast path."""
    if x.dim() < 2:
        raise ValueError(f"inplace_abn: x must be (N, C, ...) with at least 2 dimensions; got {tuple(x.shape)}")
    c = x.shape[1]
    if not x.dtype.is_floating_point:
        raise ValueError(f"inplace_abn: x must be floating point; got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if tuple(t.shape) != (c,):
            raise ValueError(f"inplace_abn: {name} must have shape ({c},) to match x {tuple(x.shape)}; "
                             f"got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"inplace_abn: {name} is on {t.device} but x is on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"inplace_abn: activation must be one of {ACTIVATIONS}; got {activation!r} "
                         f"(the activation has to be invertible: plain relu is not)")
    if activation == "leaky_relu" and not slope > 0:
        raise ValueError(f"inplace_abn: leaky_relu slope must be > 0 to be invertible; got {slope}")
    if not eps > 0:
        raise ValueError(f"inplace_abn: eps must be > 0; got {eps}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("inplace_abn: evaluation (training=False) needs running_mean and running_var")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"inplace_abn: momentum must be in [0, 1]; got {momentum}")


def apply_activation(y: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    if activation == "leaky_relu":
        return F.leaky_relu(y, slope)
    if activation == "elu":
        return F.elu(y, ELU_ALPHA)
    return y


def group_size(group) -> int:
    """World size of ``group`` (``None`` means no synchronisation: 1)."""
    if group is None:
        return 1
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _sync_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-reduce (sum) over ``group``: its backward all-reduces the gradient.

    ``torch.distributed.nn.functional`` is deprecated in favour of functional collectives, but it is
    the one with autograd support on every torch this project supports; the reference is eager-only.
    """
    import warnings
    from torch.distributed.nn.functional import all_reduce
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t, group=group)


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs; fp64 for fp64 inputs (so that gradcheck can use the reference)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_statistics_ref(x: torch.Tensor, group=None):
    """Mean, biased var (fp32, or fp64 for fp64 x; differentiable) and the count over the union batch.

    Two passes (mean first, then the centred second moment) rather than sum and sum of squares:
    the reference must stay exact where E[x^2] - E[x]^2 would cancel.
    """
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    xf = x.to(accumulation_dtype(x))
    local_count = x.numel() // c if c else 0
    sync = group_size(group) > 1
    count = torch.tensor([local_count], dtype=torch.int64, device=x.device)
    if sync:
        import torch.distributed as dist
        dist.all_reduce(count, group=group)
    n = int(count.item())
    if n < 2:
        raise ValueError(f"inplace_abn: training needs more than 1 value per channel over the "
                         f"{'group' if sync else 'batch'}; got {n} (x {tuple(x.shape)})")
    s = xf.sum(dims)
    if sync:
        s = _sync_sum(s, group)
    mean = s / n
    shape = [1, c] + [1] * (x.dim() - 2)
    m2 = (xf - mean.view(shape)).pow(2).sum(dims)
    if sync:
        m2 = _sync_sum(m2, group)
    var = m2 / n
    return mean, var, n


def inplace_abn_ref(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                    training: bool, momentum: float = 0.1, eps: float = 1e-5,
                    activation: str = "leaky_relu", slope: float = 0.01, group=None) -> torch.Tensor:
    """Reference InPlace-ABN(-Sync). Computes in fp32 (fp64 for fp64 ``x``) and returns ``x``'s dtype.

    Updates ``running_mean`` / ``running_var`` in place in training (unbiased variance, as
    ``BatchNorm2d``). ``weight`` / ``bias`` may be ``None`` (affine off: scale 1, shift 0).
    """
    check_abn_args(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, slope)
    c = x.shape[1]
    shape = [1, c] + [1] * (x.dim() - 2)
    acc = accumulation_dtype(x)
    if training:
        mean, var, n = batch_statistics_ref(x, group)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
                unbiased = var.detach() * (n / (n - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * (weight.to(acc).abs() + eps)
    y = (x.to(acc) - mean.view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    return apply_activation(y, activation, slope).to(x.dtype)


def _fast_unavailable(x: torch.Tensor) -> str | None:
    try:
        from ifbf_fast.ops import _ext
    except ImportError as exc:
        return f"the C++ extension ifbf_fast._C is not available ({exc})"
    return _ext.abn_unavailable_reason(x)


def inplace_abn(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                training: bool, momentum: float = 0.1, eps: float = 1e-5,
                activation: str = "leaky_relu", slope: float = 0.01, group=None) -> torch.Tensor:
    """InPlace-ABN(-Sync) through the implementation switch (C++/CUDA extension or the reference)."""
    if choose("inplace_abn", _fast_unavailable(x)):
        from ifbf_fast.ops._abn_fast import inplace_abn_fast   # checks its arguments itself
        return inplace_abn_fast(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                activation, slope, group)
    return inplace_abn_ref(x, weight, bias, running_mean, running_var, training, momentum, eps,
                           activation, slope, group)
