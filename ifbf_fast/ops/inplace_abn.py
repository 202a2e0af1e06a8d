"""InPlace-ABN(-Sync): batch norm with |weight| + eps, bias and an invertible activation, fused.

    y = act( (x - mean) / sqrt(var + eps) * (|weight| + eps) + bias )

mapillary/inplace_abn (Rota Bulo et al., CVPR 2018). In training, ``mean`` and the biased ``var`` are
the batch statistics; with a process group they are those of the union of every rank's batch (ranks may
hold different batch sizes, a rank with no samples still takes part). The running statistics take the
unbiased variance. In evaluation the running statistics are used. Activations: ``ACTIVATIONS`` (the
invertible ones); elu has alpha ``ELU_ALPHA`` (the C++ kernels assume 1), ``slope`` is the leaky_relu
negative slope only.

This module holds, top to bottom: the reference ``inplace_abn_ref`` (the specification: ``F``-level
PyTorch with autograd through the statistics and, via ``torch.distributed.nn.functional``, through the
collectives); the fast path on the C++/CUDA ops of ``ifbf_fast._C`` (csrc/inplace_abn.cpp: their fake
kernels, the synchronised composition, ``inplace_abn_fast``); and the public ``inplace_abn``, routed by
the implementation switch.

Fast path, one process: one op ``ifbf_fast::inplace_abn`` whose autograd is a C++
``torch::autograd::Function`` (forward and backward are one dispatcher call each, 3 CUDA kernels
each: statistics reduce, its combine with the running-statistics update and BatchNorm2d's
``num_batches_tracked`` + 1, the map). With a process group, the primitives
``inplace_abn_{statistics,forward,backward_reduce,backward_dx}`` are composed here with functional
collectives between them (so torch.compile traces them), and ``inplace_abn_running_update`` updates
the running statistics and the counter from the union batch in one kernel.

Numerics at the edges: the statistics are accumulated and kept in float64 (a float32 variance of
values near 1e20, or a float32 sum of bf16 values near 3e38, overflows), so y and every gradient stay
finite wherever the float64 reference does. What cannot be represented: the running_var buffer (float32)
cannot hold a variance above 3.4e38 (std above 1.8e19); it saturates at the largest float32 instead of
becoming inf, and evaluation then normalises by 1.8e19 rather than the true std. A gradient whose
true value is below the smallest normal float (std beyond ~1e38 in bf16) comes out as 0.
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
                   training: bool, momentum: float, eps: float, activation: str, slope: float,
                   num_batches_tracked: Optional[torch.Tensor] = None) -> None:
    """Readable errors for the arguments, shared by the reference and the synchronised fast path (the
    single-process fast op checks the same in C++, csrc/inplace_abn.cpp)."""
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
    t = num_batches_tracked
    if t is not None and (t.numel() != 1 or t.dtype != torch.int64 or t.device != x.device):
        raise ValueError(f"inplace_abn: num_batches_tracked must be a one-element int64 tensor on {x.device} "
                         f"(BatchNorm2d's); got shape {tuple(t.shape)} {t.dtype} on {t.device}")


def apply_activation(y: torch.Tensor, activation: str, slope: float, inplace: bool = False) -> torch.Tensor:
    """The activation by name, the one definition for the package (``ifbf_fast.nn`` re-exports it).

    ``ACTIVATIONS`` (what InPlace-ABN takes: invertible from its output) and ``relu`` (for the plain
    BatchNorm2d baseline and ResNet's activation after the residual add). ``slope`` is the leaky_relu
    negative slope, elu has alpha ``ELU_ALPHA``. ``inplace=True`` overwrites ``y``: autograd then saves
    only the output; use it on a fresh tensor nobody else reads.
    """
    if activation == "leaky_relu":
        return F.leaky_relu(y, slope, inplace=inplace)
    if activation == "elu":
        return F.elu(y, ELU_ALPHA, inplace=inplace)
    if activation == "relu":
        return F.relu(y, inplace=inplace)
    if activation == "identity":
        return y
    raise ValueError(f"unknown activation {activation!r}; expected one of {('relu',) + ACTIVATIONS}")


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


def param_dtype(x: torch.Tensor) -> torch.dtype:
    """The parameter dtype of ``x``: fp32 for fp32/fp16/bf16, fp64 for fp64 (so that gradcheck can use
    the reference). Parameters, running buffers and gradient sums of the fast path are in it (the C++
    rule, csrc/inplace_abn.h), and the reference accumulates in it."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_statistics_ref(x: torch.Tensor, group=None):
    """Mean, biased var (fp32, or fp64 for fp64 x; differentiable) and the count over the union batch.

    Two passes (mean first, then the centred second moment) rather than sum and sum of squares:
    the reference must stay exact where E[x^2] - E[x]^2 would cancel.
    """
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    xf = x.to(param_dtype(x))
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
                    activation: str = "leaky_relu", slope: float = 0.01, group=None,
                    num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference InPlace-ABN(-Sync). Computes in fp32 (fp64 for fp64 ``x``) and returns ``x``'s dtype.

    Updates ``running_mean`` / ``running_var`` in place in training (unbiased variance, as
    ``BatchNorm2d``). ``weight`` / ``bias`` may be ``None`` (affine off: scale 1, shift 0).
    ``num_batches_tracked`` (BatchNorm2d's one-element int64 counter, or None) gets + 1 per training
    call, as ``BatchNorm2d.forward`` does it (``add_(1)``), never in evaluation.
    """
    check_abn_args(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, slope,
                   num_batches_tracked)
    c = x.shape[1]
    shape = [1, c] + [1] * (x.dim() - 2)
    acc = param_dtype(x)
    if training:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
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


# --- the fast path: the C++/CUDA ops of ifbf_fast._C -----------------------------------------------

try:
    from ._ext import _C as _C_module
    from ._ext import abn_unavailable_reason as _unavailable_on
    from ._ext import ops as _C_ops
    _EXT_ERROR: Optional[str] = None
except ImportError as _exc:  # the package was installed without building csrc/
    _C_module, _C_ops, _EXT_ERROR = None, None, f"the C++ extension ifbf_fast._C is not available ({_exc})"


def _like_canonical(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor with the strides the C++ ops give their output (csrc/inplace_abn.h canonical())."""
    nsc = x.dim() >= 3 and x.permute(0, *range(2, x.dim()), 1).is_contiguous()
    if x.is_contiguous() or nsc:
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _per_channel(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((x.shape[1],), dtype=dtype)


if _C_ops is not None:
    from ifbf_fast.utils.launches import register_native_launches

    # CUDA kernels per call of each op (what utils.launches counts for it): a reduction is a partial
    # pass plus a combine (with the per-channel epilogue), an elementwise pass is one kernel. The fused
    # forward in evaluation issues 2 (running stats -> float64 constants, map); 3 is its training count.
    # num_batches_tracked is incremented inside the statistics combine (no launch of its own).
    for _name, _n in (("inplace_abn", 3), ("inplace_abn_backward", 3), ("inplace_abn_statistics", 3),
                      ("inplace_abn_forward", 1), ("inplace_abn_backward_reduce", 2),
                      ("inplace_abn_backward_dx", 1), ("inplace_abn_running_update", 1)):
        register_native_launches(f"ifbf_fast::{_name}", _n)

    # Fake (meta) kernels: torch.compile and torch.library.opcheck see shapes, dtypes and strides.
    @torch.library.register_fake("ifbf_fast::inplace_abn")
    def _inplace_abn_fake(x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
                          activation, slope):
        return _like_canonical(x), _per_channel(x, param_dtype(x))

    @torch.library.register_fake("ifbf_fast::inplace_abn_backward")
    def _inplace_abn_backward_fake(y, dy, invstd, weight, bias, training, param_grads, eps, activation, slope):
        pd = param_dtype(y)
        return _like_canonical(y), _per_channel(y, pd), _per_channel(y, pd)

    @torch.library.register_fake("ifbf_fast::inplace_abn_statistics")
    def _statistics_fake(x):
        return _per_channel(x, torch.float64), _per_channel(x, torch.float64), x.new_empty((1,), dtype=torch.int64)

    @torch.library.register_fake("ifbf_fast::inplace_abn_forward")
    def _forward_fake(x, mean, invstd, weight, bias, eps, activation, slope):
        return _like_canonical(x)

    @torch.library.register_fake("ifbf_fast::inplace_abn_backward_reduce")
    def _backward_reduce_fake(y, dy, weight, bias, eps, activation, slope):
        pd = param_dtype(y)
        return _per_channel(y, pd), _per_channel(y, pd)

    @torch.library.register_fake("ifbf_fast::inplace_abn_backward_dx")
    def _backward_dx_fake(y, dy, invstd, weight, bias, mean_dz, mean_dz_xhat, eps, activation, slope):
        return _like_canonical(y)

    @torch.library.register_fake("ifbf_fast::inplace_abn_running_update")
    def _running_update_fake(mean, var, count, running_mean, running_var, num_batches_tracked, momentum):
        return None

    _FUSED = _C_ops.inplace_abn.default   # the overload itself: one lookup less per call


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol
    gather = getattr(funcol, "all_gather_single", None)   # torch >= 2.14; all_gather_tensor is deprecated there
    if gather is None:
        gather = funcol.all_gather_tensor
    return gather(t, 0, group)


def _sync_batch_statistics(x: torch.Tensor, group, world: int):
    """Mean and biased var (float64) and count (a 1-element float64 tensor) of the union batch.

    Every rank computes (count, mean, var) of its own batch; they are all-gathered and combined with
    Chan's formula (exact for unequal batch sizes; a rank with no samples contributes count 0). Raises
    on every rank alike when the union holds fewer than 2 values per channel.
    """
    mean, var, count = _C_ops.inplace_abn_statistics(x)
    c = x.shape[1]
    local_n = x.numel() // c if c else 0
    packed = torch.cat([count.to(torch.float64), mean, var])
    gathered = _all_gather(packed, group).view(world, 2 * c + 1)
    n_i, mean_i, var_i = gathered[:, :1], gathered[:, 1:c + 1], gathered[:, c + 1:]
    n = n_i.sum(0)
    mean_u = (n_i * mean_i).sum(0) / n
    var_u = ((n_i * var_i).sum(0) + (n_i * (mean_i - mean_u).square()).sum(0)) / n
    # A rank holding >= 2 values knows the union does; only ranks with fewer look at the union count,
    # and since all ranks see the same count, either every rank that checks raises or none does.
    # Under torch.compile the host read would break the graph: the check is eager-only there.
    if local_n < 2 and not torch.compiler.is_compiling():
        total = int(n.item())
        if total < 2:
            raise ValueError(f"inplace_abn: training needs more than 1 value per channel over the group; "
                             f"got {total} (x {tuple(x.shape)} on this rank)")
    return mean_u, var_u, n


class _ABNSyncFunction(torch.autograd.Function):
    """The synchronised InPlace-ABN: y from the union statistics; backward all-reduces the two sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, eps, activation, slope, group):
        y = _C_ops.inplace_abn_forward(x, mean, invstd, weight, bias, eps, activation, slope)
        # y, not x: backward inverts the activation and the affine (the memory saving of InPlace-ABN);
        # invstd (float64 for the forward map's constants) is saved in the parameter dtype.
        ctx.save_for_backward(y, invstd.to(param_dtype(x)), weight, bias, count)
        ctx.cfg = (eps, activation, slope, group)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, invstd, weight, bias, count = ctx.saved_tensors
        eps, activation, slope, group = ctx.cfg
        import torch.distributed._functional_collectives as funcol
        sum_dz, sum_dz_xhat = _C_ops.inplace_abn_backward_reduce(y, dy, weight, bias, eps, activation, slope)
        # Local sums: weight and bias gradients are per rank (DDP all-reduces them).
        gw = sum_dz_xhat * weight.sign() if weight is not None and ctx.needs_input_grad[1] else None
        gb = sum_dz if bias is not None and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            c = invstd.shape[0]
            both = funcol.all_reduce(torch.cat([sum_dz, sum_dz_xhat]), "sum", group) / count.to(sum_dz.dtype)
            dx = _C_ops.inplace_abn_backward_dx(y, dy, invstd, weight, bias, both[:c], both[c:], eps, activation,
                                                slope)
        return dx, gw, gb, None, None, None, None, None, None, None


def _kernel_buffers(rm: torch.Tensor, rv: torch.Tensor, pd: torch.dtype):
    """The running buffers as the C++ ops update them (contiguous, in the parameter dtype ``pd``): the
    tensors themselves (they may be views of one flat buffer), or copies for buffers in another dtype (a
    module cast with .half()) or strided, which :func:`_copy_back` writes back after the update."""
    if rm.dtype == pd and rv.dtype == pd and rm.is_contiguous() and rv.is_contiguous():
        return rm, rv, False
    return rm.to(pd, copy=True).contiguous(), rv.to(pd, copy=True).contiguous(), True


def _copy_back(rm, rv, rm_t, rv_t) -> None:
    with torch.no_grad():
        rm.copy_(rm_t)
        rv.copy_(rv_t.clamp_(max=torch.finfo(rv.dtype).max))


def _inplace_abn_sync(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, activation,
                      slope, group, world):
    mean, var, count = _sync_batch_statistics(x, group, world)
    if running_mean is not None and running_var is not None:
        # One kernel: both lerps with the union's unbiased variance and num_batches_tracked + 1.
        rm, rv, copied = _kernel_buffers(running_mean, running_var, param_dtype(x))
        _C_ops.inplace_abn_running_update(mean, var, count, rm, rv, num_batches_tracked, momentum)
        if copied:
            _copy_back(running_mean, running_var, rm, rv)
    elif num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
    return _ABNSyncFunction.apply(x, weight, bias, mean, torch.rsqrt(var + eps), count, eps, activation, slope,
                                  group)


def inplace_abn_fast(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                     training: bool, momentum: float = 0.1, eps: float = 1e-5,
                     activation: str = "leaky_relu", slope: float = 0.01, group=None,
                     num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InPlace-ABN(-Sync) with the C++/CUDA kernels; same arguments and values as ``inplace_abn_ref``.

    ``x`` (N, C, ...) fp32/fp16/bf16 (fp64 on CPU), NCHW or channels last (other strides are copied
    once); ``weight``/``bias`` (C,) or None; running buffers (C,) updated in place in training with the
    unbiased variance (the tensors themselves: they may be views of one flat buffer), and
    ``num_batches_tracked`` (one int64 element, or None) + 1, inside the kernel that writes the running
    statistics (the op declares it mutated: ``Tensor(c!)?``). ``group``: process group whose union batch
    gives the statistics (None: local). Returns a new tensor y (same layout as x); backward keeps y and
    the per-channel invstd only. The C++ ops check every argument.
    """
    if _C_ops is None:
        raise ImportError(_EXT_ERROR)
    pd = param_dtype(x)
    # Parameters in the kernels' dtype (autograd carries the gradient back through the cast).
    if weight is not None and weight.dtype != pd:
        weight = weight.to(pd)
    if bias is not None and bias.dtype != pd:
        bias = bias.to(pd)
    if training and group is not None:
        world = group_size(group)
        if world > 1:
            check_abn_args(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, slope,
                           num_batches_tracked)
            return _inplace_abn_sync(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                     activation, slope, group, world)
    rm, rv = running_mean, running_var
    if rm is None or rv is None:
        if not training:
            raise ValueError("inplace_abn: evaluation (training=False) needs running_mean and running_var")
        c = x.shape[1] if x.dim() >= 2 else 0
        return _FUSED(x, weight, bias, x.new_empty((c,), dtype=pd), x.new_empty((c,), dtype=pd),
                      num_batches_tracked, training, momentum, eps, activation, slope)[0]
    if rm.dtype == pd and rv.dtype == pd and rm.is_contiguous() and rv.is_contiguous():  # the usual case
        return _FUSED(x, weight, bias, rm, rv, num_batches_tracked, training, momentum, eps, activation, slope)[0]
    rm_t, rv_t, _ = _kernel_buffers(rm, rv, pd)
    y = _FUSED(x, weight, bias, rm_t, rv_t, num_batches_tracked, training, momentum, eps, activation, slope)[0]
    if training:
        _copy_back(rm, rv, rm_t, rv_t)
    return y


# --- the CUDA kernels' launch plans and bytes model (csrc/inplace_abn_plan.h) ------------------------

# The launcher's phases: training statistics (partial pass + combine with the running-statistics update),
# the forward map, the backward reduce (partial pass + combine with dweight / dbias / the batch means),
# the dx map, and the evaluation statistics (running buffers -> float64 constants).
PHASES = ("statistics", "forward_map", "backward_reduce", "backward_map", "eval_statistics")
SM_COUNT_H200 = 132


def _geometry(shape) -> tuple:
    """(N, C, S) of a tensor of ``shape``, S the product of the spatial sizes (csrc/inplace_abn.h)."""
    n, c = shape[0], shape[1]
    s = 1
    for d in shape[2:]:
        s *= d
    return n, c, s


def launch_model(shape, dtype: torch.dtype, channels_last: bool, training: bool = True,
                 sms: int = SM_COUNT_H200, vec: int = 0) -> list:
    """The CUDA launches of one InPlace-ABN forward + backward of an x of ``shape`` and ``dtype``
    (NCHW-contiguous or channels last), as the launchers plan them on a GPU with ``sms`` SMs: one
    dict per launch with the phase's ``name``, the kernel ``kind``, ``grid``, ``block``, vector width
    ``vec`` (elements), ``unroll`` and ``tensors`` (the 16-byte loads in flight per thread are their
    product), ``groups`` (partial states per channel), ``blocks_per_sm`` (what the kernel is compiled
    for), and the DRAM bytes ``read`` / ``written``. ``vec`` 0: the width for 16-byte-aligned tensors.
    Training: 6 launches (statistics 2, forward map, backward reduce 2, dx map); evaluation without
    parameter gradients: 3 (eval statistics, forward map, dx map). Needs ifbf_fast._C (any build)."""
    if _C_module is None:
        raise ImportError(_EXT_ERROR)
    n, c, s = _geometry(shape)
    nsc = channels_last or s == 1
    rows, length = (n * s, 1) if nsc else (n, s)
    elt = torch.empty((), dtype=dtype).element_size()
    phases = (0, 1, 2, 3) if training else (4, 1, 3)
    return [m for p in phases for m in _C_module.abn_launch_model(p, nsc, rows, c, length, elt, vec, sms)]


def min_bytes(shape, dtype: torch.dtype, training: bool = True) -> int:
    """The op's minimum DRAM traffic, forward + backward: training reads x twice (statistics, then the
    map) and writes y, then reads y and dy twice (sums, then dx) and writes dx: 8 x-sizes; evaluation
    reads x, writes y, reads y and dy, writes dx: 5."""
    if _C_module is None:
        raise ImportError(_EXT_ERROR)
    numel = 1
    for d in shape:
        numel *= d
    return _C_module.abn_min_bytes(training, numel, torch.empty((), dtype=dtype).element_size())


def work_in_flight(launch: dict, sms: int = SM_COUNT_H200) -> dict:
    """What one launch keeps a GPU busy with: ``programs`` (blocks), ``waves`` (programs over sms times
    the blocks per SM the kernel is compiled for), ``loads_per_thread`` (independent accesses per
    thread per hot-loop iteration, all tensors: 16 bytes each when vec * element size is 16)."""
    programs = launch["grid"][0] * launch["grid"][1]
    return {"programs": programs, "waves": programs / (sms * launch["blocks_per_sm"]),
            "loads_per_thread": launch["unroll"] * launch["tensors"]}


def _fast_unavailable(x: torch.Tensor) -> Optional[str]:
    return _EXT_ERROR if _C_ops is None else _unavailable_on(x)


def inplace_abn(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                training: bool, momentum: float = 0.1, eps: float = 1e-5,
                activation: str = "leaky_relu", slope: float = 0.01, group=None,
                num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InPlace-ABN(-Sync) through the implementation switch (C++/CUDA extension or the reference).
    ``num_batches_tracked``: BatchNorm2d's counter, + 1 per training call on either path."""
    if choose("inplace_abn", lambda: _fast_unavailable(x)):
        return inplace_abn_fast(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                activation, slope, group, num_batches_tracked)
    return inplace_abn_ref(x, weight, bias, running_mean, running_var, training, momentum, eps,
                           activation, slope, group, num_batches_tracked)
