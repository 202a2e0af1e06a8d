"""Triton kernels for FBF (DESIGN section 2) and their host launchers.

    x   = cat(high, low, dim=1)            # never materialised: every kernel takes the two parts
    w   = sigmoid(weight @ mean_hw(x) + bias)
    out = x * (1 + w[:, :, None, None])

Passes (x-sized tensors moved; the (N, C) work in between is negligible):
  forward   _fbf_fwd_reduce_kernel   reads x            -> partial sums (SPLITS, N, C) fp32
            torch (N,C)x(C,C) + sigmoid
            _fbf_scale_kernel        reads x, writes out                  total 3 x-sizes
  backward  _fbf_bwd_reduce_kernel   reads grad_out, x  -> partial sum_hw(grad_out * x)
            torch: chain through the sigmoid and the matvec
            _fbf_scale_kernel        reads grad_out, writes grad_high / grad_low   total 4 x-sizes

Layouts: every tensor is addressed through its own (n, c, h, w) strides, so contiguous NCHW,
channels_last and sliced views all run without a copy. When h and w collapse into one stride for every
tensor of a launch (FLAT_HW) the kernel uses that stride; a stride equal to 1 is specialised by Triton
to a constant, which is what lets the compiler vectorise along the contiguous dimension (hw for NCHW,
c for channels_last). The block shape follows the contiguous dimension (see ``_pick_blocks``).
NCHW-dense tensors (the usual case) take the ROWS path: 1-D blocks over each sample's part, started at
a multiple of 16 elements, so accesses vectorise even when H*W is odd and rows start unaligned.
Offsets are computed in int64: N*C*H*W passes 2^31 at realistic sizes.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

# Recorded at import because @triton.jit decides at decoration time whether it builds interpreter
# objects (CPU tensors) or compiled kernels (CUDA tensors).
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (BLOCK_C, BLOCK_HW, num_warps).
# ROWS: every tensor of the launch is NCHW-dense per sample (strides (*, H*W, W, 1)) and H*W >= 2048:
#   1-D blocks over each sample's (C_part * H * W) run, aligned to 16 elements whatever H*W is, so that
#   loads and stores vectorise even when rows do not start 16-byte aligned (219 x 219 = 47961 is odd).
# HW_MAJOR: hw contiguous and long, but channels not dense (e.g. every other channel).
# C_MAJOR: c contiguous (channels_last), or hw short, or a generic view. (64, 32) at 4 warps spilled
#   on sm_80 for bf16 (ptxas), hence 8 warps.
ROWS = (1, 2048, 4)
HW_MAJOR = (4, 512, 4)
C_MAJOR = (64, 32, 8)
BLOCK_CONFIGS = {"rows": ROWS, "hw_major": HW_MAJOR, "c_major": C_MAJOR}


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _hw_offsets(offs_hw, W, stride_h, stride_w, FLAT_HW: tl.constexpr):
    """int64 element offsets of flat spatial indices ``offs_hw`` (h * W + w)."""
    if FLAT_HW:
        off = offs_hw.to(tl.int64) * stride_w            # stride_w is the collapsed hw stride
    else:
        off = (offs_hw // W).to(tl.int64) * stride_h + (offs_hw % W).to(tl.int64) * stride_w
    return off


@triton.jit
def _reduce_part(x_ptr, g_ptr, n, c0, C_PART, HW, W, hw_start, hw_stop,
                 stride_xn, stride_xc, stride_xh, stride_xw,
                 stride_gn, stride_gc, stride_gh, stride_gw,
                 HAS_G: tl.constexpr, FLAT_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """sum over hw in [hw_start, hw_stop) of x (or g * x) for channels c0..c0+BLOCK_C of one part."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C_PART
    x_rows = x_ptr + n.to(tl.int64) * stride_xn + offs_c.to(tl.int64)[:, None] * stride_xc
    g_rows = g_ptr + n.to(tl.int64) * stride_gn + offs_c.to(tl.int64)[:, None] * stride_gc
    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for hw0 in range(hw_start, hw_stop, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        # Masked against HW, not hw_stop: splits are whole blocks, and HW's divisibility (known to
        # Triton) keeps the mask uniform over a vector, so masked loads still vectorise.
        mask = mask_c[:, None] & (offs_hw < HW)[None, :]
        x = tl.load(x_rows + _hw_offsets(offs_hw, W, stride_xh, stride_xw, FLAT_HW)[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            g = tl.load(g_rows + _hw_offsets(offs_hw, W, stride_gh, stride_gw, FLAT_HW)[None, :],
                        mask=mask, other=0.0).to(tl.float32)
            x = x * g
        acc += x
    return tl.sum(acc, axis=1), offs_c, mask_c


@triton.jit
def _reduce_row(x_ptr, g_ptr, n, c, C_PART, HW, hw_start, hw_stop, stride_xn, stride_gn,
                HAS_G: tl.constexpr, BLOCK: tl.constexpr):
    """sum over hw in [hw_start, hw_stop) of x[n, c] (or g * x) for NCHW-dense parts.

    Element (n, c, hw) of a part sits at n * stride_n + c * HW + hw. The loop starts at the row start
    rounded down to 16 elements: both tensors' sample bases are 16-aligned (pointer and stride_n
    specialisations) so every vector is aligned; elements outside the row are dropped in registers.
    """
    # tl.cast, not .to(): an argument equal to 1 reaches the kernel as a Python int (Triton specialises 1)
    numel = tl.cast(C_PART, tl.int64) * HW
    lo = c.to(tl.int64) * HW + hw_start
    hi = c.to(tl.int64) * HW + hw_stop
    start = tl.multiple_of((lo // 16) * 16, 16)
    x_base = x_ptr + n.to(tl.int64) * stride_xn
    g_base = g_ptr + n.to(tl.int64) * stride_gn
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(start, hi, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        mask = idx < numel                 # uniform over a vector when numel % 16 == 0
        x = tl.load(x_base + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            x = x * tl.load(g_base + idx, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where((idx >= lo) & (idx < hi), x, 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _scale_rows(src_ptr, dst_ptr, gate_ptr, shift_ptr, n, start, c_base, C_PART, C, HW, stride_sn, stride_dn,
                HAS_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """dst = src * (1 + gate) (+ shift) on elements [start, start + BLOCK) of sample n's NCHW-dense part.

    BLOCK <= HW, so the block meets at most two channels: c0 and c0 + 1 from index (c0 + 1) * HW on.
    """
    numel = tl.cast(C_PART, tl.int64) * HW
    idx = start + tl.arange(0, BLOCK)
    mask = idx < numel
    c0 = start // HW
    upper = idx >= (c0 + 1) * HW
    has_next = c0 + 1 < C_PART
    row = n.to(tl.int64) * C + c_base + c0
    g0 = tl.load(gate_ptr + row)
    g1 = tl.load(gate_ptr + row + 1, mask=has_next, other=0.0)
    x = tl.load(src_ptr + n.to(tl.int64) * stride_sn + idx, mask=mask, other=0.0).to(tl.float32)
    y = x * (1.0 + tl.where(upper, g1, g0))
    if HAS_SHIFT:
        s0 = tl.load(shift_ptr + row)
        s1 = tl.load(shift_ptr + row + 1, mask=has_next, other=0.0)
        y += tl.where(upper, s1, s0)
    tl.store(dst_ptr + n.to(tl.int64) * stride_dn + idx, y.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fbf_fwd_reduce_kernel(
    x0_ptr, x1_ptr,              # high (N, C0, H, W) and low (N, C1, H, W), any strides
    partial_ptr,                 # (SPLITS, N, C0 + C1) fp32 out: partial sums of x over hw
    N, C0, C1, HW, W,            # sizes; HW = H * W
    BLOCKS_PER_SPLIT,            # hw blocks of BLOCK_HW per split (grid axis 1)
    stride_x0n, stride_x0c, stride_x0h, stride_x0w,
    stride_x1n, stride_x1c, stride_x1h, stride_x1w,
    FLAT_HW: tl.constexpr,       # h, w collapse into one stride (passed as stride_*w)
    ROWS: tl.constexpr,          # NCHW-dense parts: one (n, c) row per program, 1-D aligned blocks
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Grid (N * (cdiv(C0, BLOCK_C) + cdiv(C1, BLOCK_C)), SPLITS): partial per-(n, c) sums of x.

    With ROWS, BLOCK_C is 1 and the grid (N * (C0 + C1), SPLITS).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    hw_start = split * BLOCKS_PER_SPLIT * BLOCK_HW
    hw_stop = tl.minimum(hw_start + BLOCKS_PER_SPLIT * BLOCK_HW, HW)
    if ROWS:
        n = pid // (C0 + C1)
        c = pid % (C0 + C1)
        out = partial_ptr + (split * N + n).to(tl.int64) * (C0 + C1) + c
        if c < C0:
            tl.store(out, _reduce_row(x0_ptr, x0_ptr, n, c, C0, HW, hw_start, hw_stop, stride_x0n, stride_x0n,
                                      False, BLOCK_HW))
        else:
            tl.store(out, _reduce_row(x1_ptr, x1_ptr, n, c - C0, C1, HW, hw_start, hw_stop, stride_x1n,
                                      stride_x1n, False, BLOCK_HW))
    else:
        nb0 = tl.cdiv(C0, BLOCK_C)
        nb = nb0 + tl.cdiv(C1, BLOCK_C)
        n = pid // nb
        cb = pid % nb
        row = partial_ptr + (split * N + n).to(tl.int64) * (C0 + C1)
        # The two parts take separate branches (not a select of pointers and strides) so that each keeps
        # its own stride-1 specialisation, hence its own vectorisation.
        if cb < nb0:
            s, offs_c, mask_c = _reduce_part(x0_ptr, x0_ptr, n, cb * BLOCK_C, C0, HW, W, hw_start, hw_stop,
                                             stride_x0n, stride_x0c, stride_x0h, stride_x0w,
                                             stride_x0n, stride_x0c, stride_x0h, stride_x0w,
                                             False, FLAT_HW, BLOCK_C, BLOCK_HW)
            tl.store(row + offs_c, s, mask=mask_c)
        else:
            s, offs_c, mask_c = _reduce_part(x1_ptr, x1_ptr, n, (cb - nb0) * BLOCK_C, C1, HW, W, hw_start, hw_stop,
                                             stride_x1n, stride_x1c, stride_x1h, stride_x1w,
                                             stride_x1n, stride_x1c, stride_x1h, stride_x1w,
                                             False, FLAT_HW, BLOCK_C, BLOCK_HW)
            tl.store(row + C0 + offs_c, s, mask=mask_c)


@triton.jit
def _fbf_bwd_reduce_kernel(
    g0_ptr, g1_ptr,              # grad_out's channels [0, C0) and [C0, C0+C1): views of one tensor
    x0_ptr, x1_ptr,              # high (N, C0, H, W) and low (N, C1, H, W), any strides
    partial_ptr,                 # (SPLITS, N, C0 + C1) fp32 out: partial sums of grad_out * x over hw
    N, C0, C1, HW, W,
    BLOCKS_PER_SPLIT,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_x0n, stride_x0c, stride_x0h, stride_x0w,
    stride_x1n, stride_x1c, stride_x1h, stride_x1w,
    FLAT_HW: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Grid as ``_fbf_fwd_reduce_kernel``: partial per-(n, c) sums of grad_out * x."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    hw_start = split * BLOCKS_PER_SPLIT * BLOCK_HW
    hw_stop = tl.minimum(hw_start + BLOCKS_PER_SPLIT * BLOCK_HW, HW)
    if ROWS:
        n = pid // (C0 + C1)
        c = pid % (C0 + C1)
        out = partial_ptr + (split * N + n).to(tl.int64) * (C0 + C1) + c
        if c < C0:
            tl.store(out, _reduce_row(x0_ptr, g0_ptr, n, c, C0, HW, hw_start, hw_stop, stride_x0n, stride_gn,
                                      True, BLOCK_HW))
        else:
            tl.store(out, _reduce_row(x1_ptr, g1_ptr, n, c - C0, C1, HW, hw_start, hw_stop, stride_x1n,
                                      stride_gn, True, BLOCK_HW))
    else:
        nb0 = tl.cdiv(C0, BLOCK_C)
        nb = nb0 + tl.cdiv(C1, BLOCK_C)
        n = pid // nb
        cb = pid % nb
        row = partial_ptr + (split * N + n).to(tl.int64) * (C0 + C1)
        if cb < nb0:
            s, offs_c, mask_c = _reduce_part(x0_ptr, g0_ptr, n, cb * BLOCK_C, C0, HW, W, hw_start, hw_stop,
                                             stride_x0n, stride_x0c, stride_x0h, stride_x0w,
                                             stride_gn, stride_gc, stride_gh, stride_gw,
                                             True, FLAT_HW, BLOCK_C, BLOCK_HW)
            tl.store(row + offs_c, s, mask=mask_c)
        else:
            s, offs_c, mask_c = _reduce_part(x1_ptr, g1_ptr, n, (cb - nb0) * BLOCK_C, C1, HW, W, hw_start, hw_stop,
                                             stride_x1n, stride_x1c, stride_x1h, stride_x1w,
                                             stride_gn, stride_gc, stride_gh, stride_gw,
                                             True, FLAT_HW, BLOCK_C, BLOCK_HW)
            tl.store(row + C0 + offs_c, s, mask=mask_c)


@triton.jit
def _scale_part(src_ptr, dst_ptr, gate_ptr, shift_ptr, n, c0, c_base, C_PART, C, HW, W, hw0,
                stride_sn, stride_sc, stride_sh, stride_sw,
                stride_dn, stride_dc, stride_dh, stride_dw,
                HAS_SHIFT: tl.constexpr, FLAT_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """dst = src * (1 + gate[n, c]) (+ shift[n, c]) on one [BLOCK_C, BLOCK_HW] tile of one part."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_hw = hw0 + tl.arange(0, BLOCK_HW)
    mask_c = offs_c < C_PART
    mask = mask_c[:, None] & (offs_hw < HW)[None, :]
    nc = n.to(tl.int64) * C + c_base + offs_c
    scale = 1.0 + tl.load(gate_ptr + nc, mask=mask_c, other=0.0)
    src = (src_ptr + n.to(tl.int64) * stride_sn + offs_c.to(tl.int64)[:, None] * stride_sc
           + _hw_offsets(offs_hw, W, stride_sh, stride_sw, FLAT_HW)[None, :])
    y = tl.load(src, mask=mask, other=0.0).to(tl.float32) * scale[:, None]
    if HAS_SHIFT:
        y += tl.load(shift_ptr + nc, mask=mask_c, other=0.0)[:, None]
    dst = (dst_ptr + n.to(tl.int64) * stride_dn + offs_c.to(tl.int64)[:, None] * stride_dc
           + _hw_offsets(offs_hw, W, stride_dh, stride_dw, FLAT_HW)[None, :])
    tl.store(dst, y.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fbf_scale_kernel(
    src0_ptr, src1_ptr,          # parts [0, C0) and [C0, C0+C1): forward high/low, backward grad_out views
    dst0_ptr, dst1_ptr,          # parts written: forward out's views, backward grad_high/grad_low
    gate_ptr,                    # (N, C0 + C1) fp32 contiguous: w = sigmoid(...)
    shift_ptr,                   # (N, C0 + C1) fp32 contiguous, read only with HAS_SHIFT: g_pooled / HW
    N, C0, C1, HW, W,
    stride_s0n, stride_s0c, stride_s0h, stride_s0w,
    stride_s1n, stride_s1c, stride_s1h, stride_s1w,
    stride_d0n, stride_d0c, stride_d0h, stride_d0w,
    stride_d1n, stride_d1c, stride_d1h, stride_d1w,
    HAS_SHIFT: tl.constexpr,     # backward: add shift[n, c]
    FLAT_HW: tl.constexpr,
    ROWS: tl.constexpr,          # NCHW-dense parts, BLOCK_HW <= HW: 1-D blocks of each sample's part
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """1-D grid N * (cdiv(C0, BLOCK_C) + cdiv(C1, BLOCK_C)) * cdiv(HW, BLOCK_HW), one tile each;
    with ROWS, N * (cdiv(C0 * HW, BLOCK_HW) + cdiv(C1 * HW, BLOCK_HW)) blocks of BLOCK_HW elements.

    dst[n, c, hw] = src[n, c, hw] * (1 + gate[n, c]) (+ shift[n, c]), fp32 math, cast at the store.
    """
    pid = tl.program_id(0)
    if ROWS:
        rb0 = tl.cdiv(tl.cast(C0, tl.int64) * HW, BLOCK_HW)
        rb = rb0 + tl.cdiv(tl.cast(C1, tl.int64) * HW, BLOCK_HW)
        n = pid // rb
        b = pid % rb
        if b < rb0:
            _scale_rows(src0_ptr, dst0_ptr, gate_ptr, shift_ptr, n, b * BLOCK_HW, 0, C0, C0 + C1, HW,
                        stride_s0n, stride_d0n, HAS_SHIFT, BLOCK_HW)
        else:
            _scale_rows(src1_ptr, dst1_ptr, gate_ptr, shift_ptr, n, (b - rb0) * BLOCK_HW, C0, C1, C0 + C1, HW,
                        stride_s1n, stride_d1n, HAS_SHIFT, BLOCK_HW)
    else:
        n_hw_blocks = tl.cdiv(HW, BLOCK_HW)
        nb0 = tl.cdiv(C0, BLOCK_C)
        nb = nb0 + tl.cdiv(C1, BLOCK_C)
        rowblock = pid // n_hw_blocks
        hw0 = (pid % n_hw_blocks) * BLOCK_HW
        n = rowblock // nb
        cb = rowblock % nb
        if cb < nb0:
            _scale_part(src0_ptr, dst0_ptr, gate_ptr, shift_ptr, n, cb * BLOCK_C, 0, C0, C0 + C1, HW, W, hw0,
                        stride_s0n, stride_s0c, stride_s0h, stride_s0w,
                        stride_d0n, stride_d0c, stride_d0h, stride_d0w,
                        HAS_SHIFT, FLAT_HW, BLOCK_C, BLOCK_HW)
        else:
            _scale_part(src1_ptr, dst1_ptr, gate_ptr, shift_ptr, n, (cb - nb0) * BLOCK_C, C0, C1, C0 + C1, HW, W, hw0,
                        stride_s1n, stride_s1c, stride_s1h, stride_s1w,
                        stride_d1n, stride_d1c, stride_d1h, stride_d1w,
                        HAS_SHIFT, FLAT_HW, BLOCK_C, BLOCK_HW)


# ------------------------------------------------------------------------------------------------
# Host launchers
# ------------------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b) for ints (triton.cdiv costs ~10 us a call through its constexpr wrapper)."""
    return -(-a // b)


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
           memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Every buffer the launchers hand to a kernel comes from here (tests poison it with NaN)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)


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
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRETER:
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


def _pick_blocks(tensors: Sequence[torch.Tensor], flat: bool, hw: int) -> Tuple[Tuple[int, int, int], bool]:
    """(block config, rows): ROWS for NCHW-dense long rows, HW_MAJOR when hw is contiguous and long,
    C_MAJOR otherwise (channels_last, short hw, generic views)."""
    if hw >= ROWS[1] and all(_dense_rows(t) for t in tensors):
        return ROWS, True
    if flat and hw >= HW_MAJOR[1] and all(_strides(t, True)[3] == 1 for t in tensors):
        return HW_MAJOR, False
    return C_MAJOR, False


_SM_COUNT: dict = {}


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 8          # the interpreter runs programs one by one: few, but more than one split
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 8 * _SM_COUNT[idx]


def _channel_sums(high: torch.Tensor, low: torch.Tensor, grad_out: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, C) fp32: sum_hw x, or sum_hw grad_out * x when ``grad_out`` is given (the concatenation's order)."""
    n, c0, h, w = high.shape
    c1 = low.shape[1]
    hw = h * w
    tensors = [high, low] + ([grad_out] if grad_out is not None else [])
    if n * (c0 + c1) * hw == 0:
        return torch.zeros((n, c0 + c1), dtype=torch.float32, device=high.device)
    flat = all(_flat_hw(t) for t in tensors)
    (block_c, block_hw, num_warps), dense = _pick_blocks(tensors, flat, hw)
    rows = n * (c0 + c1) if dense else n * (_cdiv(c0, block_c) + _cdiv(c1, block_c))
    # Split hw across programs so that a small N * C still fills the GPU; partial sums are added by
    # torch afterwards (deterministic, unlike atomics).
    hw_blocks = _cdiv(hw, block_hw)
    splits = max(1, min(hw_blocks, _cdiv(_target_programs(high.device), rows)))
    blocks_per_split = _cdiv(hw_blocks, splits)
    splits = _cdiv(hw_blocks, blocks_per_split)
    partial = _empty((splits, n, c0 + c1), torch.float32, high.device)
    grid = (rows, splits)
    if grad_out is None:
        _fbf_fwd_reduce_kernel[grid](
            high, low, partial, n, c0, c1, hw, w, blocks_per_split,
            *_strides(high, flat), *_strides(low, flat),
            FLAT_HW=flat, ROWS=dense, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps)
    else:
        _fbf_bwd_reduce_kernel[grid](
            grad_out.narrow(1, 0, c0), grad_out.narrow(1, c0, c1), high, low, partial, n, c0, c1, hw, w,
            blocks_per_split, *_strides(grad_out, flat), *_strides(high, flat), *_strides(low, flat),
            FLAT_HW=flat, ROWS=dense, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps)
    return partial.sum(0) if splits > 1 else partial[0]


def _scale(src0: torch.Tensor, src1: torch.Tensor, dst0: torch.Tensor, dst1: torch.Tensor,
           gate: torch.Tensor, shift: Optional[torch.Tensor]) -> None:
    """dst_i = src_i * (1 + gate) (+ shift) for the two channel parts, in one launch."""
    n, c0, h, w = src0.shape
    c1 = src1.shape[1]
    hw = h * w
    if n * (c0 + c1) * hw == 0:
        return
    tensors = (src0, src1, dst0, dst1)
    flat = all(_flat_hw(t) for t in tensors)
    (block_c, block_hw, num_warps), dense = _pick_blocks(tensors, flat, hw)
    if dense:
        grid = (n * (_cdiv(c0 * hw, block_hw) + _cdiv(c1 * hw, block_hw)),)
    else:
        grid = (n * (_cdiv(c0, block_c) + _cdiv(c1, block_c)) * _cdiv(hw, block_hw),)
    _fbf_scale_kernel[grid](
        src0, src1, dst0, dst1, gate, gate if shift is None else shift, n, c0, c1, hw, w,
        *_strides(src0, flat), *_strides(src1, flat), *_strides(dst0, flat), *_strides(dst1, flat),
        HAS_SHIFT=shift is not None, FLAT_HW=flat, ROWS=dense, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=num_warps)


def _check(*tensors: torch.Tensor) -> None:
    reason = unsupported_reason(*tensors)
    if reason is not None:
        raise RuntimeError(f"ifbf_fast.kernels.fbf: {reason}")


def fbf_forward(high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FBF forward. Returns ``(out, gate, pooled)``: out (N, C, H, W) in high's dtype and memory format,
    gate = sigmoid(weight @ pooled + bias) and pooled = mean_hw(x), both (N, C) fp32 (saved for backward).

    Arguments are assumed valid (``ifbf_fast.ops.fbf.check_fbf_args``); weight (C, C) or (C, C, 1, 1)
    in any float dtype (fp32 parameters with bf16 activations under autocast).
    """
    _check(high, low, weight, bias)
    n, c0, h, w = high.shape
    c = c0 + low.shape[1]
    pooled = _channel_sums(high, low, None) / (h * w)
    # The (N, C) x (C, C) product is ~N*C^2 = 0.6 MFLOP and (N, C) elementwise work: negligible next to
    # the x-sized passes, and torch's fp32 GEMM is exact enough and needs no extra kernel. Autocast is
    # off here so that it stays fp32 when the caller runs under autocast.
    with torch.autocast(device_type=high.device.type, enabled=False):
        gate = torch.sigmoid(pooled @ weight.reshape(c, c).float().t() + bias.float())
    out = _empty((n, c, h, w), high.dtype, high.device, memory_format_of(high))
    _scale(high, low, out.narrow(1, 0, c0), out.narrow(1, c0, c - c0), gate, None)
    return out, gate, pooled


def fbf_backward(grad_out: torch.Tensor, high: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
                 gate: torch.Tensor, pooled: torch.Tensor, grad_gate: Optional[torch.Tensor] = None,
                 grad_pooled: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FBF backward from ``fbf_forward``'s saved ``gate`` and ``pooled``.

    Returns ``(grad_high, grad_low, grad_weight, grad_bias)``: grad_high/grad_low in the inputs' dtypes
    and memory formats, grad_weight (C, C) and grad_bias (C,) in fp32 (the caller reshapes and casts).
    ``grad_gate`` / ``grad_pooled`` are the gradients of the forward's extra outputs, when used.

        s       = sum_hw(grad_out * x) (+ grad_gate)            # one pass over grad_out and x
        dz      = s * w * (1 - w)
        g_bias  = sum_n dz;   g_weight = dz^T @ pooled;   g_pooled = dz @ weight (+ grad_pooled)
        grad_x  = grad_out * (1 + w) + g_pooled / HW            # one pass over grad_out
    """
    _check(high, low, grad_out)
    n, c0, h, w = high.shape
    c = c0 + low.shape[1]
    gate = gate.float().contiguous()
    s = _channel_sums(high, low, grad_out)
    with torch.autocast(device_type=high.device.type, enabled=False):
        if grad_gate is not None:
            s = s + grad_gate.float()
        dz = s * gate * (1.0 - gate)
        grad_bias = dz.sum(0)
        grad_weight = dz.t() @ pooled
        g_pooled = dz @ weight.reshape(c, c).float()
        if grad_pooled is not None:
            g_pooled = g_pooled + grad_pooled.float()
        shift = (g_pooled / (h * w)).contiguous()
    grad_high = _empty(high.shape, high.dtype, high.device, memory_format_of(high))
    grad_low = _empty(low.shape, low.dtype, low.device, memory_format_of(low))
    _scale(grad_out.narrow(1, 0, c0), grad_out.narrow(1, c0, c - c0), grad_high, grad_low, gate, shift)
    return grad_high, grad_low, grad_weight, grad_bias
