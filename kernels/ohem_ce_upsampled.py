"""Triton kernels of the OHEM cross-entropy with the bilinear upsampling of the logits fused in, and
their host launchers (the ``ifbf_fast.ops.ohem_cross_entropy_upsampled`` fast path).

The same loss as ``ohem_ce.py`` on ``interpolate(logits, (H, W), bilinear, align_corners=False)`` of
1/4-resolution logits, interpolated on the fly, in three launches for forward and backward:

* ``_ohem_ce_up_fwd_kernel``: ``_ohem_ce_fwd_kernel`` on the interpolated logits; it fills the same
  per-pixel loss buffer and first histogram, after which the select pass of ``ohem_ce_select.py`` runs
  unchanged. At an exact x4 of fp16 / bf16 logits (the training loss) it takes 4 x 32-pixel output
  tiles aligned to the x4 pattern and interpolates each as one small tensor-core matmul, fixed exact
  bilinear weights [pixels, window] (computed once per program, ``_ohem_ce_x4_weights``) @ the tile's
  2 x 9 source window [window, classes] (``_ohem_ce_x4_window``: 0.44 warp-wide loads per output
  pixel instead of 4 for gathering each pixel's four corners; about 20 warp instructions per output
  pixel in its sm_90 SASS); other resizes and fp32 logits gather.
* ``_ohem_ce_up_bwd_kernel`` / ``_ohem_ce_up_bwd_x4_kernel``: the gradient wrt the low-resolution
  logits, written once in their dtype and layout: a program OWNS a tile of low-resolution pixels and
  gathers the contributions of every output pixel whose bilinear sources reach it (no atomics, no
  fp32 buffer, no fill, no copy; bitwise deterministic). The price: the output windows of
  neighbouring tiles overlap by the bilinear support (at x4 with 7 x 7 owned pixels, 32 x 32 output
  pixels per 28 x 28: 1.31x the output-resolution work, the re-reads mostly from L2). The gather
  kernel re-gathers four corners per pixel and class lane and applies the transposed interpolation
  as a dense fp32 matmul onto all 64 owned pixels (about 210 warp-wide instructions per output pixel
  in its sm_90 SASS: issue-bound, 0.8-1.7 ms at 4 x 19 x 876^2). At an exact x4 of fp16 / bf16 logits
  (the training loss) the x4 kernel takes it: windows aligned to the x4 pattern, so that each 4-row
  step reads two source rows with the same fixed weights (loop-invariant), recomputes the logits as a
  tensor-core matmul in the logits' dtype (exact), and scatters onto the two owned rows the step
  reaches with a second one (the gradient as two bf16 pieces: 16 significant bits per term), 26-27
  warp instructions per output pixel (``test_fused_backward_issues_few_instructions_per_output_pixel``).

What it shares (the per-tile loss, the label widening, the select launch, the argument helpers) is
imported from ``ohem_ce.py``; the ``@triton.jit`` helpers are imported into this module's globals,
where Triton resolves the names a kernel calls.
"""

from __future__ import annotations

import functools
import math
import struct

import numpy as np
import torch
import triton
import triton.language as tl

from ._launch import PlannedLaunch
from .ohem_ce import (FWD_TILES, RED_BLOCK, _cdiv, _check_offsets, _flat_hw, _ohem_ce_backward_state,
                      _ohem_ce_coef, _ohem_ce_fwd_epilogue, _ohem_ce_grad, _ohem_ce_grad_softmax, _ohem_ce_labels,
                      _ohem_ce_pixel_offsets, _ohem_ce_tally_zeros, _ohem_ce_tile_loss, _ohem_ce_tile_tally, _scalars,
                      block_sizes, scratch_and_f32, select_launch)


# --- kernels: the x4 bilinear upsampling of the logits fused into the loss -----------------------
#
# The head's logits come at 1/4 resolution and are upsampled (bilinear, align_corners=False) to the
# label size. These kernels take the low-resolution logits and interpolate on the fly, in fp32, so
# the full-resolution logits and their gradient never exist. Forward: each output pixel gathers its
# four source pixels (the low-resolution tensor is 1/16 of the full one and stays in L1/L2), or, at an
# exact x4 of fp16 / bf16 logits, a 2-D output tile is one matmul with its source window. Backward:
# a program owns OT_H x OT_W low-resolution pixels, walks the output window that reaches them in steps
# of CH rows, computes the gradient G [P, C] of those output pixels in registers and applies the
# transposed interpolation restricted to its own pixels as one small matmul, G^T @ M with M [P, L] the
# bilinear weights onto the L = LB_H x LB_W owned pixels; the [C, L] sum is stored once.

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
def _ohem_ce_x4_weights(P: tl.constexpr, WIN: tl.constexpr, KW: tl.constexpr, dtype: tl.constexpr):
    """Bilinear weights [P, 2 * KW] of an exact x4 step: P = 4 x WIN output pixels p = (rr, q) =
    (p // WIN, p % WIN) at rows 4 a - 2 + rr, columns 4 b - 2 + q of an aligned tile, onto the source
    window k = (ky, kx) = (k // KW, k % KW) at rows a - 1 + ky, columns b - 1 + kx; in ``dtype``.
    Column k = WIN // 4 + 1 (the first past the window's columns) is 1 for every pixel: it adds the
    window's padding row, which is -inf for the padded classes (:func:`_ohem_ce_x4_window`).

    At x4 (align_corners=False) output index 4 a + 2 + r (r < 4) samples source indices a and a + 1
    with weights 1 - l, l, l = (2 r + 1) / 8: the same for every aligned tile, so a kernel computes
    them once (loop-invariant). Every weight is a multiple of 1/64 (exact in fp16 and bf16), and a
    window read with clamped indices gives PyTorch's values at the image edges: where its clamped
    index repeats a source pixel, the two weights of the duplicate sum to the original's (exactly:
    each product is exact in fp32 and their sum is the pixel's value).
    """
    tl.static_assert(WIN // 4 + 1 < KW, "the window needs a spare column for its padding row")
    p = tl.arange(0, P)
    rr = p // WIN
    q = p % WIN
    ly = (2 * rr + 1).to(tl.float32) * 0.125
    lx = (2 * (q % 4) + 1).to(tl.float32) * 0.125
    k = tl.arange(0, 2 * KW)
    ky = k // KW
    kx = k % KW
    wrow = tl.where(ky[None, :] == 1, ly[:, None], 1.0 - ly[:, None])
    wcol = (tl.where(kx[None, :] == (q // 4)[:, None], 1.0 - lx[:, None], 0.0)
            + tl.where(kx[None, :] == (q // 4 + 1)[:, None], lx[:, None], 0.0))
    return tl.where((k == WIN // 4 + 1)[None, :], 1.0, wrow * wcol).to(dtype)


@triton.jit
def _ohem_ce_x4_window(lr_ptr, a, b, offs_c, mask_c, h_in, w_in, stride_c, stride_h, stride_w,
                       WIN: tl.constexpr, KW: tl.constexpr):
    """The source window [2 * KW, BLOCK_C] of :func:`_ohem_ce_x4_weights` for source rows a - 1, a and
    columns b - 1 .. b + WIN // 4 - 1, indices clamped to the image (the duplicates PyTorch's clamped
    index reads), in the logits' dtype; 0 beyond the window's WIN // 4 + 1 columns and C classes,
    except the padding row k = WIN // 4 + 1: -inf in the padded classes, so that the matmul gives
    the -inf padding a softmax needs (1 x -inf: no 0 x inf, every other row is 0 there) and no select
    per element follows it."""
    k = tl.arange(0, 2 * KW)
    ky = k // KW
    kx = k % KW
    src = (tl.minimum(tl.maximum(a - 1 + ky, 0), h_in - 1) * stride_h
           + tl.minimum(tl.maximum(b - 1 + kx, 0), w_in - 1) * stride_w)
    in_win = kx < WIN // 4 + 1
    win = tl.load(lr_ptr + src[:, None] + (offs_c * stride_c)[None, :], mask=in_win[:, None] & mask_c[None, :],
                  other=0.0)
    # -inf as a bit pattern (bf16 0xff80, fp16 0xfc00): a bf16 constant has no interpreter lowering
    neg_inf = tl.where(win.dtype.is_bf16(), -128, -1024).to(tl.int16)
    pad = (k == WIN // 4 + 1)[:, None] & ~mask_c[None, :]
    return tl.where(pad, neg_inf, win.to(tl.int16, bitcast=True)).to(win.dtype, bitcast=True)


@triton.jit
def _ohem_ce_up_fwd_kernel(
    lr_ptr,         # (N, C, h, w) low-resolution logits, any strides
    target_ptr,     # (N, H, W) uint8/int32/int64 class ids, any strides
    loss_ptr,       # (N*H*W,) fp32 out, as in _ohem_ce_fwd_kernel
    scratch_ptr,    # (SCRATCH_SIZE,) int32 per-device scratch
    C, HW, W,       # classes, output pixels per image, output width
    h_in, w_in,     # low-resolution size
    scale_h, scale_w,   # h_in / H and w_in / W (fp32, as PyTorch computes them)
    stride_ln, stride_lc, stride_lh, stride_lw,
    stride_tn, stride_th, stride_tw,
    ignore_index,
    keep_hi, keep_lo, n_programs,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr,
    FLAT_HW: tl.constexpr,   # the target's H x W plane is dense
    MMA: tl.constexpr,       # exact x4 of fp16/bf16 logits: aligned 4 x OT_W output tiles, one matmul each
    OT_W: tl.constexpr,      # MMA: output columns per tile (4 * OT_W == BLOCK_P)
    KW: tl.constexpr,        # MMA: source columns read per source row (>= OT_W // 4 + 1, a power of two)
):
    """_ohem_ce_fwd_kernel on bilinearly upsampled logits; grid (cdiv(H*W, TILES*BLOCK_P), N), or with MMA
    (cdiv((h_in + 1) * cdiv(W + 2, OT_W), TILES), N).

    MMA: tile (ty, tx) (row-major) is output rows 4 ty - 2 .. 4 ty + 1 and columns OT_W tx - 2 ..
    OT_W tx + OT_W - 3, aligned to the x4 pattern so that its 4 x OT_W pixels sample the two source
    rows ty - 1, ty and columns from OT_W tx / 4 - 1 with the same weights in every tile
    (:func:`_ohem_ce_x4_weights`, computed once per program); the logits are one matmul in their
    own dtype (products exact, fp32 sums), [P, 2 KW] weights @ the [2 KW, C] window read once. Rows
    and columns outside the image (the tiling's first two and last two) are masked; their clamped
    reads keep the values finite. A non-finite logit reaches every pixel of its tile (0 x inf is
    NaN) and poisons the call, where the gather would carry a -inf logit of a class other than a
    pixel's label into a finite loss: a network's logits are finite, a non-finite one means the step
    diverged, and the trainer's non-finite rule skips it.
    """
    n = tl.program_id(1).to(tl.int64)
    lr_ptr += n * stride_ln
    target_ptr += n * stride_tn
    loss_ptr += n * HW
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    e_hi, n_valid, n_bad, n_nan = _ohem_ce_tally_zeros(BLOCK_P)
    if MMA:
        w_x4 = _ohem_ce_x4_weights(BLOCK_P, OT_W, KW, lr_ptr.dtype.element_ty)
        rr = tl.arange(0, BLOCK_P) // OT_W
        qq = tl.arange(0, BLOCK_P) % OT_W
        # the first tile's (row, column); the next ones step along the row (no division per tile)
        tiles_w = tl.cdiv(W + 2, OT_W)
        ty = (tl.program_id(0) * TILES) // tiles_w
        tx = (tl.program_id(0) * TILES) % tiles_w
    for i in range(TILES):
        if MMA:
            oy = 4 * ty - 2 + rr
            ox = OT_W * tx - 2 + qq
            mask_p = (oy >= 0) & (oy < HW // W) & (ox >= 0) & (ox < W)
            offs_p = oy * W + ox
        else:
            offs_p = (tl.program_id(0) * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
            mask_p = offs_p < HW
        t = _ohem_ce_labels(tl.load(target_ptr + _ohem_ce_pixel_offsets(offs_p, W, stride_th, stride_tw, FLAT_HW),
                                    mask=mask_p, other=ignore_index))
        valid = mask_p & (t != ignore_index)
        if MMA:
            win = _ohem_ce_x4_window(lr_ptr, ty, tx * (OT_W // 4), offs_c, mask_c, h_in, w_in, stride_lc,
                                     stride_lh, stride_lw, OT_W, KW)
            x = tl.dot(w_x4, win)            # -inf in the padded classes (the window's padding row)
            tx += 1
            ty += (tx == tiles_w).to(tl.int32)
            tx = tl.where(tx == tiles_w, 0, tx)
        else:
            x = _ohem_ce_bilinear_tile(lr_ptr, offs_p // W, offs_p % W, mask_p, offs_c, mask_c, h_in, w_in,
                                       scale_h, scale_w, stride_lc, stride_lh, stride_lw)
        loss, bad, is_nan = _ohem_ce_tile_loss(x, t, valid, mask_p, offs_c, C)
        tl.store(loss_ptr + offs_p, loss, mask=mask_p)
        e_hi, n_valid, n_bad, n_nan = _ohem_ce_tile_tally(scratch_ptr, loss, valid, bad, is_nan, e_hi, n_valid, n_bad,
                                                          n_nan)
    _ohem_ce_fwd_epilogue(scratch_ptr, e_hi, n_valid, n_bad, n_nan, keep_hi, keep_lo, n_programs)


@triton.jit
def _ohem_ce_source_row(dst, scale, size_in):
    """i0 of :func:`_ohem_ce_source_index` alone."""
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    return tl.minimum(src.to(tl.int32), size_in - 1)


@triton.jit
def _ohem_ce_window_start(r0, scale, inv_scale, size_in):
    """First output index whose bilinear sources reach source index ``r0`` (i1 >= r0, i.e. i0 >= r0 - 1).

    An estimate from the inverse map, lowered by 2 and raised step by step with the exact map the
    kernels use (so the window never misses a contributing pixel, whatever the fp32 rounding).
    """
    est = tl.maximum(((r0.to(tl.float32) - 0.5) * inv_scale - 0.5).to(tl.int32) - 2, 0)
    for _ in tl.static_range(4):
        est = tl.where(_ohem_ce_source_row(est, scale, size_in) < r0 - 1, est + 1, est)
    return tl.where(r0 == 0, 0, est)


@triton.jit
def _ohem_ce_up_bwd_kernel(
    grad_out_ptr,   # () upstream gradient of the scalar loss
    lr_ptr,         # (N, C, h, w) low-resolution logits, any strides
    target_ptr,     # (N, H, W) any strides
    loss_ptr,       # (N*H*W,) fp32 losses from the forward
    state_ptr,      # (STATE_SIZE,) int32 from the forward
    glr_ptr,        # (N, C, h, w) out, the logits' dtype, own strides: every element written once
    C, H, W, h_in, w_in, scale_h, scale_w,
    inv_scale_h, inv_scale_w,               # H / h_in and W / w_in (fp32; only for the window estimate)
    stride_ln, stride_lc, stride_lh, stride_lw,
    stride_tn, stride_th, stride_tw,
    stride_gn, stride_gc, stride_gh, stride_gw,
    OT_H: tl.constexpr, OT_W: tl.constexpr,     # low-resolution pixels owned per program
    LB_H: tl.constexpr, LB_W: tl.constexpr,     # their power-of-two bounds (>= 4: tl.dot)
    WIN_H: tl.constexpr, WIN_W: tl.constexpr,   # output window that reaches them (from the launcher)
    CH: tl.constexpr,                           # window rows per step (CH * WIN_W pixels)
    BLOCK_C: tl.constexpr,                      # >= 16 (tl.dot)
):
    """grad wrt the low-resolution logits; grid (cdiv(w_in, OT_W), cdiv(h_in, OT_H), N)."""
    n = tl.program_id(2).to(tl.int64)
    lr_ptr += n * stride_ln
    target_ptr += n * stride_tn
    loss_ptr += n * H * W
    glr_ptr += n * stride_gn
    r0 = tl.program_id(1) * OT_H
    c0 = tl.program_id(0) * OT_W
    ys = _ohem_ce_window_start(r0, scale_h, inv_scale_h, h_in)
    xs = _ohem_ce_window_start(c0, scale_w, inv_scale_w, w_in)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_l = tl.arange(0, LB_H * LB_W)
    ly = (offs_l // LB_W)[None, :]
    lx = (offs_l % LB_W)[None, :]
    cut, tie_w, scale = _ohem_ce_backward_state(state_ptr, grad_out_ptr)
    offs = tl.arange(0, CH * WIN_W)
    acc = tl.zeros([BLOCK_C, LB_H * LB_W], dtype=tl.float32)
    for i in range(WIN_H // CH):
        Y = ys + i * CH + offs // WIN_W
        X = xs + offs % WIN_W
        mask_p = (Y < H) & (X < W)
        bits = tl.load(loss_ptr + Y * W + X, mask=mask_p, other=-1.0).to(tl.int32, bitcast=True)
        coef, kept = _ohem_ce_coef(bits, cut, tie_w, scale, mask_p)      # coef NaN everywhere when poisoned
        t = _ohem_ce_labels(tl.load(target_ptr + Y * stride_th + X * stride_tw, mask=mask_p, other=-1))
        x = _ohem_ce_bilinear_tile(lr_ptr, Y, X, mask_p, offs_c, mask_c, h_in, w_in, scale_h, scale_w,
                                   stride_lc, stride_lh, stride_lw)
        x_t = tl.sum(tl.where(offs_c[None, :] == t[:, None], x, 0.0), axis=1)
        grad = _ohem_ce_grad(x, x_t, bits, t, coef, kept, offs_c)
        # M[p, l]: bilinear weight of owned source pixel l for output pixel p (0 if it does not reach it).
        y0, y1, wy1 = _ohem_ce_source_index(Y, scale_h, h_in)
        x0, x1, wx1 = _ohem_ce_source_index(X, scale_w, w_in)
        wy = (tl.where((y0 - r0)[:, None] == ly, (1.0 - wy1)[:, None], 0.0)
              + tl.where((y1 - r0)[:, None] == ly, wy1[:, None], 0.0))       # y1 == y0 at the border: adds
        wx = (tl.where((x0 - c0)[:, None] == lx, (1.0 - wx1)[:, None], 0.0)
              + tl.where((x1 - c0)[:, None] == lx, wx1[:, None], 0.0))
        interp = tl.where(mask_p[:, None], wy * wx, 0.0)                      # [P, L]
        acc += tl.dot(tl.trans(grad), interp, input_precision="ieee")         # [BLOCK_C, L]
    r = r0 + ly
    c = c0 + lx
    own = (ly < OT_H) & (lx < OT_W) & (r < h_in) & (c < w_in)
    dst = glr_ptr + (offs_c * stride_gc)[:, None] + r * stride_gh + c * stride_gw
    tl.store(dst, acc.to(glr_ptr.dtype.element_ty), mask=mask_c[:, None] & own)


@triton.jit
def _ohem_ce_up_bwd_x4_kernel(
    grad_out_ptr,   # () upstream gradient of the scalar loss
    lr_ptr,         # (N, C, h, w) fp16 / bf16 low-resolution logits, any strides; (H, W) = (4 h, 4 w)
    target_ptr,     # (N, H, W) any strides
    loss_ptr,       # (N*H*W,) fp32 losses from the forward
    state_ptr,      # (STATE_SIZE,) int32 from the forward
    glr_ptr,        # (N, C, h, w) out, the logits' dtype, own strides: every element written once
    C, H, W, h_in, w_in, scale_w,           # scale_w = fp32(w_in / W) = 0.25 (the columns' clamped map)
    stride_ln, stride_lc, stride_lh, stride_lw,
    stride_tn, stride_th, stride_tw,
    stride_gn, stride_gc, stride_gh, stride_gw,
    OT: tl.constexpr,                           # low-resolution rows / columns owned per program (7)
    BLOCK_C: tl.constexpr,                      # 16..64
):
    """grad wrt the low-resolution logits at an exact x4; grid (cdiv(w_in, OT), cdiv(h_in, OT), N).

    A program owns rows r0 .. r0 + OT - 1 and columns c0 .. c0 + OT - 1 and walks the output window
    4 r0 - 2 .. 4 r0 + 4 OT + 1 (and likewise in x) in OT + 1 steps of 4 rows x 32 columns. At x4,
    output row 4 a + 2 + rr (rr < 4) samples source rows a and a + 1 with weights 1 - ly, ly, ly =
    (2 rr + 1) / 8, the same for every step: the recompute weights [P, 2 x 16] (two source rows x 16
    columns) and the transposed-interpolation weights onto the owned columns are computed once. Per
    step: the recompute is one matmul in the logits' dtype (weights multiples of 1/64: exact products,
    fp32 sums; clamped reads at the image edges, where PyTorch's clamped index puts the same value);
    the gradient [P, C] in fp32; then one matmul [2 C, P] @ [P, 2 x 8] of the gradient's two bf16
    pieces, stacked as rows (row piece x BLOCK_C + c), onto the two owned rows the step reaches,
    interleaved by column (column 2 lx + half): half 0, row r0 + i - 1, is complete, its two pieces
    summed and stored; half 1, row r0 + i, is carried into the next step's accumulator. Stacking the
    pieces along M instead of K halves the weights' operand and, at BLOCK_C = 32 (M = 64), lets sm_90
    run it as one warp-group matmul with no register shuffle of the gradient operand. The row above
    the image folds into row 0 and the one below into row h_in - 1 (their clamped aliases); columns
    use PyTorch's clamped map per pixel.

    The next step's recompute is issued at the end of a step (a loop-carried value): with both
    matmuls in one step, Triton lays the second out as a chain of the first (all 8 warps along its
    32 rows, each 4x redundant: 64 instead of 16 tensor-core instructions per warp and step).
    """
    WIN: tl.constexpr = 4 * (OT + 1)            # output rows / columns of the window (32)
    P: tl.constexpr = 4 * WIN                   # output pixels per step: 4 rows of the window
    LW: tl.constexpr = 8                        # owned columns, padded (>= OT + 1)
    KW: tl.constexpr = 16                       # source columns read per source row (OT + 2 <= 16)
    n = tl.program_id(2).to(tl.int64)
    lr_ptr += n * stride_ln
    target_ptr += n * stride_tn
    loss_ptr += n * H * W
    glr_ptr += n * stride_gn
    r0 = tl.program_id(1) * OT
    c0 = tl.program_id(0) * OT
    cut, tie_w, scale = _ohem_ce_backward_state(state_ptr, grad_out_ptr)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    # step pixel p = (row rr, column q) of the window's rows 4 (r0 + i) - 2 + rr, columns 4 c0 - 2 + q:
    # its sources are rows r0 + i - 1 and r0 + i with weights 1 - ly, ly, ly = (2 rr + 1) / 8 (exact x4);
    # the recompute weights [P, 2 * KW] onto those rows x columns c0 - 1 + kx (_ohem_ce_x4_weights)
    p = tl.arange(0, P)
    rr = p // WIN
    q = p % WIN
    X = 4 * c0 - 2 + q
    ly = (2 * rr + 1).to(tl.float32) * 0.125
    w_rec = _ohem_ce_x4_weights(P, WIN, KW, lr_ptr.dtype.element_ty)
    # transposed weights onto owned columns c0 + lx, PyTorch's clamped map per pixel (borders exact)
    x0, x1, wx1 = _ohem_ce_source_index(X, scale_w, w_in)
    lx = tl.arange(0, LW)[None, :]
    wx = (tl.where((x0 - c0)[:, None] == lx, (1.0 - wx1)[:, None], 0.0)
          + tl.where((x1 - c0)[:, None] == lx, wx1[:, None], 0.0))            # [P, LW]
    wx = tl.where((X >= 0)[:, None], wx, 0.0)
    b0 = wx * (1.0 - ly)[:, None]                                            # onto row r0 + i - 1
    b1 = wx * ly[:, None]                                                    # onto row r0 + i
    # B [P, 2 * LW], column 2 * lx + half: half 0 onto row r0 + i - 1, half 1 onto row r0 + i (bilinear
    # weights, multiples of 1/64: exact in bf16)
    bw = tl.reshape(tl.join(b0, b1), (P, 2 * LW)).to(tl.bfloat16)
    lxs = tl.arange(0, LW)[None, :]
    c = c0 + lxs
    own_c = mask_c[:, None] & (lxs < OT) & (c < w_in)
    dst_c = glr_ptr + (offs_c * stride_gc)[:, None] + c * stride_gw
    acc = tl.zeros([2 * BLOCK_C, 2 * LW], dtype=tl.float32)
    zero = tl.zeros([2 * BLOCK_C, LW], dtype=tl.float32)
    x_next = tl.dot(w_rec, _ohem_ce_x4_window(lr_ptr, r0, c0, offs_c, mask_c, h_in, w_in, stride_lc, stride_lh,
                                              stride_lw, WIN, KW))
    for i in range(OT + 1):
        Y = 4 * (r0 + i) - 2 + rr
        mask_p = (Y >= 0) & (Y < H) & (X >= 0) & (X < W)
        bits = tl.load(loss_ptr + Y * W + X, mask=mask_p, other=-1.0).to(tl.int32, bitcast=True)
        coef, kept = _ohem_ce_coef(bits, cut, tie_w, scale, mask_p)      # coef NaN everywhere when poisoned
        t = _ohem_ce_labels(tl.load(target_ptr + Y * stride_th + X * stride_tw, mask=mask_p, other=-1))
        # the padded classes are -inf (the window's padding row): the softmax gives 0 there
        grad = _ohem_ce_grad_softmax(x_next, t, coef, kept, mask_p, offs_c)
        hi = grad.to(tl.bfloat16)
        lo = (grad - hi.to(tl.float32)).to(tl.bfloat16)
        a = tl.reshape(tl.permute(tl.join(hi, lo), (2, 1, 0)), (2 * BLOCK_C, P))     # row piece * BLOCK_C + c
        out = tl.dot(a, bw, acc)
        done, cur = tl.split(tl.reshape(out, (2 * BLOCK_C, LW, 2)))
        done += tl.where(r0 + i == h_in, cur, 0.0)                                # the row below the image
        r = r0 + i - 1
        total = tl.sum(tl.reshape(done, (2, BLOCK_C, LW)), axis=0)
        tl.store(dst_c + r * stride_gh, total.to(glr_ptr.dtype.element_ty), mask=own_c & (i > 0) & (r < h_in))
        cur += tl.where((i == 0) & (r0 == 0), done, 0.0)                          # the row above the image
        acc = tl.reshape(tl.join(cur, zero), (2 * BLOCK_C, 2 * LW))
        x_next = tl.dot(w_rec, _ohem_ce_x4_window(lr_ptr, r0 + i + 1, c0, offs_c, mask_c, h_in, w_in, stride_lc,
                                                  stride_lh, stride_lw, WIN, KW))


# --- host launchers ------------------------------------------------------------------------------

UP_TILE = (8, 8)             # (TH, TW): the footprint rule below (which resizes are fused) is stated for it
UP_MAX_FOOTPRINT = 32        # LH * LW source pixels an 8 x 8 output tile may touch
UP_WINDOW = 32               # output rows/columns a backward program's window spans (more for large factors)
UP_MAX_OWNED = 8             # low-resolution rows/columns a backward program owns, at most
UP_PIXELS = 32               # output pixels per step of the backward (CH x WIN_W): one 32-wide row at x4
UP_BWD_WARPS = 8             # sm_80 AOT: 4 warps x 64 pixels spilled 6 KB; 8 x 32: 117 registers, 45 KB shared


def upsample_footprint(size_in: tuple, size_out: tuple) -> tuple:
    """(LH, LW): power-of-two bounds of the source rows/columns an 8 x 8 output tile touches."""
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


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _scales(size_in: tuple, size_out: tuple) -> tuple:
    # fp32(in / out), what PyTorch's area_pixel_compute_scale gives for an explicit output size.
    return _f32(size_in[0] / size_out[0]), _f32(size_in[1] / size_out[1])


def _source_rows(size_in: int, size_out: int, scale: float) -> list:
    """i0 of every output index as the kernels compute it, with and without a fused multiply-add."""
    y = np.arange(size_out, dtype=np.float32) + np.float32(0.5)
    plain = y * np.float32(scale) - np.float32(0.5)
    fused = (y.astype(np.float64) * np.float64(np.float32(scale)) - 0.5).astype(np.float32)
    return [np.minimum(np.maximum(v, 0).astype(np.int64), size_in - 1) for v in (plain, fused)]


@functools.lru_cache(maxsize=64)
def backward_tiling(size_in: int, size_out: int) -> tuple:
    """(owned, window): the most low-resolution indices (<= UP_MAX_OWNED) a backward program can own along
    one axis with every contributing output index inside a power-of-two window (UP_WINDOW, or the
    smallest that holds one owned index at large factors); exact for the kernels' fp32 map."""
    scale = _f32(size_in / size_out)
    rows = _source_rows(size_in, size_out, scale)

    def widest(owned):
        need = 0
        for i0 in rows:
            i1 = np.minimum(i0 + 1, size_in - 1)
            for r0 in range(0, size_in, owned):
                last = min(r0 + owned, size_in) - 1
                first = int(np.searchsorted(i1, r0, side="left"))        # i1 >= r0 (monotone)
                end = int(np.searchsorted(i0, last, side="right")) - 1   # i0 <= last
                need = max(need, end - first + 1)
        return need

    for owned in range(UP_MAX_OWNED, 0, -1):
        if widest(owned) <= UP_WINDOW:
            return owned, UP_WINDOW
    return 1, triton.next_power_of_2(widest(1))


_UP_FWD_META: dict = {}
_UP_BWD_META: dict = {}


def ohem_ce_up_fwd(logits_lr: torch.Tensor, target: torch.Tensor, keep_ratio: float, thresh: float,
                   ignore_index: int) -> tuple:
    """Forward on ``interpolate(logits_lr, target's size, bilinear)`` without materialising it:
    (loss, losses (N, H, W), state, bad_labels) as ``ohem_ce_fwd``."""
    # the dtype too: fp16 / bf16 logits may take the matmul path (forward_mma), fp32 ones do not
    key = (logits_lr.shape, logits_lr.stride(), target.shape, target.stride(), logits_lr.dtype)
    meta = _UP_FWD_META.get(key)
    if meta is None:
        n, c, h_in, w_in = logits_lr.shape
        h, w = target.shape[-2:]
        p = n * h * w
        if p >= 2 ** 31:
            raise ValueError(f"ohem_ce kernels count pixels in int32; got {p} pixels")
        block_p, block_c, warps = block_sizes(c)
        _check_offsets(logits_lr, target)
        mma = forward_mma((h_in, w_in), (h, w), c, logits_lr.dtype)
        tiles = forward_tiles((h_in, w_in), (h, w), mma) if mma["MMA"] else _cdiv(h * w, block_p)
        grid = (_cdiv(tiles, FWD_TILES), n)
        n_prog = grid[0] * grid[1]
        # four gathered tiles live at once: twice the threads
        consts = dict(BLOCK_P=block_p, BLOCK_C=block_c, TILES=FWD_TILES, FLAT_HW=_flat_hw(target), **mma,
                      num_warps=2 * warps)
        meta = _UP_FWD_META[key] = (
            p, grid, max(_cdiv(p, RED_BLOCK), 1),
            (c, h * w, w, h_in, w_in) + _scales((h_in, w_in), (h, w)) + tuple(logits_lr.stride())
            + tuple(target.stride()),
            (n_prog,), consts, ((n, h, w), (h * w, w, 1)), PlannedLaunch(_ohem_ce_up_fwd_kernel, grid, 4, consts))
    p, grid, n_sel, args, tail, consts, (losses_size, losses_stride), launch = meta
    hi, lo, tb = _scalars(keep_ratio, thresh)
    work, f32 = scratch_and_f32(logits_lr)
    losses = f32.new_empty_strided(losses_size, losses_stride)      # (N, H, W) fp32, row-major
    try:
        if p:
            launch((logits_lr, target, losses, work, *args, ignore_index, hi, lo, *tail), (ignore_index, hi, lo))
        out = select_launch(losses, work, p, n_sel, hi, lo, tb)
    except BaseException:
        work.zero_()
        raise
    return (out[0], losses) + out[1:]


MMA_FACTOR = 4          # the exact upsampling factor of the forward's matmul path (the network's x4)


def forward_mma(size_in: tuple, size_out: tuple, num_classes: int, dtype: torch.dtype) -> dict:
    """The forward's MMA constexprs (``MMA`` False: the per-pixel gather of the four corners).

    The matmul path takes exact x4 resizes of fp16 / bf16 logits (bilinear weights multiples of 1/64,
    exact in the logits' own dtype) with 16 to 64 class lanes (tl.dot's sizes: at least 16, and
    BLOCK_P >= 64 output pixels); fp32 logits would be rounded by the tensor core, so they gather.
    Its tiles are 4 output rows x OT_W = BLOCK_P / 4 columns; each reads KW >= OT_W / 4 + 1 source
    columns of two source rows.
    """
    block_p, block_c, _ = block_sizes(num_classes)
    off = dict(MMA=False, OT_W=1, KW=16)
    if (dtype not in (torch.float16, torch.bfloat16) or not 16 <= block_c <= 64
            or tuple(size_out) != (MMA_FACTOR * size_in[0], MMA_FACTOR * size_in[1])):
        return off
    ot_w = block_p // MMA_FACTOR
    return dict(MMA=True, OT_W=ot_w, KW=triton.next_power_of_2(ot_w // MMA_FACTOR + 1))


def forward_tiles(size_in: tuple, size_out: tuple, mma: dict) -> int:
    """Output tiles of the forward's matmul path per image: (h_in + 1) rows of tiles (output rows
    4 ty - 2 .. 4 ty + 1) x cdiv(W + 2, OT_W) (columns from OT_W tx - 2)."""
    return (size_in[0] + 1) * _cdiv(size_out[1] + 2, mma["OT_W"])


def backward_launch(size_in: tuple, size_out: tuple, num_classes: int) -> dict:
    """Constexprs and warps of the backward launch for one resize (also used by the AOT test)."""
    oh, wh = backward_tiling(size_in[0], size_out[0])
    ow, ww = backward_tiling(size_in[1], size_out[1])
    lb_h, lb_w = max(triton.next_power_of_2(oh), 4), max(triton.next_power_of_2(ow), 4)
    return dict(OT_H=oh, OT_W=ow, LB_H=lb_h, LB_W=lb_w, WIN_H=wh, WIN_W=ww, CH=max(UP_PIXELS // ww, 1),
                BLOCK_C=max(triton.next_power_of_2(num_classes), 16), num_warps=UP_BWD_WARPS)


X4_OWNED = 7                 # the x4 backward: low-resolution rows / columns a program owns (32-wide windows)
X4_WARPS = 8
# up to 32 class lanes: capped at 128 registers, two 8-warp blocks per SM without spills (Triton 3.8
# uncapped: 108 on sm_90, 154 on sm_80, which has no wgmma: one block); 64 lanes would spill under it.
X4_MAXNREG = 128


def backward_x4(size_in: tuple, size_out: tuple, num_classes: int, dtype: torch.dtype,
                arch: int | None = 90) -> dict | None:
    """The x4 backward's launch options (``_ohem_ce_up_bwd_x4_kernel``), or None where the gather
    backward (``backward_launch``) takes the resize: an exact x4 of fp16 / bf16 logits (the training
    loss) with 16 to 64 class lanes. fp32 logits keep the gather: the recompute's matmul would round
    them (fp16 / bf16 values and the x4 weights are exact in the logits' own dtype). ``arch``: the
    device's compute capability (major * 10 + minor; None under the interpreter): a CUDA device
    gets the register cap."""
    block_c = max(triton.next_power_of_2(num_classes), 16)
    if (dtype not in (torch.float16, torch.bfloat16) or block_c > 64
            or tuple(size_out) != (MMA_FACTOR * size_in[0], MMA_FACTOR * size_in[1])):
        return None
    opts = dict(OT=X4_OWNED, BLOCK_C=block_c, num_warps=X4_WARPS)
    if arch is not None and block_c <= 32:
        opts["maxnreg"] = X4_MAXNREG
    return opts


def _arch(t: torch.Tensor) -> int | None:
    if not t.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def ohem_ce_up_bwd(grad_out: torch.Tensor, logits_lr: torch.Tensor, target: torch.Tensor, losses: torch.Tensor,
                   state: torch.Tensor) -> torch.Tensor:
    """Gradient wrt the low-resolution logits (their dtype, laid out like ``empty_like``), one launch."""
    out = torch.empty_like(logits_lr)
    # the dtype too: fp16 / bf16 logits at an exact x4 take the x4 kernel (backward_x4), fp32 ones do not
    key = (logits_lr.shape, logits_lr.stride(), target.shape, target.stride(), out.stride(), logits_lr.dtype)
    meta = _UP_BWD_META.get(key)
    if meta is None:
        n, c, h_in, w_in = logits_lr.shape
        h, w = target.shape[-2:]
        _check_offsets(logits_lr, target, out)
        strides = tuple(logits_lr.stride()) + tuple(target.stride()) + tuple(out.stride())
        # the plan assumes one GPU architecture per process (the register cap depends on it)
        x4 = backward_x4((h_in, w_in), (h, w), c, logits_lr.dtype, _arch(logits_lr))
        if x4 is not None:
            grid = (_cdiv(w_in, x4["OT"]), _cdiv(h_in, x4["OT"]), n)
            args = (c, h, w, h_in, w_in, _scales((h_in, w_in), (h, w))[1]) + strides
            launch = PlannedLaunch(_ohem_ce_up_bwd_x4_kernel, grid, 6, x4)
        else:
            consts = backward_launch((h_in, w_in), (h, w), c)
            grid = (_cdiv(w_in, consts["OT_W"]), _cdiv(h_in, consts["OT_H"]), n)
            args = (c, h, w, h_in, w_in) + _scales((h_in, w_in), (h, w)) + (_f32(h / h_in), _f32(w / w_in)) + strides
            launch = PlannedLaunch(_ohem_ce_up_bwd_kernel, grid, 6, consts)
        meta = _UP_BWD_META[key] = (out.numel() > 0 and h * w > 0, args, launch)
    run, args, launch = meta
    if not run:
        return out.zero_() if out.numel() else out
    launch((grad_out, logits_lr, target, losses, state, out, *args))
    return out


# --- the bytes model (issue 14.1) ----------------------------------------------------------------

def bytes_model(lowres_shape, size_out, logits_dtype: torch.dtype, target_dtype: torch.dtype = torch.int64) -> dict:
    """DRAM bytes of each launch of one fused fwd+bwd (see ``ohem_ce.bytes_model``), at low-resolution
    logits ``lowres_shape`` = (N, C, h, w) upsampled to ``size_out`` = (H, W).

    Each byte is counted once per launch: the forward's source windows (matmul path) or four bilinear
    gathers per output pixel and the backward's overlapping windows re-read low-resolution logits,
    labels and losses that neighbouring programs (running at the same time) have just brought into L2;
    those re-reads are listed under ``l2`` (forward at x4: an aligned 4 x 32 output tile reads 2 x 9
    source pixels where it owns 1 x 8, 2.25x the low-resolution logits, the gather 64x; backward at x4 with
    7 x 7 owned pixels a window is 32 x 32 output pixels per 28 x 28 owned: 1.31x the labels and
    losses, 81 / 49 of the low-resolution logits).
    """
    from .ohem_ce import SMALL_BYTES, _sizes, op_minimum

    n, c, h_in, w_in = lowres_shape
    pixels = n * size_out[0] * size_out[1]
    esz, tsz = _sizes(logits_dtype, target_dtype)
    logits, labels = n * c * h_in * w_in * esz, pixels * tsz
    consts = backward_launch((h_in, w_in), tuple(size_out), c)
    ot_h, ot_w, win_h, win_w = consts["OT_H"], consts["OT_W"], consts["WIN_H"], consts["WIN_W"]
    grid = _cdiv(h_in, ot_h) * _cdiv(w_in, ot_w) * n
    window_pixels = grid * win_h * win_w
    # the x4 kernel (fp16 / bf16 at an exact x4) tiles the backward like the gather: 7 x 7 owned, 32 x 32
    bwd = ("_ohem_ce_up_bwd_x4_kernel" if backward_x4((h_in, w_in), tuple(size_out), c, logits_dtype) is not None
           else "_ohem_ce_up_bwd_kernel")
    launches = {
        "_ohem_ce_up_fwd_kernel": logits + labels + 4 * pixels,
        "_ohem_ce_select_kernel": 4 * pixels,
        bwd: logits + labels + 4 * pixels + logits,
    }
    halo = (ot_h + 2) * (ot_w + 2) / (ot_h * ot_w)
    mma = forward_mma((h_in, w_in), tuple(size_out), c, logits_dtype)
    # low-resolution logits read per one owned: the matmul path's window (two source rows x
    # OT_W / 4 + 1 columns per tile of 4 x OT_W output pixels: 1 x OT_W / 4 source pixels' worth), or
    # four corners per output pixel
    fwd_reads = (2 * (mma["OT_W"] // MMA_FACTOR + 1) / (mma["OT_W"] // MMA_FACTOR) if mma["MMA"]
                 else 4 * pixels / max(n * h_in * w_in, 1))
    return {"launches": launches, "total": sum(launches.values()), "minimum": op_minimum(pixels, logits, labels),
            "l2": {"histogram_atomics": 4 * pixels, "scratch_and_state": SMALL_BYTES,
                   "second_histogram_reread": 4 * pixels,
                   "bwd_window_overlap": max(window_pixels - pixels, 0) * (tsz + 4),
                   "bwd_logits_halo": int(logits * (halo - 1)),
                   "fwd_window_overlap": int(logits * max(fwd_reads - 1, 0.0))}}
