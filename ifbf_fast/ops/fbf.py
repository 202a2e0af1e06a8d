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

from ._impl import choose, get_impl


def check_fbf_args(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Readable errors for shapes, dtypes and devices, shared by the reference and the fast path.

    Written for host cost (it runs on every call): plain comparisons first, messages only on failure.
    """
    hs, ls = high.shape, low.shape
    if len(hs) != 4 or len(ls) != 4:
        raise ValueError(f"fbf: high and low must be 4-D (N, C, H, W); got high {tuple(hs)}, low {tuple(ls)}")
    if hs[0] != ls[0] or hs[2] != ls[2] or hs[3] != ls[3]:
        raise ValueError(f"fbf: high {tuple(hs)} and low {tuple(ls)} must agree in N, H and W")
    if high.dtype != low.dtype:
        raise ValueError(f"fbf: high ({high.dtype}) and low ({low.dtype}) must have the same dtype")
    c = hs[1] + ls[1]
    wshape = weight.shape
    if not (wshape == (c, c) or wshape == (c, c, 1, 1)):
        raise ValueError(f"fbf: weight must be ({c}, {c}) or ({c}, {c}, 1, 1) for C = {hs[1]} + "
                         f"{ls[1]}; got {tuple(wshape)}")
    if bias.shape != (c,):
        raise ValueError(f"fbf: bias must be ({c},); got {tuple(bias.shape)}")
    # One device: the common cases read flags and indices (a torch.device object per tensor costs more).
    if not ((high.is_cuda and low.is_cuda and weight.is_cuda and bias.is_cuda
             and high.get_device() == low.get_device() == weight.get_device() == bias.get_device())
            or (high.is_cpu and low.is_cpu and weight.is_cpu and bias.is_cpu)):
        device = high.device
        if low.device != device or weight.device != device or bias.device != device:
            devices = {t.device for t in (high, low, weight, bias)}
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


# --- the fast path -----------------------------------------------------------------------------------
#
# Layers (docs/DESIGN.md section 4): Triton kernels (kernels/fbf_jit.py) + launchers (kernels/fbf.py)
# -> two custom ops with fake kernels -> autograd registration -> the public ``fbf``. ``custom_op``
# rather than ``triton_op`` so that torch.compile can also trace it under the Triton interpreter
# (docs/DESIGN.md section 7).
#
# Two routes to the same launchers:
# * eager, on plain tensors: ``_eager_apply``, one C++ autograd node around the launchers. A custom
#   op's Python dispatch (schema binding, the autograd wrapper, the fake-tensor machinery's checks),
#   and even a torch.autograd.Function's own Python, cost more host time than the whole fused op
#   needs (bench/bench_fbf.py, test_fbf_host).
# * under torch.compile, and on tensor subclasses (FakeTensor in the memory account, functional
#   tensors in AOTAutograd): the custom ops ``ifbf_fast::fbf_fwd`` / ``fbf_bwd`` with fake kernels, so
#   the compiled graph holds them with zero graph breaks.
# The kernels module is imported lazily: importing ``ifbf_fast.ops`` neither imports Triton nor fixes the
# interpreter mode (decided when the kernels are first imported).
#
# CPU tensors: the kernels run on them only under the Triton interpreter (TRITON_INTERPRET=1 before the
# kernels were imported). Otherwise ``fbf`` with impl="auto" takes ``fbf_ref``, impl="fast" raises
# FastPathUnavailable, and a direct call of the ops raises RuntimeError naming the reason.

_kernels_module = None


def _kernels():
    # An import statement (a dictionary look-up once imported), not importlib and no read of a cached
    # module global: dynamo traces the statement, while importlib.import_module is a graph break and a
    # global holding a module cannot be guarded, when the op's first call happens under torch.compile.
    global _kernels_module
    from ifbf_fast.kernels import fbf as kernels
    if not torch.compiler.is_compiling():
        _kernels_module = kernels       # for the eager route's forward and backward
    return kernels


def _memory_format_of(t: torch.Tensor) -> torch.memory_format:
    return _kernels().memory_format_of(t)


# flexible_layout: the launchers take any strides (both layouts, views) and give the outputs the layouts
# the fake kernels state, so inductor hands them its own layouts instead of copying to eager's.
@torch.library.custom_op("ifbf_fast::fbf_fwd", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def fbf_fwd(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused FBF forward: ``(out, stats)``; stats (2, N, C) fp32 = [pooled, gate], saved for backward
    (pooled = mean_hw(x), gate = sigmoid(weight @ pooled + bias))."""
    return _kernels().fbf_fwd(high, low, weight, bias)


@fbf_fwd.register_fake
def _fbf_fwd_fake(high, low, weight, bias):
    n, c0, h, w = high.shape
    c = c0 + low.shape[1]
    out = torch.empty((n, c, h, w), dtype=high.dtype, device=high.device, memory_format=_memory_format_of(high))
    return out, high.new_empty((2, n, c), dtype=torch.float32)


@torch.library.custom_op("ifbf_fast::fbf_bwd", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def fbf_bwd(grad_out: torch.Tensor, high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
            stats: torch.Tensor, grad_stats: Optional[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused FBF backward: ``(grad_high, grad_low, grad_weight, grad_bias)``; grad_weight in the weight's
    shape and dtype, grad_bias (C,) in the weight's dtype."""
    return _kernels().fbf_bwd(grad_out, high, low, weight, stats, grad_stats)


@fbf_bwd.register_fake
def _fbf_bwd_fake(grad_out, high, low, weight, stats, grad_stats):
    c = high.shape[1] + low.shape[1]
    grad_high = torch.empty(high.shape, dtype=high.dtype, device=high.device,
                            memory_format=_memory_format_of(high))
    grad_low = torch.empty(low.shape, dtype=low.dtype, device=low.device, memory_format=_memory_format_of(low))
    return grad_high, grad_low, weight.new_empty(weight.shape), weight.new_empty((c,))


def _fbf_setup_context(ctx, inputs, output):
    high, low, weight, bias = inputs
    ctx.save_for_backward(high, low, weight, output[1])
    ctx.bias_dtype = bias.dtype
    # stats is rarely used outside: its gradient stays None instead of a zero-filled tensor.
    ctx.set_materialize_grads(False)


def _fbf_backward(ctx, grad_out, grad_stats):
    high, low, weight, stats = ctx.saved_tensors
    if grad_out is None:  # only stats was used
        n, c0, h, w = high.shape
        grad_out = high.new_zeros((n, c0 + low.shape[1], h, w))
    grad_high, grad_low, grad_weight, grad_bias = fbf_bwd(grad_out, high, low, weight, stats, grad_stats)
    return grad_high, grad_low, grad_weight, grad_bias.to(ctx.bias_dtype)


fbf_fwd.register_autograd(_fbf_backward, setup_context=_fbf_setup_context)


# The eager route: one C++ autograd node (ops/_ext.py launcher_apply, csrc/launcher_node.cpp) around the
# launchers. It keeps high, low, weight and the (2, N, C) stats, and hands the bias dtype and the
# forward's backward plans to the backward launch.

def _node_forward(high, low, weight, bias):
    out, stats, bwd_plans = _kernels_module.fwd(high, low, weight, bias, True)
    return out, (high, low, weight, stats), (bias.dtype, bwd_plans)


def _node_backward(grad_out, high, low, weight, stats, state):
    # Grad mode is on here only under create_graph=True: the kernels' results would carry no graph
    # (a silently wrong second derivative), so refuse, as once_differentiable would, but cheaper.
    if torch.is_grad_enabled():
        raise RuntimeError("ifbf_fast.ops.fbf: the fused kernels have no double backward "
                           "(create_graph=True); use impl='reference' for higher-order gradients")
    return _kernels_module.bwd(grad_out, high, low, weight, stats, None, state[0], state[1])


_launcher_apply = None      # ops._ext.launcher_apply, imported at the first eager call with grad


def _eager_apply(high, low, weight, bias):
    global _launcher_apply
    if _launcher_apply is None:
        from ._ext import launcher_apply   # ImportError names the build command
        _launcher_apply = launcher_apply
    return _launcher_apply("FBFBackward", _node_forward, _node_backward, 4, high, low, weight, bias)


def _fast_unavailable(high: torch.Tensor, low: torch.Tensor) -> str | None:
    # Eager calls after the first take the module the first one imported (no import statement, no
    # is_compiling); under torch.compile the global is not read (see ``_kernels``).
    kernels = None if torch.compiler.is_compiling() else _kernels_module
    if kernels is None:
        try:
            kernels = _kernels()
        except ImportError as exc:
            return f"the Triton FBF kernels are not available ({exc})"
    # The kernels module's own test (not the environment now): whether it was imported under the
    # interpreter decides whether CPU tensors can run.
    return kernels.unsupported_reason(high, low)


def fbf(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """FBF through the implementation switch (the fused Triton kernels or ``fbf_ref``).

    high (N, Ch, H, W), low (N, Cl, H, W) in fp32/fp16/bf16, any layout; weight (C, C) or (C, C, 1, 1);
    bias (C,). Returns (N, Ch + Cl, H, W) in high's dtype and memory format.
    """
    check_fbf_args(high, low, weight, bias)
    # The reference mode does no fast-path work at all (not even the availability probe); choose() only
    # where the fast path cannot run (it raises under impl="fast", takes the reference under "auto").
    if get_impl() == "reference":
        return fbf_ref(high, low, weight, bias)
    reason = _fast_unavailable(high, low)
    if reason is not None and not choose("fbf", reason):
        return fbf_ref(high, low, weight, bias)
    if torch.compiler.is_compiling() or type(high) is not torch.Tensor or type(low) is not torch.Tensor:
        return fbf_fwd(high, low, weight, bias)[0]
    if torch.is_grad_enabled() and (high.requires_grad or low.requires_grad or weight.requires_grad
                                    or bias.requires_grad):
        return _eager_apply(high, low, weight, bias)
    return _kernels_module.fwd(high, low, weight, bias)[0]
