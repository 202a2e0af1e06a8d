"""InPlace-ABN(-Sync) on the C++/CUDA primitives of ``ifbf_fast._C`` (csrc/ifbf_ops.cpp).

Layers, as flash-attention exposes a compiled op:

1. the kernels ``torch.ops.ifbf_fast.abn_{statistics,forward,backward_reduce,backward}``, defined with
   ``TORCH_LIBRARY`` in C++; their fake (meta) kernels are registered here, so torch.compile and
   ``torch.library.opcheck`` see shapes, dtypes and strides without running them;
2. ``_ABNFunction``: the autograd composition. Forward writes y and saves y plus the per-channel
   variance (never x); backward rebuilds x-hat from y by inverting the activation and the affine;
3. ``inplace_abn_fast``: batch statistics, their combination across ``group`` with functional
   collectives between the kernels (so torch.compile traces them), running statistics, and the call.

Synchronisation: every rank computes (mean, biased var, count) of its own batch, all-gathers them and
combines them with Chan's formula (exact for unequal batch sizes; a rank with no samples contributes
count 0). Backward all-reduces the two per-channel sums. Per-rank checks all happen before the first
collective, so an error seen by one rank never leaves the others waiting in a collective.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._ext import ops

__all__ = ["inplace_abn_fast"]


# --- fake kernels --------------------------------------------------------------------------------

def _param_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like_canonical(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor with the strides the C++ ops give their output (csrc/ifbf_ops.h canonical())."""
    nsc = x.dim() >= 3 and x.permute(0, *range(2, x.dim()), 1).is_contiguous()
    if x.is_contiguous() or nsc:
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("ifbf_fast::abn_statistics")
def _statistics_fake(x):
    c, pd = x.shape[1], _param_dtype(x)
    return x.new_empty((c,), dtype=pd), x.new_empty((c,), dtype=pd), x.new_empty((1,), dtype=torch.int64)


@torch.library.register_fake("ifbf_fast::abn_forward")
def _forward_fake(x, mean, var, weight, bias, eps, activation, slope):
    return _like_canonical(x)


@torch.library.register_fake("ifbf_fast::abn_backward_reduce")
def _backward_reduce_fake(y, dy, weight, bias, eps, activation, slope):
    c, pd = y.shape[1], _param_dtype(y)
    return y.new_empty((c,), dtype=pd), y.new_empty((c,), dtype=pd)


@torch.library.register_fake("ifbf_fast::abn_backward")
def _backward_fake(y, dy, var, weight, bias, mean_dz, mean_dz_xhat, eps, activation, slope):
    return _like_canonical(y)


# --- synchronisation -----------------------------------------------------------------------------

def _world_size(group) -> int:
    from .inplace_abn import group_size
    return group_size(group)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _batch_statistics(x: torch.Tensor, group, world: int):
    """Mean, biased var (param dtype) and count of the union batch over ``group``.

    The count is a Python int without synchronisation, else a 1-element tensor (the same on all
    ranks). Raises on every rank alike when the union holds fewer than 2 values per channel.
    """
    mean, var, count = ops.abn_statistics(x)
    c = x.shape[1]
    local_n = x.numel() // c if c else 0
    if world == 1:
        if local_n < 2:
            raise ValueError(f"inplace_abn: training needs more than 1 value per channel over the batch; "
                             f"got {local_n} (x {tuple(x.shape)})")
        return mean, var, local_n
    import torch.distributed._functional_collectives as funcol

    # Chan's parallel combination of (count, mean, M2) per rank, in fp64 (C-sized, negligible).
    packed = torch.cat([count.to(torch.float64), mean.to(torch.float64), var.to(torch.float64)])
    gathered = funcol.all_gather_tensor(packed, 0, group).view(world, 2 * c + 1)
    n_i, mean_i, var_i = gathered[:, :1], gathered[:, 1:c + 1], gathered[:, c + 1:]
    n = n_i.sum(0)
    mean_u = (n_i * mean_i).sum(0) / n
    m2 = (n_i * var_i).sum(0) + (n_i * (mean_i - mean_u).square()).sum(0)
    var_u = m2 / n
    # A rank holding >= 2 values knows the union does; only ranks with fewer look at the union count,
    # and since all ranks see the same count, either every rank that checks raises or none does.
    # Under torch.compile the host read would break the graph: the check is eager-only there.
    if local_n < 2 and not _compiling():
        total = int(n.item())
        if total < 2:
            raise ValueError(f"inplace_abn: training needs more than 1 value per channel over the group; "
                             f"got {total} (x {tuple(x.shape)} on this rank)")
    pd = mean.dtype
    return mean_u.to(pd), var_u.to(pd), n.to(pd)


# --- autograd ------------------------------------------------------------------------------------

class _ABNFunction(torch.autograd.Function):
    """y = act((x - mean) * rsqrt(var + eps) * (|w| + eps) + b); mean/var given (batch or running)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, training, eps, activation, slope, group, world):
        y = ops.abn_forward(x, mean, var, weight, bias, eps, activation, slope)
        # y, not x: backward inverts the activation and the affine (the memory saving of InPlace-ABN).
        ctx.save_for_backward(y, var, weight, bias, count if isinstance(count, torch.Tensor) else None)
        ctx.count = None if isinstance(count, torch.Tensor) else count
        ctx.cfg = (training, eps, activation, slope, group, world)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, var, weight, bias, count_t = ctx.saved_tensors
        training, eps, activation, slope, group, world = ctx.cfg
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dx = gw = gb = None
        if (training and need_x) or need_w or need_b:
            sum_dz, sum_dz_xhat = ops.abn_backward_reduce(y, dy, weight, bias, eps, activation, slope)
            # Local sums: weight and bias gradients are per rank (DDP all-reduces them).
            if need_w:
                gw = sum_dz_xhat * weight.sign()
            if need_b:
                gb = sum_dz
        if need_x:
            mean_dz = mean_dz_xhat = None
            if training:
                if world > 1:
                    import torch.distributed._functional_collectives as funcol
                    both = funcol.all_reduce(torch.cat([sum_dz, sum_dz_xhat]), "sum", group)
                    sum_dz, sum_dz_xhat = both[:var.shape[0]], both[var.shape[0]:]
                n = count_t if count_t is not None else ctx.count
                mean_dz, mean_dz_xhat = sum_dz / n, sum_dz_xhat / n
            dx = ops.abn_backward(y, dy, var, weight, bias, mean_dz, mean_dz_xhat, eps, activation, slope)
        return dx, gw, gb, None, None, None, None, None, None, None, None, None


def inplace_abn_fast(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                     training: bool, momentum: float = 0.1, eps: float = 1e-5,
                     activation: str = "leaky_relu", slope: float = 0.01, group=None) -> torch.Tensor:
    """InPlace-ABN(-Sync) with the C++/CUDA kernels; same arguments and values as ``inplace_abn_ref``.

    ``x`` (N, C, ...) fp32/fp16/bf16 (fp64 on CPU), NCHW or channels last (other strides are copied
    once); ``weight``/``bias`` (C,) or None; running buffers (C,) updated in place in training with the
    unbiased variance. ``group``: process group whose union batch gives the statistics (None: local).
    Returns a new tensor y (same layout as x); backward keeps y and the per-channel variance only.
    """
    from .inplace_abn import check_abn_args
    check_abn_args(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, slope)
    pd = _param_dtype(x)
    # Parameters in the kernels' dtype (autograd carries the gradient back through the cast).
    if weight is not None and weight.dtype != pd:
        weight = weight.to(pd)
    if bias is not None and bias.dtype != pd:
        bias = bias.to(pd)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) and not (
            x.dtype == torch.float64 and x.device.type == "cpu"):
        raise TypeError(f"inplace_abn: x must be float32, float16 or bfloat16 (float64 on the CPU); got {x.dtype}")
    world = _world_size(group) if training else 1

    if training:
        mean, var, count = _batch_statistics(x, group, world)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():   # lerp_: one launch per buffer (eager runs are launch-bound at small layers)
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
    else:
        mean, var, count = running_mean.to(pd), running_var.to(pd), 1

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs_grad:
        return ops.abn_forward(x, mean, var, weight, bias, eps, activation, slope)
    return _ABNFunction.apply(x, weight, bias, mean.detach(), var.detach(), count, training, eps, activation,
                              slope, group, world)
