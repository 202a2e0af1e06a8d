"""Triton kernels of the fused OHEM cross-entropy (DESIGN section 2) and their host launchers.

Forward, one read of the logits and no host synchronisation:

1. ``_ohem_ce_fwd_kernel``: per pixel, an fp32 log-sum-exp over the classes (pixels tiled against the
   small class dimension, any strides: NCHW, channels_last, views); writes ONE fp32 per pixel
   (the loss, ``-1.0`` for ignored pixels: the sign bit marks them), counts the valid pixels and
   builds the histogram of the top radix digit of the losses' bit patterns.
2. ``_ohem_ce_radix_kernel`` (three times): the exact k-th largest loss by radix select over the
   32-bit pattern of the non-negative fp32 losses (monotone as integers), 8 bits per pass. Each
   program re-derives the digits chosen so far from the earlier histograms (4 x 256 int32, L2
   resident), so no separate "select" launches are needed.
3. ``_ohem_ce_reduce_kernel``: per-block partial sums (losses above the k-th, the hard set of
   ``thresh``); ``_ohem_ce_finalize_kernel`` (one program) adds them in fp64 in a fixed order
   (deterministic, no float atomics) and writes the result, ``1/n_kept`` and the tie weight.

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
No silent garbage, no host sync; ``ifbf_fast.ops.ohem_ce`` documents the opt-in eager check that
raises the reference's ValueError instead.

Memory: the per-pixel loss buffer (4 bytes per pixel, saved for backward), 4 KiB of histogram and
state, and 3 fp32 partials per 2048 pixels. Nothing of size (N, C, H, W) besides ``grad_logits``.
The forward is bitwise deterministic (integer atomics only, partial sums added in a fixed order).

The optional variant with the x4 bilinear upsampling of the logits fused in (``_ohem_ce_up_*``) is in
``ohem_ce_upsampled.py``; it imports the constants, the per-tile loss, the selection launches and the
host helpers from here.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

RADIX_BITS = 8
RADIX = 1 << RADIX_BITS
N_PASSES = 4                       # 4 x 8 bits = the whole fp32 pattern
# int32 state buffer: the four histograms, then scalar slots.
SLOT_N_VALID = N_PASSES * RADIX    # valid pixels
SLOT_N_POISON = SLOT_N_VALID + 1   # bad labels + NaN losses
SLOT_CUT = SLOT_N_VALID + 2        # bit pattern of the cut: losses above it are kept with weight 1
SLOT_INV_N = SLOT_N_VALID + 3      # fp32 bits: 1 / n_kept (NaN when poisoned, 0 when n_valid == 0)
SLOT_TIE_W = SLOT_N_VALID + 4      # fp32 bits: weight of a pixel whose loss equals the cut
STATE_SIZE = SLOT_N_VALID + 8

MAX_BLOCK_C = 256                  # classes held in registers; more would need an online LSE loop
FWD_TILES = 8                      # pixel tiles per forward program (aggregates the histogram atomics)
RED_BLOCK = 2048                   # loss-buffer elements per radix/reduce program
FIN_BLOCK = 1024
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
def _ohem_ce_tile_loss(x, t, valid, mask_p, offs_c, C):
    """CE of each row of the fp32 tile ``x`` [P, BLOCK_C] (-inf padding): (loss, poison).

    loss is NaN for poisoned pixels (label outside [0, C) or a NaN loss), -1.0 for ignored ones.
    """
    m = tl.max(x, axis=1)
    m = tl.where(mask_p, m, 0.0)                    # all -inf rows would give NaN below
    s = tl.where(mask_p, tl.sum(tl.exp(x - m[:, None]), axis=1), 1.0)
    # The true-class logit is selected, never addressed: a bad label cannot read out of bounds.
    x_t = tl.sum(tl.where(offs_c[None, :] == t[:, None], x, 0.0), axis=1)
    # (m - x_t) >= 0 and log(s) >= 0 (s >= 1) term by term: no cancellation against the max.
    loss = (m - x_t) + tl.log(s)
    loss = tl.where(loss <= 0.0, 0.0, loss)         # where, not maximum: keeps NaN; -0.0 -> +0.0
    poison = valid & ((t < 0) | (t >= C) | (loss != loss))
    nan = tl.full(loss.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    loss = tl.where(poison, nan, loss)
    return tl.where(valid, loss, -1.0), poison


@triton.jit
def _ohem_ce_fwd_kernel(
    logits_ptr,     # (N, C, H, W) fp32/fp16/bf16, any strides
    target_ptr,     # (N, H, W) integer class ids, any strides
    loss_ptr,       # (N*H*W,) fp32 out: CE of valid pixels (NaN if poisoned), -1.0 for ignored ones
    state_ptr,      # (STATE_SIZE,) int32, zeroed: histogram 0 and the valid/poison counters
    C, HW, W,       # classes, pixels per image (H*W, passed so that its divisibility is known), width
    stride_ln, stride_lc, stride_lh, stride_lw,   # logits strides (elements)
    stride_tn, stride_th, stride_tw,              # target strides (elements)
    ignore_index,   # label of ignored pixels
    BLOCK_P: tl.constexpr,   # pixels per tile
    BLOCK_C: tl.constexpr,   # next power of two >= C
    TILES: tl.constexpr,     # tiles per program
    RADIX_BITS: tl.constexpr,
    SLOT_N_VALID: tl.constexpr,
    FLAT_HW: tl.constexpr,   # logits' and target's H x W planes are dense
):
    """One program: TILES x BLOCK_P pixels of image ``program_id(1)``; grid (cdiv(H*W, TILES*BLOCK_P), N)."""
    RADIX: tl.constexpr = 1 << RADIX_BITS
    # int64 only for the image's base; offsets inside one image fit int32 (checked by the launcher).
    n = tl.program_id(1).to(tl.int64)
    logits_ptr += n * stride_ln
    target_ptr += n * stride_tn
    hw_total = HW
    loss_ptr += n * hw_total
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    col = offs_c * stride_lc
    hist = tl.zeros([RADIX], dtype=tl.int32)
    n_valid = tl.zeros([], dtype=tl.int32)
    n_poison = tl.zeros([], dtype=tl.int32)
    for i in range(TILES):
        offs_p = (tl.program_id(0) * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < hw_total
        t = tl.load(target_ptr + _ohem_ce_pixel_offsets(offs_p, W, stride_th, stride_tw, FLAT_HW),
                    mask=mask_p, other=ignore_index).to(tl.int64)
        valid = mask_p & (t != ignore_index)
        row = _ohem_ce_pixel_offsets(offs_p, W, stride_lh, stride_lw, FLAT_HW)
        # -inf padding is neutral for the max and the exp-sum. Ignored pixels are read too: a mask
        # that depends on the labels would stop the loads from vectorising.
        x = tl.load(logits_ptr + row[:, None] + col[None, :], mask=mask_p[:, None] & mask_c[None, :],
                    other=-float("inf")).to(tl.float32)
        loss, poison = _ohem_ce_tile_loss(x, t, valid, mask_p, offs_c, C)
        tl.store(loss_ptr + offs_p, loss, mask=mask_p)
        bits = loss.to(tl.int32, bitcast=True)
        # Masked, not sent to a dummy bin: a shared-memory atomic on one address per ignored pixel
        # would serialise (histogram's mask needs triton >= 3.4).
        hist += tl.histogram((bits >> (32 - RADIX_BITS)) & (RADIX - 1), RADIX, mask=valid)
        n_valid += tl.sum(valid.to(tl.int32))
        n_poison += tl.sum(poison.to(tl.int32))
    bins = tl.arange(0, RADIX)
    tl.atomic_add(state_ptr + bins, hist, mask=hist != 0)
    tl.atomic_add(state_ptr + SLOT_N_VALID, n_valid, mask=n_valid != 0)
    tl.atomic_add(state_ptr + SLOT_N_VALID + 1, n_poison, mask=n_poison != 0)


@triton.jit
def _ohem_ce_num_kept(state_ptr, keep_hi, keep_lo, SLOT_N_VALID: tl.constexpr):
    """k = ceil(keep_ratio * n_valid) in fp64, keep_ratio rebuilt from its bit pattern."""
    n_valid = tl.load(state_ptr + SLOT_N_VALID)
    # tl.cast, not .to(): an argument equal to 1 reaches the kernel as a Python int (Triton specialises 1)
    kr_bits = (tl.cast(keep_hi, tl.int64) << 32) | (tl.cast(keep_lo, tl.int64) & 0xFFFFFFFF)
    keep_ratio = kr_bits.to(tl.float64, bitcast=True)
    k = tl.math.ceil(keep_ratio * n_valid.to(tl.float64))
    return k.to(tl.int32), n_valid


@triton.jit
def _ohem_ce_select(state_ptr, k, PASSES: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Replay radix-select over the first PASSES histograms.

    Returns (prefix, n_greater, n_in_bin): the top ``8*PASSES`` bits of the k-th largest pattern,
    how many valid losses lie strictly above that prefix, and how many share it.
    """
    RADIX: tl.constexpr = 1 << RADIX_BITS
    bins = tl.arange(0, RADIX)
    prefix = 0
    n_greater = 0
    n_in = 0
    for p in tl.static_range(PASSES):
        hcount = tl.load(state_ptr + p * RADIX + bins)
        at_or_above = tl.sum(hcount) - tl.cumsum(hcount, 0) + hcount
        # Largest digit with at least k_rem losses at or above it (k_rem = 0 only when n_valid = 0).
        digit = tl.max(tl.where(at_or_above >= k - n_greater, bins, 0))
        n_in = tl.sum(tl.where(bins == digit, hcount, 0))
        n_greater += tl.sum(tl.where(bins == digit, at_or_above, 0)) - n_in
        prefix = (prefix << RADIX_BITS) | digit
    return prefix, n_greater, n_in


@triton.jit
def _ohem_ce_radix_kernel(
    loss_ptr,      # (P,) fp32 losses, -1.0 for ignored pixels
    state_ptr,     # (STATE_SIZE,) int32: histograms 0..PASS-1 read, histogram PASS accumulated
    P,             # number of pixels
    keep_hi, keep_lo,   # int32 halves of keep_ratio's fp64 bit pattern
    PASS: tl.constexpr,        # 1, 2 or 3
    RADIX_BITS: tl.constexpr,
    SLOT_N_VALID: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Histogram of digit PASS of the losses that match the prefix chosen by passes 0..PASS-1."""
    RADIX: tl.constexpr = 1 << RADIX_BITS
    SHIFT: tl.constexpr = 32 - RADIX_BITS * (PASS + 1)
    k, n_valid = _ohem_ce_num_kept(state_ptr, keep_hi, keep_lo, SLOT_N_VALID)
    prefix, n_greater, n_in = _ohem_ce_select(state_ptr, k, PASS, RADIX_BITS)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    bits = tl.load(loss_ptr + offs, mask=mask, other=-1.0).to(tl.int32, bitcast=True)
    # Ignored pixels (negative patterns) never match: prefix >= 0 and the shift is arithmetic.
    match = mask & ((bits >> (SHIFT + RADIX_BITS)) == prefix)
    # After the first passes few losses still match: most programs skip the histogram entirely.
    if tl.sum(match.to(tl.int32)) > 0:
        hist = tl.histogram((bits >> SHIFT) & (RADIX - 1), RADIX, mask=match)
        tl.atomic_add(state_ptr + PASS * RADIX + tl.arange(0, RADIX), hist, mask=hist != 0)


@triton.jit
def _ohem_ce_reduce_kernel(
    loss_ptr,      # (P,) fp32 losses, -1.0 for ignored pixels
    state_ptr,     # (STATE_SIZE,) int32 with all four histograms
    partial_ptr,   # (3, n_programs) fp32 out: sum above the k-th, sum of the hard set, hard count
    P,
    keep_hi, keep_lo,
    thresh_bits,   # int32 pattern of -log(thresh) as fp32 (+inf without thresh)
    n_programs,
    RADIX_BITS: tl.constexpr,
    N_PASSES: tl.constexpr,
    SLOT_N_VALID: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-program partial sums; added in a fixed order by the finalize kernel (deterministic)."""
    k, n_valid = _ohem_ce_num_kept(state_ptr, keep_hi, keep_lo, SLOT_N_VALID)
    kth_bits, n_greater, n_tied = _ohem_ce_select(state_ptr, k, N_PASSES, RADIX_BITS)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    loss = tl.load(loss_ptr + offs, mask=offs < P, other=-1.0)
    bits = loss.to(tl.int32, bitcast=True)
    above = bits > kth_bits                       # ignored (negative) patterns are never above
    hard = bits > thresh_bits
    tl.store(partial_ptr + pid, tl.sum(tl.where(above, loss, 0.0)))
    tl.store(partial_ptr + n_programs + pid, tl.sum(tl.where(hard, loss, 0.0)))
    tl.store(partial_ptr + 2 * n_programs + pid, tl.sum(hard.to(tl.float32)))


@triton.jit
def _ohem_ce_finalize_kernel(
    state_ptr,     # (STATE_SIZE,) int32: CUT, INV_N and TIE_W written here
    partial_ptr,   # (3, n_programs) fp32 from the reduce kernel
    result_ptr,    # () fp32 out: the loss
    n_programs,
    keep_hi, keep_lo,
    thresh_bits,
    RADIX_BITS: tl.constexpr,
    N_PASSES: tl.constexpr,
    SLOT_N_VALID: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: the mean over the kept set and what the backward needs to weight each pixel."""
    k, n_valid = _ohem_ce_num_kept(state_ptr, keep_hi, keep_lo, SLOT_N_VALID)
    kth_bits, n_greater, n_tied = _ohem_ce_select(state_ptr, k, N_PASSES, RADIX_BITS)
    n_poison = tl.load(state_ptr + SLOT_N_VALID + 1)
    acc_above = tl.zeros([BLOCK], dtype=tl.float64)
    acc_hard = tl.zeros([BLOCK], dtype=tl.float64)
    acc_n_hard = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n_programs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_programs
        acc_above += tl.load(partial_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        acc_hard += tl.load(partial_ptr + n_programs + offs, mask=mask, other=0.0).to(tl.float64)
        acc_n_hard += tl.load(partial_ptr + 2 * n_programs + offs, mask=mask, other=0.0).to(tl.float64)
    sum_above = tl.sum(acc_above)
    sum_hard = tl.sum(acc_hard)
    n_hard = tl.sum(acc_n_hard)
    k64 = k.to(tl.float64)
    n_take = (k - n_greater).to(tl.float64)       # copies of the k-th value in the top-k
    kth = kth_bits.to(tl.float32, bitcast=True).to(tl.float64)
    use_hard = n_hard >= k64                      # the hard set holds the top-k: keep it whole
    denom = tl.where(use_hard, n_hard, k64)
    denom = tl.where(k == 0, 1.0, denom)
    total = tl.where(use_hard, sum_hard, sum_above + n_take * kth)
    result = tl.where(k == 0, 0.0, total / denom)
    inv_n = tl.where(k == 0, 0.0, 1.0 / denom)
    tie_w = tl.where(use_hard | (k == 0), 0.0, n_take / tl.maximum(n_tied, 1).to(tl.float64))
    cut = tl.where(use_hard, thresh_bits, kth_bits)
    cut = tl.where(k == 0, 0x7FFFFFFF, cut)
    nan = tl.full([], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    result32 = tl.where(n_poison > 0, nan, result.to(tl.float32))
    inv32 = tl.where(n_poison > 0, nan, inv_n.to(tl.float32))
    tl.store(result_ptr, result32)
    tl.store(state_ptr + SLOT_N_VALID + 2, cut)
    tl.store(state_ptr + SLOT_N_VALID + 3, inv32.to(tl.int32, bitcast=True))
    tl.store(state_ptr + SLOT_N_VALID + 4, tie_w.to(tl.float32).to(tl.int32, bitcast=True))


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
    SLOT_N_VALID: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FLAT_HW: tl.constexpr,   # logits', target's and grad's H x W planes are dense
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
    cut = tl.load(state_ptr + SLOT_N_VALID + 2)
    inv_n = tl.load(state_ptr + SLOT_N_VALID + 3).to(tl.float32, bitcast=True)
    tie_w = tl.load(state_ptr + SLOT_N_VALID + 4).to(tl.float32, bitcast=True)
    g = tl.load(grad_out_ptr).to(tl.float32)
    bits = tl.load(loss_ptr + offs_p, mask=mask_p, other=-1.0).to(tl.int32, bitcast=True)
    weight = tl.where(bits > cut, 1.0, tl.where(bits == cut, tie_w, 0.0))
    coef = g * inv_n * weight            # NaN everywhere when poisoned (inv_n = NaN)
    kept = mask_p & (weight != 0.0)
    t = tl.load(target_ptr + _ohem_ce_pixel_offsets(offs_p, W, stride_th, stride_tw, FLAT_HW), mask=kept,
                other=-1).to(tl.int64)
    # Dropped and ignored pixels' logits are not read: their gradient is zero whatever they hold.
    row = _ohem_ce_pixel_offsets(offs_p, W, stride_lh, stride_lw, FLAT_HW)
    x = tl.load(logits_ptr + row[:, None] + (offs_c * stride_lc)[None, :],
                mask=kept[:, None] & mask_c[None, :], other=-float("inf")).to(tl.float32)
    m = tl.where(kept, tl.max(x, axis=1), 0.0)
    e = tl.exp(x - m[:, None])
    s = tl.where(kept, tl.sum(e, axis=1), 1.0)
    prob = e / s[:, None]
    onehot = tl.where(offs_c[None, :] == t[:, None], 1.0, 0.0)
    grad = (prob - onehot) * coef[:, None]
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
    # (int64 label, loss, masks) would otherwise spill for one or two classes (seen with triton 3.6, sm_80)
    block_p = min(max(4096 // block_c, 16), 1024)
    return block_p, block_c, 4


def _image_span(t: torch.Tensor) -> int:
    """Largest element offset inside one image (all dims but the first)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


def _flat_hw(*tensors: torch.Tensor) -> bool:
    """True when every tensor's (H, W) plane is dense: stride_h == W * stride_w."""
    return all(t.shape[-1] == 1 or t.shape[-2] == 1 or t.stride(-2) == t.shape[-1] * t.stride(-1)
               for t in tensors)


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b) for ints (triton.cdiv costs ~10 us a call through its constexpr wrapper)."""
    return -(-a // b)


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


def _select_and_reduce(losses, state, result, p, n_prog, hi, lo, tb) -> None:
    """Radix passes 1..3, the partial sums and the finalize (after a forward kernel filled pass 0)."""
    alloc = torch.empty if p > 0 else torch.zeros           # fully written by the reduce kernel
    partial = alloc((3, n_prog), dtype=torch.float32, device=losses.device)
    if p > 0:
        for pass_ in range(1, N_PASSES):
            _ohem_ce_radix_kernel[(n_prog,)](losses, state, p, hi, lo, PASS=pass_, RADIX_BITS=RADIX_BITS,
                                             SLOT_N_VALID=SLOT_N_VALID, BLOCK=RED_BLOCK, num_warps=4)
        _ohem_ce_reduce_kernel[(n_prog,)](losses, state, partial, p, hi, lo, tb, n_prog, RADIX_BITS=RADIX_BITS,
                                          N_PASSES=N_PASSES, SLOT_N_VALID=SLOT_N_VALID, BLOCK=RED_BLOCK,
                                          num_warps=4)
    _ohem_ce_finalize_kernel[(1,)](state, partial, result, n_prog, hi, lo, tb, RADIX_BITS=RADIX_BITS,
                                   N_PASSES=N_PASSES, SLOT_N_VALID=SLOT_N_VALID, BLOCK=FIN_BLOCK, num_warps=4)


def ohem_ce_fwd(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float, thresh: float,
                ignore_index: int) -> tuple:
    """Launch the forward: returns (loss () fp32, losses (N, H, W) fp32, state (STATE_SIZE,) int32).

    ``thresh < 0`` means no threshold. Arguments are assumed checked (``check_ohem_args``).
    """
    n, c, h, w = logits.shape
    p = n * h * w
    if p >= 2 ** 31:
        raise ValueError(f"ohem_ce kernels count pixels in int32; got {p} pixels")
    block_p, block_c, warps = block_sizes(c)
    _check_offsets(logits, target)
    dev = logits.device
    losses = torch.empty((n, h, w), dtype=torch.float32, device=dev)
    state = torch.zeros(STATE_SIZE, dtype=torch.int32, device=dev)
    result = torch.empty((), dtype=torch.float32, device=dev)
    hi, lo = _f64_halves(keep_ratio)
    tb = thresh_bits(thresh)
    if p == 0:   # empty batch: k = 0, the finalize kernel alone writes 0.0
        _select_and_reduce(losses, state, result, 0, 1, hi, lo, tb)
        return result, losses, state
    grid = (_cdiv(h * w, block_p * FWD_TILES), n)
    _ohem_ce_fwd_kernel[grid](
        logits, target, losses, state, c, h * w, w, *logits.stride(), *target.stride(), ignore_index,
        BLOCK_P=block_p, BLOCK_C=block_c, TILES=FWD_TILES, RADIX_BITS=RADIX_BITS,
        SLOT_N_VALID=SLOT_N_VALID, FLAT_HW=_flat_hw(logits, target), num_warps=warps)
    _select_and_reduce(losses, state, result, p, _cdiv(p, RED_BLOCK), hi, lo, tb)
    return result, losses, state


def ohem_ce_bwd(grad_out: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, losses: torch.Tensor,
                state: torch.Tensor, grad_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the backward; writes every element of ``grad_logits`` (allocated like ``logits`` if None)."""
    n, c, h, w = logits.shape
    if grad_logits is None:
        grad_logits = torch.empty_like(logits)
    if grad_logits.numel() == 0:
        return grad_logits
    block_p, block_c, warps = block_sizes(c)
    _check_offsets(logits, target, grad_logits)
    grid = (_cdiv(h * w, block_p), n)
    _ohem_ce_bwd_kernel[grid](
        grad_out, logits, target, losses, state, grad_logits, c, h * w, w,
        *logits.stride(), *target.stride(), *grad_logits.stride(),
        SLOT_N_VALID=SLOT_N_VALID, BLOCK_P=block_p, BLOCK_C=block_c,
        FLAT_HW=_flat_hw(logits, target, grad_logits), num_warps=warps)
    return grad_logits


# --- what the launchers compile, for the ahead-of-time compile test -----------------------------

_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
             torch.int32: "i32", torch.uint8: "u8", torch.int16: "i16", torch.int8: "i8"}


def kernel_specs(num_classes: int, logits_dtype: torch.dtype, target_dtype: torch.dtype = torch.int64,
                 channels_last: bool = False, aligned: bool = True) -> list:
    """``KernelSpec``s of the forward and backward launches for one input kind (see utils.triton_aot).

    Dense NCHW or channels_last inputs (the unit stride is specialised to 1 as a real launch does);
    ``aligned`` marks what a real launch at 876 x 876 marks divisible by 16 (pointers, H*W, the
    batch strides and the class stride of NCHW). The dtype-independent selection kernels are in
    :func:`select_kernel_specs`, the fused-upsampling ones in ``ohem_ce_upsampled.upsample_kernel_specs``.
    """
    from ifbf_fast.utils.triton_aot import KernelSpec

    block_p, block_c, warps = block_sizes(num_classes)
    lt, tt = _TL_TYPES[logits_dtype], _TL_TYPES[target_dtype]
    unit = "stride_lc" if channels_last else "stride_lw"
    common = {"C": "i32", "HW": "i32", "W": "i32", "stride_ln": "i32", "stride_lc": "i32", "stride_lh": "i32",
              "stride_lw": "i32", "stride_tn": "i32", "stride_th": "i32", "stride_tw": "constexpr",
              unit: "constexpr"}
    consts = {"stride_tw": 1, unit: 1, "SLOT_N_VALID": SLOT_N_VALID, "BLOCK_P": block_p, "BLOCK_C": block_c,
              "FLAT_HW": True}
    div = ["logits_ptr", "target_ptr", "HW", "stride_ln", "stride_tn"] + ([] if channels_last else ["stride_lc"])
    fwd_sig = dict(common, logits_ptr=f"*{lt}", target_ptr=f"*{tt}", loss_ptr="*fp32", state_ptr="*i32",
                   ignore_index="i32", BLOCK_P="constexpr", BLOCK_C="constexpr", TILES="constexpr",
                   RADIX_BITS="constexpr", SLOT_N_VALID="constexpr", FLAT_HW="constexpr")
    gunit = "stride_gc" if channels_last else "stride_gw"
    bwd_sig = dict(common, grad_out_ptr="*fp32", logits_ptr=f"*{lt}", target_ptr=f"*{tt}", loss_ptr="*fp32",
                   state_ptr="*i32", grad_ptr=f"*{lt}", stride_gn="i32", stride_gc="i32", stride_gh="i32",
                   stride_gw="i32", SLOT_N_VALID="constexpr", BLOCK_P="constexpr", BLOCK_C="constexpr",
                   FLAT_HW="constexpr")
    bwd_sig[gunit] = "constexpr"
    mod = __name__
    return [
        KernelSpec(mod, "_ohem_ce_fwd_kernel", fwd_sig,
                   dict(consts, TILES=FWD_TILES, RADIX_BITS=RADIX_BITS),
                   divisible_by_16=tuple(div + ["loss_ptr", "state_ptr"]) if aligned else (), num_warps=warps),
        KernelSpec(mod, "_ohem_ce_bwd_kernel", bwd_sig, dict(consts, **{gunit: 1}),
                   divisible_by_16=tuple(div + ["loss_ptr", "state_ptr", "grad_ptr", "grad_out_ptr", "stride_gn"]
                                         + ([] if channels_last else ["stride_gc"])) if aligned else (),
                   num_warps=warps),
    ]


def select_kernel_specs() -> list:
    """``KernelSpec``s of the radix, reduce and finalize launches (independent of dtype and classes)."""
    from ifbf_fast.utils.triton_aot import KernelSpec

    mod = __name__
    base = {"loss_ptr": "*fp32", "state_ptr": "*i32", "P": "i32", "keep_hi": "i32", "keep_lo": "i32",
            "RADIX_BITS": "constexpr", "SLOT_N_VALID": "constexpr", "BLOCK": "constexpr"}
    consts = {"RADIX_BITS": RADIX_BITS, "SLOT_N_VALID": SLOT_N_VALID}
    div = ("loss_ptr", "state_ptr", "P")
    specs = [KernelSpec(mod, "_ohem_ce_radix_kernel", dict(base, PASS="constexpr"),
                        dict(consts, PASS=pass_, BLOCK=RED_BLOCK), divisible_by_16=div, num_warps=4)
             for pass_ in range(1, N_PASSES)]
    specs.append(KernelSpec(mod, "_ohem_ce_reduce_kernel",
                            dict(base, partial_ptr="*fp32", thresh_bits="i32", n_programs="i32", N_PASSES="constexpr"),
                            dict(consts, N_PASSES=N_PASSES, BLOCK=RED_BLOCK),
                            divisible_by_16=div + ("partial_ptr",), num_warps=4))
    specs.append(KernelSpec(mod, "_ohem_ce_finalize_kernel",
                            {"state_ptr": "*i32", "partial_ptr": "*fp32", "result_ptr": "*fp32", "n_programs": "i32",
                             "keep_hi": "i32", "keep_lo": "i32", "thresh_bits": "i32", "RADIX_BITS": "constexpr",
                             "N_PASSES": "constexpr", "SLOT_N_VALID": "constexpr", "BLOCK": "constexpr"},
                            dict(consts, N_PASSES=N_PASSES, BLOCK=FIN_BLOCK),
                            divisible_by_16=("state_ptr", "partial_ptr", "result_ptr"), num_warps=4))
    return specs
