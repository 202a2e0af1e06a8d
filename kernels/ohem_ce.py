"""Triton kernels of the fused OHEM cross-entropy (DESIGN section 2) and their host launchers.

Forward and backward in three launches, no host synchronisation, no fill:

1. ``_ohem_ce_fwd_kernel``: per pixel, an fp32 log-sum-exp over the classes (pixels tiled against the
   small class dimension, any strides: NCHW, channels_last, views; packed channels_last pixel rows are
   loaded flat and regrouped, ``_ohem_ce_packed_load``); writes ONE fp32 per pixel (the
   loss, ``-1.0`` for ignored pixels: the sign bit marks them) and adds each valid loss to a 65,536-bin
   histogram of the top 16 of its 31 significant bits (one L2 atomic per pixel) and tracks their
   largest exponent. Its last program (a ticket counter) picks the bin that holds the k-th largest
   loss: its exponent from the histogram summed 256 bins per exponent from the largest down, then
   one of that exponent's 256 bins.
2. ``_ohem_ce_select_kernel`` (``ohem_ce_select.py``): one more pass over the L2-resident loss buffer.
   Per program: the fp64 sums of the losses above the k-th's bin and of the ``thresh`` hard set
   (stored per program, added in a fixed order: deterministic, no float atomics), and the histogram
   of the low 15 bits of the losses inside the k-th's bin, with integer per-bin sums of those bits.
   Its last program resolves the k-th largest loss exactly, adds the kept losses of that bin exactly
   (a loss inside one bin is ``base + low_bits * ulp``: a count and an int64 sum of low bits give
   their sum exactly), and writes the result and the per-call state.
3. ``_ohem_ce_bwd_kernel``: grad = (softmax - onehot) * weight / n_kept, every element written.

The histograms and counters live in a persistent per-device scratch buffer (:func:`scratch`, zeroed
once at allocation, outside any CUDA graph capture): each region is zeroed by a later pass of the
same call once it has been read (the first histogram by the select pass, the second histogram, the
counters and tickets by the last programs), so a call leaves it zero and needs no fill. Calls on one device must therefore not overlap (one stream, as
in training).

``k = ceil(keep_ratio * n_valid)`` is computed on the device in fp64, exactly as ``num_kept`` does
on the host: ``keep_ratio``'s fp64 bit pattern travels as two int32 halves (Triton would turn a
Python float argument into fp32), ``n_valid`` converts to fp64 exactly, and one IEEE multiply and a
``ceil`` follow.

Ties at the k-th largest value: the forward value takes ``k - n_greater`` copies of the k-th value,
whatever the tie. The backward gives weight 1 to every loss above the k-th and the fractional weight
``(k - n_greater) / n_tied`` to each of the ``n_tied`` pixels equal to it: tie-symmetric, and equal
to the reference's gradient whenever there is no tie at the k-th value (the reference's ``topk``
picks arbitrary tied pixels).

Labels outside ``[0, C)`` that are not ``ignore_index`` are never used as an address (the true-class
logit is picked from the loaded tile by comparison). Such a pixel, and a pixel whose loss is NaN
(NaN/inf logits), "poisons" the call: the result is NaN and so is every element of ``grad_logits``.
The state counts the bad labels (``STATE_N_BAD``) and the op returns that count as an fp32 scalar on
the device, so a trainer can name the problem without a host sync. Labels are read in their own
dtype (uint8, int32 or int64: no conversion copy).

Memory: the per-pixel loss buffer (4 bytes per pixel, saved for backward), a 32-byte state per call,
3 fp64 partials per select program, and the 387 KiB scratch per device. The forward is bitwise
deterministic (integer atomics only, partial sums added in a fixed order). ``bytes_model`` gives the
bytes each launch moves against the op's minimum.

The variant with the x4 bilinear upsampling of the logits fused in is in ``ohem_ce_upsampled.py``.
"""

from __future__ import annotations

import math
import os
import struct

import torch
import triton
import triton.language as tl

from . import cdiv as _cdiv
from ._launch import PlannedLaunch
from .ohem_ce_select import (N_PROGRAM_SLOT, RED_BLOCK, SCRATCH_SIZE, STATE_CUT, STATE_INV_N,
                             STATE_K, STATE_KTH, STATE_N_BAD, STATE_N_NAN, STATE_N_VALID, STATE_SIZE,
                             STATE_TIE_W, _STATE_CUT, _STATE_INV_N, _STATE_TIE_W, _ohem_ce_fwd_epilogue,
                             _ohem_ce_select_kernel, scratch, scratch_and_f32, select_launch)

# Recorded at import because @triton.jit decides at decoration time whether it builds interpreter
# objects (CPU tensors) or compiled kernels (CUDA tensors); ohem_ce_upsampled.py shares it.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_INTERPRETED = tl.constexpr(INTERPRETER)     # the same, for @triton.jit code (_ohem_ce_log)

__all__ = ["ohem_ce_fwd", "ohem_ce_bwd", "block_sizes", "thresh_bits", "bytes_model", "scratch",
           "STATE_SIZE", "STATE_N_VALID", "STATE_N_BAD", "STATE_N_NAN", "STATE_CUT", "STATE_INV_N",
           "STATE_TIE_W", "STATE_K", "STATE_KTH", "SCRATCH_SIZE", "RED_BLOCK", "_ohem_ce_select_kernel",
           "N_PROGRAM_SLOT"]

MAX_BLOCK_C = 256                  # classes held in registers; more would need an online LSE loop
FWD_TILES = 8                      # pixel tiles per forward program (aggregates its counters)
POS_INF_BITS = 0x7F800000
NAN_BITS = 0x7FC00000              # canonical positive NaN: sorts above +inf as an integer


@triton.jit
def _ohem_ce_pixel_offsets(offs_p, W, stride_h, stride_w, FLAT_HW: tl.constexpr):
    """int32 element offsets of pixels ``offs_p`` (flat h*W+w) inside one image.

    FLAT_HW (dense H x W plane, as in NCHW and channels_last) avoids the division and keeps the
    offsets provably contiguous for NCHW, so that loads vectorise.
    """
    if FLAT_HW:
        return offs_p * stride_w
    return (offs_p // W) * stride_h + (offs_p % W) * stride_w


@triton.jit
def _ohem_ce_packed_load(ptr, p0, n_pix, C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The fp32 [BLOCK_P, BLOCK_C] tile of pixels ``p0 ..`` of a packed channels_last image (each pixel's
    C classes contiguous, pixel after pixel): -inf past ``n_pix`` pixels and past C classes.

    The tile's BLOCK_P * C elements are contiguous: one flat load (16-byte vectors where n_pix is a
    multiple of 16 and the image 16-byte aligned, as at 876 x 876), regrouped per pixel by a gather
    (through shared memory). A [BLOCK_P, BLOCK_C] load with row stride C (19: no power of two) would
    issue one scalar load per element.
    """
    f = tl.arange(0, BLOCK_P * BLOCK_C)
    n_el = tl.minimum(n_pix - p0, BLOCK_P) * C
    flat = tl.load(ptr + p0 * C + f, mask=f < n_el)
    pix = tl.arange(0, BLOCK_P)
    cls = tl.arange(0, BLOCK_C)
    src = pix[:, None] * C + tl.minimum(cls, C - 1)[None, :]
    x = tl.reshape(tl.gather(flat, tl.reshape(src, [BLOCK_P * BLOCK_C]), 0), [BLOCK_P, BLOCK_C])
    return tl.where(((p0 + pix) < n_pix)[:, None] & (cls < C)[None, :], x.to(tl.float32), -float("inf"))


@triton.jit
def _ohem_ce_packed_store(ptr, p0, n_pix, tile, C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Store the [BLOCK_P, BLOCK_C] ``tile`` as pixels ``p0 ..`` of a packed channels_last image (the
    inverse of :func:`_ohem_ce_packed_load`: a gather into the flat order, one flat vectorised store of
    the tile's BLOCK_P * C elements; columns past C are not stored)."""
    f = tl.arange(0, BLOCK_P * BLOCK_C)
    n_el = tl.minimum(n_pix - p0, BLOCK_P) * C
    src = tl.minimum((f // C) * BLOCK_C + f % C, BLOCK_P * BLOCK_C - 1)     # C constexpr: no division
    flat = tl.gather(tl.reshape(tile, [BLOCK_P * BLOCK_C]), src, 0)
    tl.store(ptr + p0 * C + f, flat, mask=f < n_el)


@triton.jit
def _ohem_ce_labels(t):
    """Labels widened for comparisons: int64 stays int64 (2**40 + 1 must not wrap to a class id),
    narrower ones (uint8 from the loader, int32) become int32 (fewer registers)."""
    if t.dtype.primitive_bitwidth > 32:     # a compile-time test (t.dtype == tl.int64 is not one)
        return t
    else:
        return t.to(tl.int32)


@triton.jit
def _ohem_ce_exp(x, m):
    """exp(x - m) of an fp32 tile ``x`` [P, BLOCK_C] and per-row values ``m`` [P] at or above the
    row's max (the max, or the log-sum-exp: every exponent is <= 0 up to rounding) as
    ex2.approx.ftz(x * log2(e) - m * log2(e)): one FFMA and one MUFU.EX2 per element. The rounding of
    m * log2(e) is the same for a whole row: it scales the row's values alike, which a softmax
    cancels and a log-sum-exp sees as an absolute error of about |m| * 2^-24.

    tl.exp emits ex2.approx without .ftz, which ptxas wraps in a range check (a compare and two
    predicated multiplies around each MUFU.EX2) to keep subnormal results: six instructions per
    element against three, and x - m then a multiply by log2(e) is one more. Results below 2^-126
    flush to 0, which changes neither a softmax sum (>= 1) nor a probability by more than 2^-126.
    """
    return tl.math.exp2(x * 1.4426950408889634 - (m * 1.4426950408889634)[:, None])


@triton.jit
def _ohem_ce_log(s):
    """ln(s) of an fp32 softmax sum ``s`` >= 1 (or NaN) as lg2.approx.ftz(s) * ln(2): one MUFU.LG2.

    tl.log compiles to a software logarithm (a polynomial of about 25 instructions), once per pixel
    and, in a matmul tile's layout, for each pixel on each of the four threads that hold its row. The
    approximation's absolute error is about 2^-22 (PTX ISA: lg2.approx), a few fp32 ulps of a loss
    >= 0.05, far inside the kept set's separation in the tests and below bf16 logits' own rounding.
    Under the interpreter (which runs no PTX) it is the exact logarithm, as tl.exp is there.
    """
    if _INTERPRETED:
        return tl.log(s)
    else:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [s], dtype=tl.float32, is_pure=True,
                                         pack=1) * 0.6931471805599453


@triton.jit
def _ohem_ce_rcp(s):
    """1 / s of an fp32 softmax sum ``s`` >= 1 (or NaN) as rcp.approx.ftz: one MUFU.RCP, within an ulp.

    An fp32 division compiles to div.full.f32, which ptxas expands into range checks, scalings and a
    MUFU.RCP (about eight instructions); per class element in a backward (e / s) it was the largest
    part of the softmax. Under the interpreter (which runs no PTX) it is the exact quotient.
    """
    if _INTERPRETED:
        return 1.0 / s
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [s], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _ohem_ce_backward_state(state_ptr, grad_out_ptr):
    """(cut, tie_w, scale) of a backward from the forward's state: the k-th loss's bits, the weight of
    a loss tied with it, and grad_out / n_kept (NaN when the call is poisoned: inv_n is NaN)."""
    cut = tl.load(state_ptr + _STATE_CUT)
    inv_n = tl.load(state_ptr + _STATE_INV_N).to(tl.float32, bitcast=True)
    tie_w = tl.load(state_ptr + _STATE_TIE_W).to(tl.float32, bitcast=True)
    return cut, tie_w, tl.load(grad_out_ptr).to(tl.float32) * inv_n


@triton.jit
def _ohem_ce_coef(bits, cut, tie_w, scale, mask_p):
    """(coef, kept) of pixels whose forward losses have the int32 patterns ``bits``: d loss / d CE_i
    (scale for a loss above the k-th, scale * tie_w for one tied with it, 0 below; NaN everywhere
    when poisoned) and whether the pixel is kept."""
    weight = tl.where(bits > cut, 1.0, tl.where(bits == cut, tie_w, 0.0))
    return scale * weight, mask_p & (weight != 0.0)


@triton.jit
def _ohem_ce_grad_softmax(x, t, coef, kept, mask_p, offs_c):
    """:func:`_ohem_ce_grad` with the softmax computed from the tile (its max and sum), for a tile
    whose true-class logit costs a class reduction of its own (interpolated logits) and whose class
    reductions are cheap (the x4 backward's matmul layout: a quad of lanes): there it issues fewer
    instructions than the log-sum-exp (26.6 against 27.2 per pixel, Triton 3.8). Per element one
    FFMA and an ex2, a multiply, a compare, a subtract and a select; a pixel not kept gets
    coefficient 0 (e is finite where its logits are)."""
    m = tl.where(mask_p, tl.max(x, axis=1), 0.0)     # rows outside the image are all -inf: e = 0 there
    e = _ohem_ce_exp(x, m)
    coef = tl.where(kept, coef, 0.0 * coef)          # 0 * coef: NaN when poisoned
    rs = coef * _ohem_ce_rcp(tl.where(mask_p, tl.sum(e, axis=1), 1.0))
    return tl.where(offs_c[None, :] == t[:, None], e * rs[:, None] - coef[:, None], e * rs[:, None])


@triton.jit
def _ohem_ce_grad(x, x_t, bits, t, coef, kept, offs_c):
    """d loss / d x of the fp32 tile ``x`` [P, BLOCK_C] (-inf padding) from the forward's losses
    (``bits``, their int32 patterns), the true-class logits ``x_t`` [P] and :func:`_ohem_ce_coef`'s
    (coef, kept): (softmax(x) - onehot(t)) * coef for a kept pixel, 0 for any other; NaN everywhere
    when the call is poisoned (coef is NaN).

    The softmax comes from the forward's log-sum-exp, loss + x_t = m + log(sum exp(x - m)), as
    exp(x - lse): no max and no sum over the classes (each a reduction across threads or warps, per
    pixel), no reciprocal; per element one FFMA and an ex2, a multiply, a compare, a subtract and a
    select. lse carries the forward's rounding (its log is lg2.approx, about 2^-22 absolute) and that
    of the sum, a few fp32 ulps of max(|loss|, |x_t|): the probabilities' relative error, far below
    the low-precision gradient's own rounding. A pixel not kept gets lse = +inf (e = 0: its stored
    value is not a loss of these logits) and coefficient 0, so its gradient is 0 with no select per
    element (where its logits are not finite, the reference's log-softmax backward gives NaN there
    too).
    """
    lse = tl.where(kept, bits.to(tl.float32, bitcast=True) + x_t, float("inf"))
    e = _ohem_ce_exp(x, lse)
    coef = tl.where(kept, coef, 0.0 * coef)          # 0 * coef: NaN when poisoned
    g = e * coef[:, None]
    return tl.where(offs_c[None, :] == t[:, None], g - coef[:, None], g)


@triton.jit
def _ohem_ce_tile_loss(x, t, valid, mask_p, offs_c, C):
    """CE of each row of the fp32 tile ``x`` [P, BLOCK_C] (-inf padding): (loss, bad label, NaN loss),
    as :func:`_ohem_ce_pixel_loss` with the true-class logit selected from the tile."""
    # The true-class logit is selected, never addressed: a bad label cannot read out of bounds.
    x_t = tl.sum(tl.where(offs_c[None, :] == t[:, None], x, 0.0), axis=1)
    return _ohem_ce_pixel_loss(x, x_t, t, valid, mask_p, C)


@triton.jit
def _ohem_ce_pixel_loss(x, x_t, t, valid, mask_p, C):
    """CE of each row of the fp32 tile ``x`` [P, BLOCK_C] (-inf padding) whose true-class logits are
    ``x_t`` [P] (any value where t is not a class): (loss, bad label, NaN loss).

    loss is NaN for poisoned pixels (label outside [0, C) or a NaN loss), -1.0 for ignored ones.
    """
    m = tl.max(x, axis=1)
    m = tl.where(mask_p, m, 0.0)                    # all -inf rows would give NaN below
    s = tl.where(mask_p, tl.sum(_ohem_ce_exp(x, m), axis=1), 1.0)
    # (m - x_t) >= 0 and log(s) >= 0 (s >= 1) term by term: no cancellation against the max.
    loss = (m - x_t) + _ohem_ce_log(s)
    loss = tl.where(loss <= 0.0, 0.0, loss)         # where, not maximum: keeps NaN; -0.0 -> +0.0
    bad = valid & ((t < 0) | (t >= C))
    is_nan = valid & (loss != loss) & ~bad
    nan = tl.full(loss.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    loss = tl.where(bad | is_nan, nan, loss)
    return tl.where(valid, loss, -1.0), bad, is_nan


@triton.jit
def _ohem_ce_tally_zeros(BLOCK_P: tl.constexpr):
    """The forward's running tally per pixel slot, (e_hi, n_valid, n_bad, n_nan), all 0: reduced once by
    :func:`_ohem_ce_fwd_epilogue` after the tile loop (a reduction per tile is a block-wide one
    through shared memory: two barriers each)."""
    zero = tl.zeros([BLOCK_P], dtype=tl.int32)
    return zero, zero, zero, zero


@triton.jit
def _ohem_ce_tile_tally(scratch_ptr, loss, valid, bad, is_nan, e_hi, n_valid, n_bad, n_nan):
    """Add the valid losses of a tile to the 16-bit histogram and the tile to the running tally of
    :func:`_ohem_ce_tally_zeros` (the largest exponent e_hi, the valid, bad-label and NaN counts)."""
    bits = loss.to(tl.int32, bitcast=True)
    # One relaxed L2 atomic per valid pixel (65,536 bins: too many for a per-program histogram).
    tl.atomic_add(scratch_ptr + (bits >> 15), valid.to(tl.int32), mask=valid, sem="relaxed")
    # a valid loss has bits >= 0 (NaN: exponent 255); an ignored pixel's -1.0 (sign bit set) gives a
    # negative value, which the maximum (from 0) drops
    return (tl.maximum(e_hi, bits >> 23), n_valid + valid.to(tl.int32), n_bad + bad.to(tl.int32),
            n_nan + is_nan.to(tl.int32))


@triton.jit
def _ohem_ce_fwd_kernel(
    logits_ptr,     # (N, C, H, W) fp32/fp16/bf16, any strides
    target_ptr,     # (N, H, W) uint8/int32/int64 class ids, any strides
    loss_ptr,       # (N*H*W,) fp32 out: CE of valid pixels (NaN if poisoned), -1.0 for ignored ones
    scratch_ptr,    # (SCRATCH_SIZE,) int32 per-device scratch (histograms and counters; see ohem_ce_select)
    C, HW, W,       # classes, pixels per image (H*W, passed so that its divisibility is known), width
    stride_ln, stride_lc, stride_lh, stride_lw,   # logits strides (elements)
    stride_tn, stride_th, stride_tw,              # target strides (elements)
    ignore_index,   # label of ignored pixels
    keep_hi, keep_lo,   # int32 halves of keep_ratio's fp64 bit pattern (for the epilogue's k)
    n_programs,     # grid size (both axes)
    BLOCK_P: tl.constexpr,   # pixels per tile
    BLOCK_C: tl.constexpr,   # next power of two >= C
    TILES: tl.constexpr,     # tiles per program
    FLAT_HW: tl.constexpr,   # logits' and target's H x W planes are dense
    PACKED_C: tl.constexpr,  # C when the logits are packed channels_last (see _ohem_ce_packed_load), else 0
):
    """One program: TILES x BLOCK_P pixels of image ``program_id(1)``; grid (cdiv(H*W, TILES*BLOCK_P), N)."""
    # int64 only for the image's base; offsets inside one image fit int32 (checked by the launcher).
    n = tl.program_id(1).to(tl.int64)
    logits_ptr += n * stride_ln
    target_ptr += n * stride_tn
    hw_total = HW
    loss_ptr += n * hw_total
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    col = offs_c * stride_lc
    e_hi, n_valid, n_bad, n_nan = _ohem_ce_tally_zeros(BLOCK_P)
    for i in range(TILES):
        offs_p = (tl.program_id(0) * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < hw_total
        t = _ohem_ce_labels(tl.load(target_ptr + _ohem_ce_pixel_offsets(offs_p, W, stride_th, stride_tw, FLAT_HW),
                                    mask=mask_p, other=ignore_index))
        valid = mask_p & (t != ignore_index)
        # -inf padding is neutral for the max and the exp-sum. Ignored pixels are read too: a mask
        # that depends on the labels would stop the loads from vectorising.
        # The true-class logit is loaded once more per pixel (from L1: the tile was just read) at the
        # label clamped to [0, C) (an ignored or bad label reads a logit of its own pixel, and its loss
        # is replaced below): a select and a sum over the classes cost a class reduction per pixel,
        # across warps with NCHW tiles and a 5-level butterfly of shuffles with channels_last ones
        # (their classes lie along the lanes): 24.5 -> 14 and 46 -> 32 warp instructions per pixel.
        t_c = tl.minimum(tl.maximum(t, 0), C - 1).to(tl.int32)
        if PACKED_C > 0:
            x = _ohem_ce_packed_load(logits_ptr, (tl.program_id(0) * TILES + i) * BLOCK_P, hw_total, PACKED_C,
                                     BLOCK_P, BLOCK_C)
            x_t = tl.load(logits_ptr + offs_p * PACKED_C + t_c, mask=mask_p, other=0.0).to(tl.float32)
        else:
            row = _ohem_ce_pixel_offsets(offs_p, W, stride_lh, stride_lw, FLAT_HW)
            x = tl.load(logits_ptr + row[:, None] + col[None, :], mask=mask_p[:, None] & mask_c[None, :],
                        other=-float("inf")).to(tl.float32)
            x_t = tl.load(logits_ptr + row + t_c * stride_lc, mask=mask_p, other=0.0).to(tl.float32)
        loss, bad, is_nan = _ohem_ce_pixel_loss(x, x_t, t, valid, mask_p, C)
        tl.store(loss_ptr + offs_p, loss, mask=mask_p)
        e_hi, n_valid, n_bad, n_nan = _ohem_ce_tile_tally(scratch_ptr, loss, valid, bad, is_nan, e_hi, n_valid, n_bad,
                                                          n_nan)
    _ohem_ce_fwd_epilogue(scratch_ptr, e_hi, n_valid, n_bad, n_nan, keep_hi, keep_lo, n_programs)


@triton.jit
def _ohem_ce_bwd_kernel(
    grad_out_ptr,   # () fp32/any: upstream gradient of the scalar loss
    logits_ptr,     # (N, C, H, W) any strides
    target_ptr,     # (N, H, W) any strides
    loss_ptr,       # (N*H*W,) fp32 losses from the forward
    state_ptr,      # (STATE_SIZE,) int32 from the forward (CUT, INV_N, TIE_W)
    grad_ptr,       # (N, C, H, W) out, logits' dtype, own strides; every element written
    C, HW, W,       # classes, H*W, width
    stride_ln, stride_lc, stride_lh, stride_lw,
    stride_tn, stride_th, stride_tw,
    stride_gn, stride_gc, stride_gh, stride_gw,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FLAT_HW: tl.constexpr,   # logits', target's and grad's H x W planes are dense
    PACKED_C: tl.constexpr,  # C when logits and grad are packed channels_last, else 0
):
    """grad = (softmax - onehot) * grad_out * weight / n_kept; grid (cdiv(H*W, BLOCK_P), N)."""
    n = tl.program_id(1).to(tl.int64)
    logits_ptr += n * stride_ln
    target_ptr += n * stride_tn
    grad_ptr += n * stride_gn
    hw_total = HW
    loss_ptr += n * hw_total
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < hw_total
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    cut, tie_w, scale = _ohem_ce_backward_state(state_ptr, grad_out_ptr)
    bits = tl.load(loss_ptr + offs_p, mask=mask_p, other=-1.0).to(tl.int32, bitcast=True)
    coef, kept = _ohem_ce_coef(bits, cut, tie_w, scale, mask_p)      # coef NaN everywhere when poisoned
    # Loads masked by the image bounds only (not by the kept flag): they vectorise; a dropped pixel's
    # gradient is 0 through its coefficient (_ohem_ce_grad). The true-class logit as in the forward
    # (the label clamped to [0, C)), for the forward's log-sum-exp.
    t = _ohem_ce_labels(tl.load(target_ptr + _ohem_ce_pixel_offsets(offs_p, W, stride_th, stride_tw, FLAT_HW),
                                mask=mask_p, other=-1))
    t_c = tl.minimum(tl.maximum(t, 0), C - 1).to(tl.int32)
    if PACKED_C > 0:
        x = _ohem_ce_packed_load(logits_ptr, tl.program_id(0) * BLOCK_P, hw_total, PACKED_C, BLOCK_P,
                                 BLOCK_C)
        x_t = tl.load(logits_ptr + offs_p * PACKED_C + t_c, mask=mask_p, other=0.0).to(tl.float32)
    else:
        row = _ohem_ce_pixel_offsets(offs_p, W, stride_lh, stride_lw, FLAT_HW)
        x = tl.load(logits_ptr + row[:, None] + (offs_c * stride_lc)[None, :],
                    mask=mask_p[:, None] & mask_c[None, :], other=-float("inf")).to(tl.float32)
        x_t = tl.load(logits_ptr + row + t_c * stride_lc, mask=mask_p, other=0.0).to(tl.float32)
    grad = _ohem_ce_grad(x, x_t, bits, t, coef, kept, offs_c)
    if PACKED_C > 0:
        _ohem_ce_packed_store(grad_ptr, tl.program_id(0) * BLOCK_P, hw_total, grad.to(grad_ptr.dtype.element_ty),
                              PACKED_C, BLOCK_P, BLOCK_C)
    else:
        grad_row = _ohem_ce_pixel_offsets(offs_p, W, stride_gh, stride_gw, FLAT_HW)
        tl.store(grad_ptr + grad_row[:, None] + (offs_c * stride_gc)[None, :],
                 grad.to(grad_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


# --- host launchers ------------------------------------------------------------------------------

def block_sizes(num_classes: int) -> tuple:
    """(BLOCK_P, BLOCK_C, num_warps) used by the forward and backward launches for ``num_classes``."""
    block_c = max(triton.next_power_of_2(num_classes), 2)
    if block_c > MAX_BLOCK_C:
        raise ValueError(f"ohem_ce kernels hold at most {MAX_BLOCK_C} classes in registers; got {num_classes}")
    # a 4096-element tile: 32 fp32 values per thread at 4 warps; at most 1024 pixels, whose per-pixel state
    # (label, loss, masks) would otherwise spill for one or two classes (seen with triton 3.6, sm_80)
    block_p = min(max(4096 // block_c, 16), 1024)
    return block_p, block_c, 4


def _image_span(t: torch.Tensor) -> int:
    """Largest element offset inside one image (all dims but the first)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


def _flat_hw(*tensors: torch.Tensor) -> bool:
    """True when every tensor's (H, W) plane is dense: stride_h == W * stride_w."""
    return all(t.shape[-1] == 1 or t.shape[-2] == 1 or t.stride(-2) == t.shape[-1] * t.stride(-1)
               for t in tensors)




def _packed_classes(*tensors: torch.Tensor) -> int:
    """C when every (N, C, H, W) tensor is packed channels_last inside each image (class stride 1, pixel
    stride C, row stride W * C; any batch stride) and C > 1, else 0 (the kernels' PACKED_C)."""
    c = tensors[0].shape[1]
    if c < 2:
        return 0
    for t in tensors:
        _, _, h, w = t.shape
        if t.stride(1) != 1 or (w > 1 and t.stride(3) != c) or (h > 1 and t.stride(2) != w * c):
            return 0
    return c


def _check_offsets(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if _image_span(t) >= 2 ** 31:
            raise ValueError(f"ohem_ce kernels address one image with int32 offsets; a tensor of shape "
                             f"{tuple(t.shape)} and strides {t.stride()} spans more")


def _f64_halves(value: float) -> tuple:
    bits = struct.unpack("<q", struct.pack("<d", float(value)))[0]
    hi, lo = bits >> 32, bits & 0xFFFFFFFF
    return hi, lo - (1 << 32) if lo >= (1 << 31) else lo


def thresh_bits(thresh: float) -> int:
    """Bit pattern of fp32(-log(thresh)) (the fp32 value the reference compares with); +inf if < 0."""
    if thresh < 0:          # the op schema's "no threshold"
        return POS_INF_BITS
    cut = -math.log(thresh) + 0.0        # + 0.0: thresh = 1 gives +0.0, not -0.0 (a negative pattern)
    return struct.unpack("<i", struct.pack("<f", cut))[0]


# Per-call launch metadata, cached by what determines it (shapes, strides, dtypes): the host cost of a
# call is then a dict lookup, the allocations and the launches.
_FWD_META: dict = {}
_BWD_META: dict = {}
_SCALARS: dict = {}


def _scalars(keep_ratio: float, thresh: float) -> tuple:
    key = (keep_ratio, thresh)
    got = _SCALARS.get(key)
    if got is None:
        got = _SCALARS[key] = _f64_halves(keep_ratio) + (thresh_bits(thresh),)
    return got


def _fwd_meta(logits: torch.Tensor, target: torch.Tensor) -> tuple:
    key = (logits.shape, logits.stride(), target.stride())
    meta = _FWD_META.get(key)
    if meta is None:
        n, c, h, w = logits.shape
        p = n * h * w
        if p >= 2 ** 31:
            raise ValueError(f"ohem_ce kernels count pixels in int32; got {p} pixels")
        block_p, block_c, warps = block_sizes(c)
        _check_offsets(logits, target)
        grid = (_cdiv(h * w, block_p * FWD_TILES), n)
        n_prog = grid[0] * grid[1]
        consts = dict(BLOCK_P=block_p, BLOCK_C=block_c, TILES=FWD_TILES, FLAT_HW=_flat_hw(logits, target),
                      PACKED_C=_packed_classes(logits), num_warps=warps)
        meta = _FWD_META[key] = (p, grid, _cdiv(p, RED_BLOCK) if p else 1,
                                 (c, h * w, w) + tuple(logits.stride()) + tuple(target.stride()),
                                 (n_prog,), consts, ((n, h, w), (h * w, w, 1)),
                                 PlannedLaunch(_ohem_ce_fwd_kernel, grid, 4, consts))
    return meta


def ohem_ce_fwd(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float, thresh: float,
                ignore_index: int) -> tuple:
    """Launch the forward: (loss () fp32, losses (N, H, W) fp32, state (STATE_SIZE,) int32,
    bad_labels () fp32: the number of labels outside [0, C) that are not ignore_index).

    ``thresh < 0`` means no threshold. Arguments are assumed checked (``check_ohem_args``).
    """
    p, grid, n_sel, args, tail, consts, (losses_size, losses_stride), launch = _fwd_meta(logits, target)
    hi, lo, tb = _scalars(keep_ratio, thresh)
    work, f32 = scratch_and_f32(logits)
    losses = f32.new_empty_strided(losses_size, losses_stride)      # (N, H, W) fp32, row-major
    try:
        if p:
            # a PlannedLaunch (kernels/_launch.py): Triton's binding once per plan and pointer properties;
            # ignore_index and the keep-ratio / threshold bits may change between calls of one plan
            launch((logits, target, losses, work, *args, ignore_index, hi, lo, *tail), (ignore_index, hi, lo))
        out = select_launch(losses, work, p, n_sel, hi, lo, tb)
    except BaseException:
        work.zero_()            # a failed launch must not leave the scratch dirty for the next call
        raise
    return (out[0],) + (losses,) + out[1:]


def bwd_grid(shape) -> tuple:
    """The backward's grid for logits of ``shape`` (N, C, H, W): one program per BLOCK_P pixels of an image."""
    n, c, h, w = shape
    return (_cdiv(h * w, block_sizes(c)[0]), n)


def ohem_ce_bwd(grad_out: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, losses: torch.Tensor,
                state: torch.Tensor, grad_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the backward; writes every element of ``grad_logits`` (allocated like ``logits`` if None)."""
    if grad_logits is None:
        grad_logits = torch.empty_like(logits)
    key = (logits.shape, logits.stride(), target.stride(), grad_logits.stride())
    meta = _BWD_META.get(key)
    if meta is None:
        n, c, h, w = logits.shape
        block_p, block_c, warps = block_sizes(c)
        _check_offsets(logits, target, grad_logits)
        grid = bwd_grid(logits.shape)
        consts = dict(BLOCK_P=block_p, BLOCK_C=block_c, FLAT_HW=_flat_hw(logits, target, grad_logits),
                      PACKED_C=_packed_classes(logits, grad_logits), num_warps=warps)
        meta = _BWD_META[key] = (grid, n * c * h * w,
                                 (c, h * w, w) + tuple(logits.stride()) + tuple(target.stride())
                                 + tuple(grad_logits.stride()), consts,
                                 PlannedLaunch(_ohem_ce_bwd_kernel, grid, 6, consts))
    grid, numel, args, consts, launch = meta
    if numel:
        launch((grad_out, logits, target, losses, state, grad_logits, *args))
    return grad_logits


# --- the bytes model (issue 14.1): what each launch moves, against the op's minimum --------------

SMALL_BYTES = 1 << 20     # scratch, state, partial sums, scalars: L2-resident, O(1) per call


def _sizes(logits_dtype: torch.dtype, target_dtype: torch.dtype) -> tuple:
    return (torch.empty((), dtype=logits_dtype).element_size(), torch.empty((), dtype=target_dtype).element_size())


def op_minimum(pixels: int, logit_bytes: int, label_bytes: int) -> int:
    """The fewest DRAM bytes this algorithm moves for one fwd+bwd: the logits and labels read by the
    forward and again by the backward (nothing of logits' size is saved: the softmax is recomputed),
    grad_logits written once, and the one fp32 per pixel an exact selection must keep: the loss,
    written once, read by the selection and read by the backward (which must know each pixel's
    weight; recomputing it in another kernel would not be bitwise equal to the cut)."""
    return 2 * (logit_bytes + label_bytes) + logit_bytes + 12 * pixels


def bytes_model(shape, logits_dtype: torch.dtype, target_dtype: torch.dtype = torch.int64) -> dict:
    """DRAM bytes read + written by each launch of one fwd+bwd at logits ``shape`` = (N, C, H, W).

    ``launches`` maps each launch to its bytes; ``l2`` lists traffic that stays in L2 (the histogram
    atomics, one 4-byte atomic per valid pixel on 256 KiB; scratch, state and partial sums, below
    ``SMALL_BYTES``; the select programs that hold the k-th's top bin read their losses a second time,
    at most the whole buffer, just after the first), ``total`` sums the launches and ``minimum`` is :func:`op_minimum`. The
    backward reads every logit whatever the keep ratio (its loads are not masked by the kept flag).
    The forward and the backward read each pixel's true-class logit a second time, from the cache
    lines their tile has just loaded (L1): no DRAM bytes.
    """
    n, c, h, w = shape
    pixels = n * h * w
    esz, tsz = _sizes(logits_dtype, target_dtype)
    logits, labels = pixels * c * esz, pixels * tsz
    launches = {
        "_ohem_ce_fwd_kernel": logits + labels + 4 * pixels,        # logits, labels in; losses out
        "_ohem_ce_select_kernel": 4 * pixels,                        # losses in
        "_ohem_ce_bwd_kernel": logits + labels + 4 * pixels + logits,   # logits, labels, losses in; grad out
    }
    return {"launches": launches, "total": sum(launches.values()), "minimum": op_minimum(pixels, logits, labels),
            "l2": {"histogram_atomics": 4 * pixels, "scratch_and_state": SMALL_BYTES,
                   "second_histogram_reread": 4 * pixels}}
