"""Host launchers of the FBF Triton kernels (``fbf_jit.py``): launch plans, the bytes model, ``fbf_fwd``/``fbf_bwd``.

Per call the host does only this: one dict lookup of a cached plan (grid, block configuration and the
scalar arguments, keyed by shapes, strides, dtype and device), the output allocations and two launches.
The plan is computed once per key (``_plan_fwd`` / ``_plan_bwd``), which is also what the tests and the
bytes model read, so that the launch configuration at the network's shapes can be checked on the CPU
without running anything (``plan_fwd``/``plan_bwd`` accept meta tensors).

Launches per direction (see ``fbf_jit.py``): forward reduce + scale, backward reduce + scale, no torch
op in between; the gate, the chain rule and the parameter gradients are kernel epilogues. The counter the
reduce epilogues use, and the fp32 scratch for partial sums, dz and shift, are persistent buffers per
device, stream and thread (``_workspace``); every launch leaves the counter zeroed again.

Block configurations (2048 elements per block): the reduce keeps 4 independent 16-byte loads in flight
per thread in its hot loop (4 warps for fp32, 2 for fp16/bf16); the scale runs 4 warps and many waves.
See ``work_in_flight``.
"""

from __future__ import annotations

import os
import threading
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from . import SUPPORTED_DTYPES, cdiv as _cdiv
from ._launch import PlannedLaunch
from .fbf_jit import (_fbf_reduce_kernel, _fbf_scale_kernel, _chain_epilogue, _gate_epilogue,  # noqa: F401
                      _param_grads, _reduce_part, _reduce_row, _scale_part, _scale_rows)

# Recorded at import because @triton.jit decides at decoration time whether it builds interpreter
# objects (CPU tensors) or compiled kernels (CUDA tensors).
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# (BLOCK_C, BLOCK_HW): 2048 elements per block; num_warps from the dtype (``_num_warps``).
# ROWS: every tensor of the launch is NCHW-dense per sample (strides (*, H*W, W, 1)) and H*W >= 2048:
#   1-D blocks over each sample's (C_part * H * W) run, aligned to 16 elements whatever H*W is, so that
#   loads and stores vectorise even when rows do not start 16-byte aligned (219 x 219 = 47961 is odd).
# HW_MAJOR: hw contiguous and long, but channels not dense (e.g. every other channel).
# C_MAJOR: c contiguous (channels_last), or hw short, or a generic view.
ROWS = (1, 2048)
HW_MAJOR = (4, 512)
C_MAJOR = (64, 32)
BLOCK_CONFIGS = {"rows": ROWS, "hw_major": HW_MAJOR, "c_major": C_MAJOR}
LOADS_IN_FLIGHT = 4              # 16-byte loads per thread per hot-loop iteration and tensor
EPILOGUE_TILE = (16, 64)         # (BLOCK_O, BLOCK_K) of the (C, C) epilogues
BLOCK_GW = 256                   # grad_weight columns per step in the backward scale
REDUCE_PROGRAMS_PER_SM = 16      # the reduce splits hw until it has this many programs per SM
SM_COUNT_H200 = 132
SCALE_WARPS = 4


def _num_warps(elt: int) -> int:
    """Warps for 2048-element blocks so that each thread holds LOADS_IN_FLIGHT 16-byte vectors: 4 for
    fp32, 2 for fp16/bf16."""
    return max(1, 2048 * elt // (16 * LOADS_IN_FLIGHT * 32))


# ------------------------------------------------------------------------------------------------
# Layout helpers
# ------------------------------------------------------------------------------------------------

def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
           memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The launchers' allocations that need a dtype or device argument; the per-call outputs of the common
    case come from ``Tensor.new_empty_strided`` / ``torch.empty_like`` (cheaper to dispatch). Tests poison
    all of them with NaN (deterministic ``fill_uninitialized_memory``, tests/ops/_compare.py)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """``empty_like`` of a dense tensor: same strides, and half the host cost of ``torch.empty``."""
    return torch.empty_like(t)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last when ``t``'s channels are innermost (also for sliced channels_last views), else NCHW.

    Shared with the fake kernels in ``ifbf_fast.ops.fbf`` so that fake and real outputs have one layout.
    """
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if t.stride(1) < t.stride(3) else torch.contiguous_format


def unsupported_reason(*tensors: torch.Tensor) -> Optional[str]:
    """Why these kernels cannot run on ``tensors`` here, or ``None``.

    CPU tensors run only under the interpreter (``TRITON_INTERPRET=1`` when this module was imported);
    without it the launchers raise rather than let Triton fail on a host pointer.
    """
    for t in tensors:
        if t.is_cuda or (INTERPRETER and t.is_cpu):     # flags: t.device builds an object per call
            continue
        return (f"the Triton FBF kernels run on CUDA tensors, or on CPU tensors only when TRITON_INTERPRET=1 "
                f"was set before ifbf_fast.kernels.fbf was imported; got a tensor on {t.device}")
    for t in tensors[:2]:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"the Triton FBF kernels take float32, float16 or bfloat16 inputs; got {t.dtype}"
    return None


def _flat_hw(t: torch.Tensor) -> bool:
    _, _, h, w = t.shape
    return h == 1 or w == 1 or t.stride(2) == w * t.stride(3)


def _strides(t: torch.Tensor, flat: bool) -> Tuple[int, int, int, int]:
    """(n, c, h, w) strides; with ``flat`` the w slot holds the collapsed hw stride."""
    sn, sc, sh, sw = t.stride()
    if not flat:
        return sn, sc, sh, sw
    _, _, h, w = t.shape
    if h * w == 1:
        return sn, sc, 0, 1
    return sn, sc, 0, (sh if w == 1 else sw)


def _dense_rows(t: torch.Tensor) -> bool:
    _, c, h, w = t.shape
    return t.stride(3) == 1 and t.stride(2) == w and t.stride(1) == h * w


def _pick_blocks(tensors: Sequence[torch.Tensor], flat: bool, hw: int) -> Tuple[str, Tuple[int, int]]:
    """(path, (BLOCK_C, BLOCK_HW)): "rows" for NCHW-dense long rows, "hw_major" when hw is contiguous and
    long, "c_major" otherwise (channels_last, short hw, generic views)."""
    if hw >= ROWS[1] and all(_dense_rows(t) for t in tensors):
        return "rows", ROWS
    if flat and hw >= HW_MAJOR[1] and all(_strides(t, True)[3] == 1 for t in tensors):
        return "hw_major", HW_MAJOR
    return "c_major", C_MAJOR


_SM_COUNT: Dict[int, int] = {}


def _target_programs(device_index: int) -> int:
    """Programs the reduce aims at: REDUCE_PROGRAMS_PER_SM per SM on a GPU, 8 under the interpreter
    (it runs programs one by one: few, but more than one split)."""
    if device_index < 0:
        return 8
    if device_index not in _SM_COUNT:
        _SM_COUNT[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return REDUCE_PROGRAMS_PER_SM * _SM_COUNT[device_index]


_WORKSPACES: Dict[tuple, list] = {}

# The current CUDA stream as its integer handle, without a torch.cuda.Stream object per call (the
# function Triton's own driver reads the stream with); the public call where torch lacks it.
try:
    from torch._C import _cuda_getCurrentRawStream as _current_raw_stream
except ImportError:     # a torch without CUDA
    def _current_raw_stream(device_index: int) -> int:
        return torch.cuda.current_stream(device_index).cuda_stream


def _workspace(like: torch.Tensor, device_index: int, counts: int, floats: int) -> list:
    """``[counter, scratch]`` of ``like``'s device (index ``device_index``, -1 for the CPU), the current
    stream and thread: a zeroed int32 counter of at least ``counts`` for the reduce's last-program count,
    and an fp32 scratch of at least ``floats`` (the reduce's partial sums, the backward's dz and shift).

    Both are allocated once and grown when needed. Every launch leaves the counter zeroed again (the
    last program of each sample resets its entry), so it needs no fill per call. The scratch is only
    read by the launch that writes it or by the next launch of the same call, on the same stream: one
    per stream and thread, because two reduces running at once must not share counts or sums. A hit
    reads two integers and a dict; ``like.device`` (an object per call) only where it allocates.
    """
    stream = _current_raw_stream(device_index) if device_index >= 0 else 0
    key = (device_index, stream, threading.get_ident())
    ws = _WORKSPACES.get(key)
    if ws is not None and ws[0].numel() >= counts and ws[1].numel() >= floats:
        return ws
    device = like.device
    if ws is None:
        ws = _WORKSPACES[key] = [torch.zeros(64, dtype=torch.int32, device=device),
                                 _empty((1024,), torch.float32, device)]
    if ws[0].numel() < counts:
        ws[0] = torch.zeros(max(counts, 2 * ws[0].numel()), dtype=torch.int32, device=device)
    if ws[1].numel() < floats:
        ws[1] = _empty((max(floats, 2 * ws[1].numel()),), torch.float32, device)
    return ws


# ------------------------------------------------------------------------------------------------
# Launch plans
# ------------------------------------------------------------------------------------------------

class Launch(NamedTuple):
    """One kernel launch as planned: ``args`` the scalar and constexpr arguments after the pointers, in
    signature order (positional: binding keywords costs host time). The launchers call ``fast[0]``
    (``fast[1]`` with ``args_alt``), a ``_launch.PlannedLaunch`` (the kernel and its grid) that binds
    Triton's arguments once per plan and pointer properties instead of on every call."""

    name: str            # "reduce" or "scale"
    backward: bool
    path: str            # "rows", "hw_major" or "c_major"
    flat: bool
    grid: int
    num_warps: int
    splits: int          # hw splits of the reduce (1 for the scale)
    block: Tuple[int, int]
    args: tuple
    args_alt: tuple      # the reduce with HAS_GRAD_STATS (the backward when stats were used)
    fast: tuple          # (PlannedLaunch for args, PlannedLaunch for args_alt)


class Plan(NamedTuple):
    n: int
    c0: int
    c1: int
    h: int
    w: int
    elt: int
    reduce: Optional[Launch]     # None when N * C * H * W == 0 (torch computes the degenerate case)
    scale: Optional[Launch]
    formats: tuple               # memory formats: forward (out,), backward (grad_high, grad_low)
    like: tuple                  # backward: grad_high / grad_low / grad_weight may be empty_like(input)
    scratch: int                 # fp32 scratch floats the reduce needs
    # (shape, strides) of the per-call outputs, allocated with ``Tensor.new_empty_strided`` (no dtype,
    # device or memory-format arguments to parse: about half the host cost of ``torch.empty``):
    # forward: out (like high's dtype), stats (fp32, from the fp32 scratch); backward: grad_high,
    # grad_low (when not empty_like), grad_bias.
    alloc: tuple = ()
    # forward plans: the backward plans of this forward key by grad_out's strides (what the backward
    # adds to the key), so that the eager backward looks up one small tuple instead of the full key
    bwd_plans: Optional[dict] = None


def _reduce_launch(tensors, x0, x1, g, weight, n, c0, c1, h, w, elt, device_index, has_g) -> Launch:
    hw = h * w
    flat = all(_flat_hw(t) for t in tensors)
    path, (block_c, block_hw) = _pick_blocks(tensors, flat, hw)
    rows = c0 + c1 if path == "rows" else _cdiv(c0, block_c) + _cdiv(c1, block_c)
    # Split hw so that a small N * C still fills the GPU; the last program of each sample adds the splits.
    hw_blocks = _cdiv(hw, block_hw)
    splits = max(1, min(hw_blocks, _cdiv(_target_programs(device_index), n * rows)))
    blocks_per_split = _cdiv(hw_blocks, splits)
    splits = _cdiv(hw_blocks, blocks_per_split)
    grid = n * rows * splits
    # 2 warps (4 vectors per thread) only where the loads vectorise; a scalar gather (short NCHW rows,
    # generic views) keeps 4 warps, or each thread would hold 32 addresses (~250 registers on sm_90).
    vectorised = path != "c_major" or all(t.stride(1) == 1 for t in tensors)
    warps = _num_warps(elt) if vectorised else SCALE_WARPS
    scalars = (n, c0, c1, hw, w, splits, blocks_per_split, *_strides(x0, flat), *_strides(x1, flat),
               *_strides(g, flat), weight.stride(0), weight.stride(1))
    tail = (flat, path == "rows", block_c, block_hw, *EPILOGUE_TILE)
    fast = tuple(PlannedLaunch(_fbf_reduce_kernel, (grid,), 9, {"num_warps": warps}) for _ in range(2))
    return Launch("reduce", has_g, path, flat, grid, warps, splits, (block_c, block_hw),
                  scalars + (has_g, False) + tail, scalars + (has_g, True) + tail, fast)


def _scale_launch(tensors, s0, s1, d0, d1, n, c0, c1, h, w, elt, backward, s1_at_c0, d1_at_c0) -> Launch:
    hw = h * w
    flat = all(_flat_hw(t) for t in tensors)
    path, (block_c, block_hw) = _pick_blocks(tensors, flat, hw)
    if path == "rows":
        grid = n * (_cdiv(c0 * hw, block_hw) + _cdiv(c1 * hw, block_hw))
    else:
        grid = n * (_cdiv(c0, block_c) + _cdiv(c1, block_c)) * _cdiv(hw, block_hw)
    # The scale has grid >> 2 waves at any real shape; 2 warps (4 vectors per thread for 16-bit types)
    # made ptxas spill on sm_90, so it keeps 4 warps.
    warps = SCALE_WARPS
    args = (n, c0, c1, hw, w, *_strides(s0, flat), *_strides(s1, flat), *_strides(d0, flat), *_strides(d1, flat),
            backward, s1_at_c0, d1_at_c0, flat, path == "rows", block_c, block_hw, BLOCK_GW)
    fast = (PlannedLaunch(_fbf_scale_kernel, (grid,), 8, {"num_warps": warps}),) * 2
    return Launch("scale", backward, path, flat, grid, warps, 1, (block_c, block_hw), args, args, fast)


_PLANS: Dict[tuple, Plan] = {}


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def plan_fwd(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor, device_index: Optional[int] = None) -> Plan:
    """The forward's two launches for these inputs (any device, meta included; ``device_index`` -1 plans
    for the interpreter, n >= 0 for CUDA device n; default: the inputs' device)."""
    n, c0, h, w = high.shape
    c1 = low.shape[1]
    if device_index is None:
        device_index = high.get_device()
    elt = high.element_size()
    fmt = memory_format_of(high)
    if n * (c0 + c1) * h * w == 0:
        return Plan(n, c0, c1, h, w, elt, None, None, (fmt,), (), 0)
    out = torch.empty((n, c0 + c1, h, w), dtype=high.dtype, device="meta", memory_format=fmt)
    red = _reduce_launch((high, low), high, low, high, weight, n, c0, c1, h, w, elt, device_index, False)
    sc = _scale_launch((high, low, out), high, low, out, out, n, c0, c1, h, w, elt, False, False, True)
    c = c0 + c1
    alloc = ((tuple(out.shape), out.stride()), ((2, n, c), (n * c, c, 1)))
    return Plan(n, c0, c1, h, w, elt, red, sc, (fmt,), (), red.splits * n * c, alloc, {})


def plan_bwd(grad_out: torch.Tensor, high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
             device_index: Optional[int] = None) -> Plan:
    """The backward's two launches (see ``plan_fwd``)."""
    n, c0, h, w = high.shape
    c1 = low.shape[1]
    if device_index is None:
        device_index = high.get_device()
    elt = high.element_size()
    fmts = (memory_format_of(high), memory_format_of(low))
    like = (_dense(high), _dense(low), weight.is_contiguous())
    if n * (c0 + c1) * h * w == 0:
        return Plan(n, c0, c1, h, w, elt, None, None, fmts, like, 0)
    gh = torch.empty(high.shape, dtype=high.dtype, device="meta", memory_format=fmts[0])
    gl = torch.empty(low.shape, dtype=low.dtype, device="meta", memory_format=fmts[1])
    red = _reduce_launch((high, low, grad_out), high, low, grad_out, weight, n, c0, c1, h, w, elt,
                         device_index, True)
    sc = _scale_launch((grad_out, gh, gl), grad_out, grad_out, gh, gl, n, c0, c1, h, w, elt, True, True, False)
    alloc = ((tuple(gh.shape), gh.stride()), (tuple(gl.shape), gl.stride()), ((c0 + c1,), (1,)))
    return Plan(n, c0, c1, h, w, elt, red, sc, fmts, like, (2 + red.splits) * n * (c0 + c1), alloc)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _check(*tensors: torch.Tensor) -> None:
    reason = unsupported_reason(*tensors)
    if reason is not None:
        raise RuntimeError(f"ifbf_fast.kernels.fbf: {reason}")


def fwd(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
        bias: torch.Tensor, with_bwd_plans: bool = False) -> tuple:
    """The forward without the device check (the op layer has made it): ``(out, stats)`` with stats
    the (2, N, C) fp32 [pooled | gate] that the backward takes; with ``with_bwd_plans``
    ``(out, stats, bwd_plans)``, the dict to pass to ``bwd`` (its plans of this forward's key)."""
    dev_index = high.get_device()
    key = (high.shape, high.stride(), low.shape, low.stride(), high.dtype, weight.stride(), dev_index)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = plan_fwd(high, low, weight)
    if plan.reduce is None:
        out, stats = _fwd_degenerate(high, low, weight, bias, plan)
        return (out, stats, None) if with_bwd_plans else (out, stats)
    red, sc = plan.reduce, plan.scale
    counter, scratch = _workspace(high, dev_index, plan.n, plan.scratch)
    (out_size, out_stride), (stats_size, stats_stride) = plan.alloc
    stats = scratch.new_empty_strided(stats_size, stats_stride)      # fp32 like the scratch
    out = high.new_empty_strided(out_size, out_stride)
    red.fast[0]((high, low, high, stats, scratch, stats, weight, bias, counter, *red.args))
    sc.fast[0]((high, low, out, out, stats, stats, stats, stats, *sc.args))
    return (out, stats, plan.bwd_plans) if with_bwd_plans else (out, stats)


def bwd(grad_out: torch.Tensor, high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
        stats: torch.Tensor, grad_stats: Optional[torch.Tensor] = None, bias_dtype: Optional[torch.dtype] = None,
        bwd_plans: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward without the device check: ``stats`` the forward's (2, N, C) fp32 contiguous,
    ``grad_stats`` None or its gradient, (2, N, C) fp32 contiguous. ``bwd_plans``: what ``fwd(...,
    with_bwd_plans=True)`` returned for these inputs (the plan is then found by grad_out's strides)."""
    dev_index = high.get_device()
    plan = None
    if bwd_plans is not None:
        gstride = grad_out.stride()
        plan = bwd_plans.get(gstride)
    if plan is None:
        key = (grad_out.stride(), high.shape, high.stride(), low.shape, low.stride(), high.dtype, weight.stride(),
               dev_index)
        plan = _PLANS.get(key)
        if plan is None:
            plan = _PLANS[key] = plan_bwd(grad_out, high, low, weight)
        if bwd_plans is not None:
            if len(bwd_plans) > 16:
                bwd_plans.clear()
            bwd_plans[gstride] = plan
    bias_dtype = bias_dtype or weight.dtype
    if plan.reduce is None:
        return _bwd_degenerate(grad_out, high, low, weight, stats, grad_stats, bias_dtype)
    n = plan.n
    red, sc = plan.reduce, plan.scale
    counter, scratch = _workspace(high, dev_index, n, plan.scratch)
    like_h, like_l, like_w = plan.like
    (gh_size, gh_stride), (gl_size, gl_stride), (gb_size, gb_stride) = plan.alloc
    grad_high = _empty_like(high) if like_h else high.new_empty_strided(gh_size, gh_stride)
    grad_low = _empty_like(low) if like_l else low.new_empty_strided(gl_size, gl_stride)
    grad_weight = _empty_like(weight) if like_w else _empty(weight.shape, weight.dtype, high.device)
    if bias_dtype is weight.dtype:
        grad_bias = weight.new_empty_strided(gb_size, gb_stride)
    else:
        grad_bias = _empty(gb_size, bias_dtype, high.device)
    if grad_stats is None:
        red.fast[0]((high, low, grad_out, stats, scratch, stats, weight, weight, counter, *red.args))
    else:
        red.fast[1]((high, low, grad_out, stats, scratch, grad_stats, weight, weight, counter, *red.args_alt))
    sc.fast[0]((grad_out, grad_out, grad_high, grad_low, stats, scratch, grad_weight, grad_bias, *sc.args))
    return grad_high, grad_low, grad_weight, grad_bias


def fbf_fwd(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """FBF forward. Returns ``(out, stats)``: out (N, C, H, W) in high's dtype and memory format, and
    stats (2, N, C) fp32 = [pooled, gate] with pooled = mean_hw(x) and gate = sigmoid(weight @ pooled +
    bias) (saved for backward).

    Arguments are assumed valid (``ifbf_fast.ops.fbf.check_fbf_args``); weight (C, C) or (C, C, 1, 1)
    in any float dtype (fp32 parameters with bf16 activations under autocast).
    """
    _check(high, low, weight, bias)
    return fwd(high, low, weight, bias)


def fbf_bwd(grad_out: torch.Tensor, high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
            stats: torch.Tensor, grad_stats: Optional[torch.Tensor] = None,
            bias_dtype: Optional[torch.dtype] = None
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FBF backward from ``fbf_fwd``'s saved ``stats``.

    Returns ``(grad_high, grad_low, grad_weight, grad_bias)``: grad_high/grad_low in the inputs' dtypes
    and memory formats, grad_weight in the weight's shape and dtype, grad_bias (C,) in ``bias_dtype``
    (default: the weight's). ``grad_stats`` is the gradient of the forward's stats output, when used.

        s       = sum_hw(grad_out * x) (+ grad_gate)            # one pass over grad_out and x
        dz      = s * w * (1 - w)
        g_bias  = sum_n dz;   g_weight = dz^T @ pooled;   g_pooled = dz @ weight (+ grad_pooled)
        grad_x  = grad_out * (1 + w) + g_pooled / HW            # one pass over grad_out
    """
    _check(high, low, grad_out)
    stats = stats.to(torch.float32).contiguous()
    grad_stats = None if grad_stats is None else grad_stats.to(torch.float32).contiguous()
    return bwd(grad_out, high, low, weight, stats, grad_stats, bias_dtype)


# ------------------------------------------------------------------------------------------------
# Bytes model and work in flight (checked by tests/ops/test_fbf_launches.py at the network's shapes)
# ------------------------------------------------------------------------------------------------

def min_bytes(n: int, c: int, h: int, w: int, elt: int) -> int:
    """The fewest bytes FBF forward + backward can move: x read twice and out written (forward: the
    means must be known before any output), grad_out and x read for sum_hw(grad_out * x), grad_out read
    again and grad_x written (backward): 7 x-sizes."""
    return 7 * n * c * h * w * elt


def launch_bytes(plan: Plan, param_elt: int = 4, grad_stats: bool = False) -> Dict[str, Dict[str, tuple]]:
    """Per launch of ``plan`` ("reduce", "scale"): {pointer argument: (bytes, mode)} with mode "r", "w"
    or "rw" (read and written: counted twice in the traffic). The sizes are those of the tensors the
    launcher passes (the persistent ``counter``/``scratch`` buffers: the part the launch uses).
    Pointer arguments not listed are unused placeholders. Traffic: ``traffic_bytes``."""
    n, c0, c1, h, w, elt = plan.n, plan.c0, plan.c1, plan.h, plan.w, plan.elt
    c, hw = c0 + c1, h * w
    nc4 = n * c * 4
    x0, x1, x = n * c0 * hw * elt, n * c1 * hw * elt, n * c * hw * elt
    splits = plan.reduce.splits
    params = {"w_ptr": (c * c * param_elt, "r"), "counter_ptr": (n * 4, "rw")}
    if plan.reduce.backward:
        reduce = dict(params, x0_ptr=(x0, "r"), x1_ptr=(x1, "r"), g_ptr=(x, "r"), stats_ptr=(2 * nc4, "r"),
                      scratch_ptr=((2 + splits) * nc4, "rw"))
        if grad_stats:
            reduce["gstats_ptr"] = (2 * nc4, "r")
        scale = {"src0_ptr": (x, "r"), "dst0_ptr": (x0, "w"), "dst1_ptr": (x1, "w"), "stats_ptr": (2 * nc4, "r"),
                 "scratch_ptr": (2 * nc4, "r"), "gw_ptr": (c * c * param_elt, "w"), "gb_ptr": (c * param_elt, "w")}
    else:
        reduce = dict(params, x0_ptr=(x0, "r"), x1_ptr=(x1, "r"), stats_ptr=(2 * nc4, "w"),
                      scratch_ptr=(splits * nc4, "rw"), b_ptr=(c * param_elt, "r"))
        scale = {"src0_ptr": (x0, "r"), "src1_ptr": (x1, "r"), "dst0_ptr": (x, "w"), "stats_ptr": (2 * nc4, "r")}
    return {"reduce": reduce, "scale": scale}


def traffic_bytes(per_launch: Dict[str, Dict[str, tuple]]) -> int:
    """Total bytes moved by the launches of ``launch_bytes``."""
    return sum(b * (2 if mode == "rw" else 1) for args in per_launch.values() for b, mode in args.values())


def work_in_flight(launch: Launch, elt: int, sm_count: int = SM_COUNT_H200) -> Dict[str, float]:
    """What one launch keeps the GPU busy with: programs, waves (programs over sm_count times the
    blocks an SM can hold by warps: 64 warps, 32 blocks), and the independent 16-byte loads each thread
    issues per hot-loop iteration (one per tensor read and vector)."""
    threads = 32 * launch.num_warps
    per_thread = launch.block[0] * launch.block[1] // threads
    tensors = 2 if launch.name == "reduce" and launch.backward else 1     # grad_out and x
    resident = min(32, 64 // launch.num_warps)
    return {"programs": launch.grid, "waves": launch.grid / (sm_count * resident),
            "loads_per_thread": tensors * per_thread * elt / 16, "threads": threads}


# N * C * H * W == 0: nothing for a kernel to do; torch gives the reference's values (NaN means for
# H * W == 0) with the same dtypes, shapes and layouts.

def _fwd_degenerate(high, low, weight, bias, plan):
    c = plan.c0 + plan.c1
    x = torch.cat([high, low], 1).float()
    pooled = x.mean((2, 3))
    gate = torch.sigmoid(pooled @ weight.reshape(c, c).float().t() + bias.float())
    out = (x * (1 + gate[:, :, None, None])).to(high.dtype).contiguous(memory_format=plan.formats[0])
    return out, torch.stack([pooled, gate])


def _bwd_degenerate(grad_out, high, low, weight, stats, grad_stats, bias_dtype):
    n, c0, h, w = high.shape
    c = c0 + low.shape[1]
    pooled, gate = stats[0], stats[1]
    x = torch.cat([high, low], 1).float()
    g = grad_out.float()
    s = (g * x).sum((2, 3)) + (0 if grad_stats is None else grad_stats[1])
    dz = s * gate * (1 - gate)
    g_pooled = dz @ weight.reshape(c, c).float() + (0 if grad_stats is None else grad_stats[0])
    gx = g * (1 + gate[:, :, None, None]) + (g_pooled / (h * w))[:, :, None, None]
    return (gx[:, :c0].to(high.dtype).contiguous(memory_format=memory_format_of(high)),
            gx[:, c0:].to(low.dtype).contiguous(memory_format=memory_format_of(low)),
            (dz.t() @ pooled).reshape(weight.shape).to(weight.dtype), dz.sum(0).to(bias_dtype))
