"""Triton kernels of the OHEM cross-entropy with the bilinear upsampling of the logits fused in, and
their host launchers (the optional ``ifbf_fast.ops.ohem_cross_entropy_upsampled`` fast path).

The same loss as ``ohem_ce.py`` on ``interpolate(logits, (H, W), bilinear, align_corners=False)`` of
1/4-resolution logits, interpolated on the fly:

* ``_ohem_ce_up_fwd_kernel``: ``_ohem_ce_fwd_kernel`` with each output pixel's logits gathered from
  its four source pixels; it fills the same per-pixel loss buffer and pass-0 histogram, after which
  the selection kernels of ``ohem_ce.py`` (radix, reduce, finalize) run unchanged.
* ``_ohem_ce_up_bwd_kernel``: the gradient wrt the low-resolution logits, accumulated with fp32
  atomics (not bitwise deterministic).

What it shares (constants, the per-tile loss, the selection launches, the argument helpers) is
imported from ``ohem_ce.py``; the ``@triton.jit`` helpers are imported into this module's globals,
where Triton resolves the names a kernel calls.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from .ohem_ce import (FWD_TILES, RADIX_BITS, RED_BLOCK, SLOT_N_VALID, STATE_SIZE, _TL_TYPES, _cdiv, _check_offsets,
                      _f64_halves, _flat_hw, _ohem_ce_pixel_offsets, _ohem_ce_tile_loss, _select_and_reduce,
                      block_sizes, thresh_bits)


# --- kernels: the x4 bilinear upsampling of the logits fused into the loss -----------------------
#
# The head's logits come at 1/4 resolution and are upsampled (bilinear, align_corners=False) to the
# label size. These kernels take the low-resolution logits and interpolate on the fly, in fp32, so
# the full-resolution logits and their gradient never exist. Forward: each output pixel gathers its
# four source pixels (the low-resolution tensor is 1/16 of the full one and stays in L1/L2). Backward:
# a program owns a TH x TW tile of output pixels, computes their gradient G [P, C] in registers and
# applies the transposed interpolation as one small matmul, G^T @ M with M [P, L] the bilinear weights
# onto the L = LH x LW source pixels the tile touches, then adds the [C, L] result to an fp32
# low-resolution buffer with atomics (tiles overlap by a source row/column: the low-resolution
# gradient is not bitwise deterministic).

@triton.jit
def _ohem_ce_source_index(dst, scale, size_in):
    """PyTorch's bilinear source index (align_corners=False): (i0, i1, lambda1) for int32 ``dst``."""
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = src.to(tl.int32)                            # floor: src >= 0
    lam = src - i0.to(tl.float32)
    i0 = tl.minimum(i0, size_in - 1)
    return i0, tl.minimum(i0 + 1, size_in - 1), lam


@triton.jit
def _ohem_ce_bilinear_tile(lr_ptr, Y, X, mask, offs_c, mask_c, h_in, w_in, scale_h, scale_w,
                           stride_c, stride_h, stride_w):
    """fp32 logits [P, BLOCK_C] of output pixels (Y, X) interpolated from ``lr_ptr``; -inf padding."""
    y0, y1, ly = _ohem_ce_source_index(Y, scale_h, h_in)
    x0, x1, lx = _ohem_ce_source_index(X, scale_w, w_in)
    col = (offs_c * stride_c)[None, :]
    m2 = mask[:, None] & mask_c[None, :]
    v00 = tl.load(lr_ptr + (y0 * stride_h + x0 * stride_w)[:, None] + col, mask=m2, other=0.0).to(tl.float32)
    v01 = tl.load(lr_ptr + (y0 * stride_h + x1 * stride_w)[:, None] + col, mask=m2, other=0.0).to(tl.float32)
    v10 = tl.load(lr_ptr + (y1 * stride_h + x0 * stride_w)[:, None] + col, mask=m2, other=0.0).to(tl.float32)
    v11 = tl.load(lr_ptr + (y1 * stride_h + x1 * stride_w)[:, None] + col, mask=m2, other=0.0).to(tl.float32)
    wy = ly[:, None]
    wx = lx[:, None]
    x = (1.0 - wy) * ((1.0 - wx) * v00 + wx * v01) + wy * ((1.0 - wx) * v10 + wx * v11)
    return tl.where(m2, x, -float("inf"))


@triton.jit
def _ohem_ce_up_fwd_kernel(
    lr_ptr,         # (N, C, h, w) low-resolution logits, any strides
    target_ptr,     # (N, H, W) integer class ids, any strides
    loss_ptr,       # (N*H*W,) fp32 out, as in _ohem_ce_fwd_kernel
    state_ptr,      # (STATE_SIZE,) int32, zeroed
    C, HW, W,       # classes, output pixels per image, output width
    h_in, w_in,     # low-resolution size
    scale_h, scale_w,   # h_in / H and w_in / W (fp32, as PyTorch computes them)
    stride_ln, stride_lc, stride_lh, stride_lw,
    stride_tn, stride_th, stride_tw,
    ignore_index,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr,
    RADIX_BITS: tl.constexpr, SLOT_N_VALID: tl.constexpr,
    FLAT_HW: tl.constexpr,   # the target's H x W plane is dense
):
    """_ohem_ce_fwd_kernel on bilinearly upsampled logits; grid (cdiv(H*W, TILES*BLOCK_P), N)."""
    RADIX: tl.constexpr = 1 << RADIX_BITS
    n = tl.program_id(1).to(tl.int64)
    lr_ptr += n * stride_ln
    target_ptr += n * stride_tn
    loss_ptr += n * HW
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    hist = tl.zeros([RADIX], dtype=tl.int32)
    n_valid = tl.zeros([], dtype=tl.int32)
    n_poison = tl.zeros([], dtype=tl.int32)
    for i in range(TILES):
        offs_p = (tl.program_id(0) * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        t = tl.load(target_ptr + _ohem_ce_pixel_offsets(offs_p, W, stride_th, stride_tw, FLAT_HW),
                    mask=mask_p, other=ignore_index).to(tl.int64)
        valid = mask_p & (t != ignore_index)
        x = _ohem_ce_bilinear_tile(lr_ptr, offs_p // W, offs_p % W, mask_p, offs_c, mask_c, h_in, w_in,
                                   scale_h, scale_w, stride_lc, stride_lh, stride_lw)
        loss, poison = _ohem_ce_tile_loss(x, t, valid, mask_p, offs_c, C)
        tl.store(loss_ptr + offs_p, loss, mask=mask_p)
        bits = loss.to(tl.int32, bitcast=True)
        hist += tl.histogram((bits >> (32 - RADIX_BITS)) & (RADIX - 1), RADIX, mask=valid)
        n_valid += tl.sum(valid.to(tl.int32))
        n_poison += tl.sum(poison.to(tl.int32))
    bins = tl.arange(0, RADIX)
    tl.atomic_add(state_ptr + bins, hist, mask=hist != 0)
    tl.atomic_add(state_ptr + SLOT_N_VALID, n_valid, mask=n_valid != 0)
    tl.atomic_add(state_ptr + SLOT_N_VALID + 1, n_poison, mask=n_poison != 0)


@triton.jit
def _ohem_ce_up_bwd_kernel(
    grad_out_ptr,   # () upstream gradient of the scalar loss
    lr_ptr,         # (N, C, h, w) low-resolution logits, any strides
    target_ptr,     # (N, H, W) any strides
    loss_ptr,       # (N*H*W,) fp32 losses from the forward
    state_ptr,      # (STATE_SIZE,) int32 from the forward
    glr_ptr,        # (N, C, h, w) fp32, contiguous, zeroed: the low-resolution gradient accumulates here
    C, H, W, h_in, w_in, scale_h, scale_w,
    stride_ln, stride_lc, stride_lh, stride_lw,
    stride_tn, stride_th, stride_tw,
    SLOT_N_VALID: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr,     # output tile
    LH: tl.constexpr, LW: tl.constexpr,     # source footprint of a tile (powers of two, from the launcher)
    BLOCK_C: tl.constexpr,                  # >= 16 (tl.dot)
):
    """grad wrt the low-resolution logits; grid (cdiv(W, TW), cdiv(H, TH), N)."""
    n = tl.program_id(2).to(tl.int64)
    lr_ptr += n * stride_ln
    target_ptr += n * stride_tn
    loss_ptr += n * H * W
    glr_ptr += n * C * h_in * w_in
    offs = tl.arange(0, TH * TW)
    Y = tl.program_id(1) * TH + offs // TW
    X = tl.program_id(0) * TW + offs % TW
    mask_p = (Y < H) & (X < W)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    cut = tl.load(state_ptr + SLOT_N_VALID + 2)
    inv_n = tl.load(state_ptr + SLOT_N_VALID + 3).to(tl.float32, bitcast=True)
    tie_w = tl.load(state_ptr + SLOT_N_VALID + 4).to(tl.float32, bitcast=True)
    g = tl.load(grad_out_ptr).to(tl.float32)
    bits = tl.load(loss_ptr + Y * W + X, mask=mask_p, other=-1.0).to(tl.int32, bitcast=True)
    weight = tl.where(bits > cut, 1.0, tl.where(bits == cut, tie_w, 0.0))
    coef = tl.where(mask_p, g * inv_n * weight, 0.0)     # NaN everywhere in the image when poisoned
    kept = mask_p & (weight != 0.0)
    t = tl.load(target_ptr + Y * stride_th + X * stride_tw, mask=kept, other=-1).to(tl.int64)
    x = _ohem_ce_bilinear_tile(lr_ptr, Y, X, kept, offs_c, mask_c, h_in, w_in, scale_h, scale_w,
                               stride_lc, stride_lh, stride_lw)
    m = tl.where(kept, tl.max(x, axis=1), 0.0)
    e = tl.exp(x - m[:, None])
    s = tl.where(kept, tl.sum(e, axis=1), 1.0)
    onehot = tl.where(offs_c[None, :] == t[:, None], 1.0, 0.0)
    grad = (e / s[:, None] - onehot) * coef[:, None]                     # [P, BLOCK_C]
    # Transposed interpolation: M[p, l] = bilinear weight of source pixel l (tile-local) for pixel p.
    y0, y1, ly = _ohem_ce_source_index(Y, scale_h, h_in)
    x0, x1, lx = _ohem_ce_source_index(X, scale_w, w_in)
    oy, _, _ = _ohem_ce_source_index(tl.program_id(1) * TH, scale_h, h_in)   # footprint origin
    ox, _, _ = _ohem_ce_source_index(tl.program_id(0) * TW, scale_w, w_in)
    offs_l = tl.arange(0, LH * LW)
    ry = (offs_l // LW)[None, :]
    rx = (offs_l % LW)[None, :]
    wy0 = tl.where(ry == (y0 - oy)[:, None], (1.0 - ly)[:, None], 0.0)
    wy1 = tl.where(ry == (y1 - oy)[:, None], ly[:, None], 0.0)          # y1 == y0 at the border: adds
    wx0 = tl.where(rx == (x0 - ox)[:, None], (1.0 - lx)[:, None], 0.0)
    wx1 = tl.where(rx == (x1 - ox)[:, None], lx[:, None], 0.0)
    interp = (wy0 + wy1) * (wx0 + wx1)                                    # [P, L]
    glr = tl.dot(tl.trans(grad), interp, input_precision="ieee")          # [BLOCK_C, L]
    gy = oy + offs_l // LW
    gx = ox + offs_l % LW
    dst = glr_ptr + (offs_c * (h_in * w_in))[:, None] + (gy * w_in + gx)[None, :]
    tl.atomic_add(dst, glr, mask=mask_c[:, None] & ((gy < h_in) & (gx < w_in))[None, :] & (glr != 0.0))


# --- host launchers ------------------------------------------------------------------------------

UP_TILE = (8, 8)             # (TH, TW) output pixels per backward program (registers: no spills)
UP_MAX_FOOTPRINT = 32        # LH * LW source pixels a backward tile may touch (64 spills registers)


def up_bwd_warps(lh: int, lw: int) -> int:
    """Warps of the backward launch: 8 for a footprint of 32 source pixels (at 4, triton 3.6 spills 8 bytes
    for sm_80 with an 8 x 4 footprint), else 4."""
    return 8 if lh * lw > 16 else 4


def upsample_footprint(size_in: tuple, size_out: tuple) -> tuple:
    """(LH, LW): power-of-two bounds of the source rows/columns one backward tile touches."""
    th, tw = UP_TILE
    lh = triton.next_power_of_2(math.ceil((th - 1) * size_in[0] / size_out[0]) + 2)
    lw = triton.next_power_of_2(math.ceil((tw - 1) * size_in[1] / size_out[1]) + 2)
    return lh, lw


def upsample_unsupported_reason(size_in: tuple, size_out: tuple) -> str | None:
    """Why the fused upsampling kernels cannot take this resize, or None."""
    if size_in[0] > size_out[0] or size_in[1] > size_out[1]:
        return f"the fused kernels only upsample; got {tuple(size_in)} -> {tuple(size_out)}"
    lh, lw = upsample_footprint(size_in, size_out)
    if lh * lw > UP_MAX_FOOTPRINT:
        return (f"the fused kernels need an upsampling factor of about 3.5 or more on one side (the "
                f"network's x4); got {tuple(size_in)} -> {tuple(size_out)}")
    return None


def _scales(size_in: tuple, size_out: tuple) -> tuple:
    # fp32(in / out), what PyTorch's area_pixel_compute_scale gives for an explicit output size.
    return (struct.unpack("<f", struct.pack("<f", size_in[0] / size_out[0]))[0],
            struct.unpack("<f", struct.pack("<f", size_in[1] / size_out[1]))[0])


def ohem_ce_up_fwd(logits_lr: torch.Tensor, target: torch.Tensor, keep_ratio: float, thresh: float,
                   ignore_index: int) -> tuple:
    """Forward on ``interpolate(logits_lr, target's size, bilinear)`` without materialising it."""
    n, c, h_in, w_in = logits_lr.shape
    h, w = target.shape[-2:]
    p = n * h * w
    if p >= 2 ** 31:
        raise ValueError(f"ohem_ce kernels count pixels in int32; got {p} pixels")
    block_p, block_c, warps = block_sizes(c)
    _check_offsets(logits_lr, target)
    dev = logits_lr.device
    losses = torch.empty((n, h, w), dtype=torch.float32, device=dev)
    state = torch.zeros(STATE_SIZE, dtype=torch.int32, device=dev)
    result = torch.empty((), dtype=torch.float32, device=dev)
    hi, lo = _f64_halves(keep_ratio)
    tb = thresh_bits(thresh)
    n_prog = max(_cdiv(p, RED_BLOCK), 1)
    if p > 0:
        sh, sw = _scales((h_in, w_in), (h, w))
        _ohem_ce_up_fwd_kernel[(_cdiv(h * w, block_p * FWD_TILES), n)](
            logits_lr, target, losses, state, c, h * w, w, h_in, w_in, sh, sw, *logits_lr.stride(),
            *target.stride(), ignore_index, BLOCK_P=block_p, BLOCK_C=block_c, TILES=FWD_TILES,
            RADIX_BITS=RADIX_BITS, SLOT_N_VALID=SLOT_N_VALID, FLAT_HW=_flat_hw(target),
            num_warps=2 * warps)            # four gathered tiles live at once: twice the threads
    _select_and_reduce(losses, state, result, p, n_prog, hi, lo, tb)
    return result, losses, state


def ohem_ce_up_bwd(grad_out: torch.Tensor, logits_lr: torch.Tensor, target: torch.Tensor, losses: torch.Tensor,
                   state: torch.Tensor) -> torch.Tensor:
    """Gradient wrt the low-resolution logits (their dtype, laid out like ``empty_like``)."""
    n, c, h_in, w_in = logits_lr.shape
    h, w = target.shape[-2:]
    out = torch.empty_like(logits_lr)
    if out.numel() == 0 or h * w == 0:
        return out.zero_()
    glr = torch.zeros((n, c, h_in, w_in), dtype=torch.float32, device=logits_lr.device)
    th, tw = UP_TILE
    lh, lw = upsample_footprint((h_in, w_in), (h, w))
    sh, sw = _scales((h_in, w_in), (h, w))
    _ohem_ce_up_bwd_kernel[(_cdiv(w, tw), _cdiv(h, th), n)](
        grad_out, logits_lr, target, losses, state, glr, c, h, w, h_in, w_in, sh, sw,
        *logits_lr.stride(), *target.stride(), SLOT_N_VALID=SLOT_N_VALID, TH=th, TW=tw, LH=lh, LW=lw,
        BLOCK_C=max(triton.next_power_of_2(c), 16), num_warps=up_bwd_warps(lh, lw))
    return out.copy_(glr)


# --- what the launchers compile, for the ahead-of-time compile test -----------------------------

def upsample_kernel_specs(num_classes: int, logits_dtype: torch.dtype, size_in: tuple = (219, 219),
                          size_out: tuple = (876, 876), channels_last: bool = False) -> list:
    """``KernelSpec``s of the fused-upsampling forward and backward launches (default: the network's x4)."""
    from ifbf_fast.utils.triton_aot import KernelSpec

    block_p, block_c, warps = block_sizes(num_classes)
    lh, lw = upsample_footprint(size_in, size_out)
    lt = _TL_TYPES[logits_dtype]
    unit = "stride_lc" if channels_last else "stride_lw"
    common = {"lr_ptr": f"*{lt}", "target_ptr": "*i64", "loss_ptr": "*fp32", "state_ptr": "*i32", "C": "i32",
              "W": "i32", "h_in": "i32", "w_in": "i32", "scale_h": "fp32", "scale_w": "fp32", "stride_ln": "i32",
              "stride_lc": "i32", "stride_lh": "i32", "stride_lw": "i32", "stride_tn": "i32", "stride_th": "i32",
              "stride_tw": "constexpr", unit: "constexpr", "SLOT_N_VALID": "constexpr", "BLOCK_C": "constexpr"}
    consts = {"stride_tw": 1, unit: 1, "SLOT_N_VALID": SLOT_N_VALID}
    div = ("lr_ptr", "target_ptr", "loss_ptr", "state_ptr", "stride_ln", "stride_tn")
    fwd = KernelSpec(__name__, "_ohem_ce_up_fwd_kernel",
                     dict(common, HW="i32", ignore_index="i32", BLOCK_P="constexpr", TILES="constexpr",
                          RADIX_BITS="constexpr", FLAT_HW="constexpr"),
                     dict(consts, BLOCK_P=block_p, BLOCK_C=block_c, TILES=FWD_TILES, RADIX_BITS=RADIX_BITS,
                          FLAT_HW=True),
                     divisible_by_16=div + ("HW",), num_warps=2 * warps)
    th, tw = UP_TILE
    bwd = KernelSpec(__name__, "_ohem_ce_up_bwd_kernel",
                     dict(common, grad_out_ptr="*fp32", glr_ptr="*fp32", H="i32", TH="constexpr", TW="constexpr",
                          LH="constexpr", LW="constexpr"),
                     dict(consts, TH=th, TW=tw, LH=lh, LW=lw, BLOCK_C=max(triton.next_power_of_2(num_classes), 16)),
                     divisible_by_16=div + ("grad_out_ptr", "glr_ptr"), num_warps=up_bwd_warps(lh, lw))
    return [fwd, bwd]
