"""The exact top-k selection of the fused OHEM cross-entropy: the per-device scratch, the forward
kernel's last-program epilogue and the select pass (see ``ohem_ce.py`` for the whole op).

The non-negative fp32 losses are ordered as their 31-bit integer patterns. The k-th largest is found
in two digits: the top 16 bits (the exponent and 8 mantissa bits; histogram built by the forward
kernel, 65,536 bins; its last program sums it per exponent, 256 fine bins each, from the largest
exponent down, then reads the 256 fine bins of the chosen exponent), then the low 15 bits of the
losses inside that bin (histogram built by the select pass, with a 128-bin coarse level and
per-coarse-bin int64 sums of the low bits).

Sums are exact and deterministic: the losses of the bins above the k-th's bin are added per select
program in fp64 and the per-program sums in a fixed order by the last program; inside the k-th's
bin every loss is ``base + low * ulp`` (one exponent), so their sum is ``count * base + sum(low) *
ulp`` from integer counts and sums, with no rounding besides the final fp64 ones.

Scratch layout (int32 words; all zero between calls: each pass resets what it used, without a fill
launch):

    FINE1    65,536  top-16-bit histogram        (forward kernel adds; select pass zeroes)
    FINE2    32,768  low-15-bit histogram        (select pass adds; its last program zeroes the
                                                  256-word rows whose coarse count is not 0)
    C2_CNT      128  its coarse level (7 bits)   (select pass adds; its last program zeroes)
    C2_SUM      256  128 int64 sums of low bits  (same)
    SLOTS        16  counters, tickets, the first digit, the largest exponent (epilogues read and
                     reset them)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import PlannedLaunch

FINE1 = 0
FINE2 = FINE1 + 65536
C2_CNT = FINE2 + 32768
C2_SUM = C2_CNT + 128                 # even: 8-byte aligned int64 words
SLOTS = C2_SUM + 256
SCRATCH_SIZE = SLOTS + 16
ZERO1_END = FINE2                     # [0, ZERO1_END): zeroed by the select pass
# S_EHI: the largest exponent (bits >> 23) of a valid loss (an atomic maximum from 0, the scratch's
# resting value)
S_N_VALID, S_N_BAD, S_N_NAN, S_TICKET1, S_TICKET2, S_D1, S_NG1, S_EHI = range(SLOTS, SLOTS + 8)
N_PROGRAM_SLOT = S_TICKET1            # tests read the tickets back as zero

# The per-call state (int32), fully written by the select pass's last program.
STATE_N_VALID, STATE_N_BAD, STATE_N_NAN, STATE_CUT, STATE_INV_N, STATE_TIE_W, STATE_K, STATE_KTH = range(8)
STATE_SIZE = 8

RED_BLOCK = 4096                      # loss-buffer elements per select program
ZERO_BLOCK = 1024                     # words zeroed per program and step (grid-stride)
FIN_BLOCK = 512                       # partial sums added per step by the last program (registers: see
                                      # _ohem_ce_second_histogram)
HIST_CHUNK = 1024                     # losses per step of the second histogram (4 per thread at 8 warps)
EXP_ROWS = 8                          # exponents summed per step by the forward's last program ([8, 256]
                                      # fine bins: 16 registers per thread at 4 warps; with 16, ptxas of
                                      # Triton 3.6 spilled in the epilogue of the 93-register ohem_ce forward)

# The same numbers as Triton constexprs: a @triton.jit function may only read constexpr globals.
_FINE1, _FINE2, _C2_CNT, _C2_SUM, _SLOTS, _ZERO1_END = (
    tl.constexpr(v) for v in (FINE1, FINE2, C2_CNT, C2_SUM, SLOTS, ZERO1_END))
_S_N_VALID, _S_N_BAD, _S_N_NAN, _S_TICKET1, _S_TICKET2, _S_D1, _S_NG1, _S_EHI = (
    tl.constexpr(v) for v in (S_N_VALID, S_N_BAD, S_N_NAN, S_TICKET1, S_TICKET2, S_D1, S_NG1, S_EHI))
_EXP_ROWS = tl.constexpr(EXP_ROWS)
_STATE_N_VALID, _STATE_N_BAD, _STATE_N_NAN, _STATE_CUT, _STATE_INV_N, _STATE_TIE_W, _STATE_K, _STATE_KTH = (
    tl.constexpr(v) for v in range(8))
_ZERO_BLOCK, _FIN_BLOCK, _HIST_CHUNK = tl.constexpr(ZERO_BLOCK), tl.constexpr(FIN_BLOCK), tl.constexpr(HIST_CHUNK)

_SCRATCH: dict = {}
_F32: dict = {}
_PARTIALS: dict = {}
_SELECT_LAUNCH: dict = {}


# The per-device buffers are keyed by device index (-1: the CPU, under the interpreter): the launchers
# look them up by Tensor.get_device(), an integer, where Tensor.device builds an object per call.

def _index(device: torch.device) -> int:
    if device.type == "cpu":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def scratch(device: torch.device) -> torch.Tensor:
    """The zeroed per-device scratch, allocated on first use (outside any CUDA graph capture)."""
    key = _index(device)
    buf = _SCRATCH.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("ohem_cross_entropy: the first call on a device must run outside CUDA graph "
                               "capture (it allocates and zeroes the kernels' scratch); run one step eagerly "
                               "(torch.compile's reduce-overhead warm-up does) before capturing")
        buf = _SCRATCH[key] = torch.zeros(SCRATCH_SIZE, dtype=torch.int32, device=device)
        _F32[key] = torch.empty(1, dtype=torch.float32, device=device)
    return buf


def scratch_and_f32(like: torch.Tensor) -> tuple:
    """``(scratch of like's device, a one-element fp32 tensor on it)``: the second is the template the
    launchers allocate their fp32 outputs from with ``Tensor.new_empty_strided`` (no dtype or device
    argument to parse: about half the host cost of ``torch.empty``); never read or written."""
    key = like.get_device()
    f32 = _F32.get(key)
    if f32 is None:
        scratch(like.device)
        f32 = _F32[key]
    return _SCRATCH[key], f32


@triton.jit
def _ohem_ce_num_kept(n_valid, keep_hi, keep_lo):
    """k = ceil(keep_ratio * n_valid) in fp64, keep_ratio rebuilt from its bit pattern."""
    # tl.cast, not .to(): an argument equal to 1 reaches the kernel as a Python int (Triton specialises 1)
    kr_bits = (tl.cast(keep_hi, tl.int64) << 32) | (tl.cast(keep_lo, tl.int64) & 0xFFFFFFFF)
    keep_ratio = kr_bits.to(tl.float64, bitcast=True)
    return tl.math.ceil(keep_ratio * n_valid.to(tl.float64)).to(tl.int32)


@triton.jit
def _ohem_ce_pick(cnt, bins, above, k):
    """Largest bin of ``cnt`` at or above which lie >= k losses (``above`` lie in higher bins).

    Returns (bin, losses strictly above it incl. ``above``, losses in it). k <= above is not
    expected (k = 0 only when there is no valid loss; any bin is then fine).
    """
    at_or_above = above + tl.sum(cnt) - tl.cumsum(cnt, 0) + cnt
    digit = tl.max(tl.where(at_or_above >= k, bins, 0))
    n_in = tl.sum(tl.where(bins == digit, cnt, 0))
    n_greater = tl.sum(tl.where(bins == digit, at_or_above, 0)) - n_in
    return digit, n_greater, n_in


@triton.jit
def _ohem_ce_ticket(scratch_ptr, slot):
    """Count this program as done; the returned ticket is n_programs - 1 for the last one.

    The barrier makes every thread's atomics and stores happen before the ticket (acq_rel, GPU
    scope); the last program then sees them all (its loads use .cg: L2, not a stale L1).
    """
    tl.debug_barrier()
    ticket = tl.atomic_add(scratch_ptr + slot, 1, sem="acq_rel")
    tl.debug_barrier()
    return ticket


@triton.jit
def _ohem_ce_fwd_epilogue(scratch_ptr, e_hi, n_valid, n_bad, n_nan, keep_hi, keep_lo, n_programs):
    """End of a forward program: flush its counters and the largest exponent of its valid losses,
    reduced from its per-pixel-slot tally (``ohem_ce._ohem_ce_tile_tally``; e_hi 0 without a valid
    loss); the last program picks the top-16-bit bin of the k-th largest loss (slots D1, NG1).

    The last program finds the k-th's exponent first: each exponent's count is the sum of its 256
    fine bins, summed EXP_ROWS exponents at a time from the largest down until k losses lie at or
    above them (0.75 of a network's losses span about 10-15 exponents: two steps of 8 KiB from L2; at
    most 32 steps). A per-tile exponent histogram in the forward's loop (tl.histogram) cost 1.4 warp
    instructions per pixel with Triton 3.8 and about 10 with 3.6 (ballots and popcounts), and a
    256-bin atomic flush per program.
    """
    e_hi, n_valid, n_bad, n_nan = tl.max(e_hi), tl.sum(n_valid), tl.sum(n_bad), tl.sum(n_nan)
    tl.atomic_add(scratch_ptr + _S_N_VALID, n_valid, mask=n_valid != 0, sem="relaxed")
    tl.atomic_add(scratch_ptr + _S_N_BAD, n_bad, mask=n_bad != 0, sem="relaxed")
    tl.atomic_add(scratch_ptr + _S_N_NAN, n_nan, mask=n_nan != 0, sem="relaxed")
    tl.atomic_max(scratch_ptr + _S_EHI, e_hi, mask=e_hi != 0, sem="relaxed")
    if _ohem_ce_ticket(scratch_ptr, _S_TICKET1) == n_programs - 1:
        n_tot = tl.load(scratch_ptr + _S_N_VALID, cache_modifier=".cg")
        k = _ohem_ce_num_kept(n_tot, keep_hi, keep_lo)
        top = tl.load(scratch_ptr + _S_EHI, cache_modifier=".cg")
        bins = tl.arange(0, 256)
        rows = tl.arange(0, _EXP_ROWS)
        hist = tl.zeros([256], dtype=tl.int32)
        seen = tl.zeros([], dtype=tl.int32)
        while (seen < k) & (top >= 0):
            r = top - rows                                                     # exponents top, top - 1, ..
            part = tl.load(scratch_ptr + _FINE1 + (r * 256)[:, None] + bins[None, :], mask=(r >= 0)[:, None],
                           other=0, cache_modifier=".cg")
            count = tl.sum(part, axis=1)                                       # [EXP_ROWS]
            hist += tl.sum(tl.where(bins[None, :] == r[:, None], count[:, None], 0), axis=0)
            seen += tl.sum(count)
            top -= _EXP_ROWS
        e, ng_e, _ = _ohem_ce_pick(hist, bins, 0, k)
        fine = tl.load(scratch_ptr + _FINE1 + e * 256 + bins, cache_modifier=".cg")
        f, ng1, _ = _ohem_ce_pick(fine, bins, ng_e, k)
        tl.store(scratch_ptr + _S_D1, e * 256 + f)
        tl.store(scratch_ptr + _S_NG1, ng1)
        tl.store(scratch_ptr + _S_EHI, 0)
        tl.store(scratch_ptr + _S_TICKET1, 0)


@triton.jit
def _ohem_ce_second_histogram(loss_ptr, scratch_ptr, start, P, d1, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Add the losses of the k-th's top bin among ``loss[start:start + BLOCK]`` to the second histogram.

    The block's losses are read again, CHUNK at a time (the program has just read them: L1 or L2 hits,
    no DRAM traffic), instead of reusing the registers of the streaming pass. The atomics take a 64-bit
    address per element; three sets of them for all BLOCK / threads elements at once set the register
    count of the whole kernel: 149 registers at 8 warps, one block per SM (ptxas, sm_90). Chunked, with
    the last program's partial sums added FIN_BLOCK = 512 at a time and the hard count summed in int32,
    the kernel takes 60 (64 on sm_80, no spills): four blocks per SM, 64 KiB of loads in flight per SM
    instead of 16 (tests/ops/test_ohem_ce_aot.py).
    """
    sums = (scratch_ptr + _C2_SUM).to(tl.pointer_type(tl.int64))
    for c in range(0, BLOCK, CHUNK):
        offs = start + c + tl.arange(0, CHUNK)
        bits = tl.load(loss_ptr + offs, mask=offs < P, other=-1.0).to(tl.int32, bitcast=True)
        match = (bits >> 15) == d1
        low = bits & 0x7FFF
        ones = match.to(tl.int32)
        tl.atomic_add(scratch_ptr + _FINE2 + low, ones, mask=match, sem="relaxed")
        tl.atomic_add(scratch_ptr + _C2_CNT + (low >> 8), ones, mask=match, sem="relaxed")
        tl.atomic_add(sums + (low >> 8), low.to(tl.int64), mask=match, sem="relaxed")


@triton.jit
def _ohem_ce_select_kernel(
    loss_ptr,      # (P,) fp32 losses, -1.0 for ignored pixels
    scratch_ptr,   # (SCRATCH_SIZE,) int32 scratch: first histogram and digit from the forward
    partial_ptr,   # (>= 3 * n_programs,) fp64 scratch: sums above the k-th's bin, of the hard set, hard counts
    state_ptr,     # (STATE_SIZE,) int32 out: the per-call state (see STATE_*)
    result_ptr,    # () fp32 out: the loss
    bad_ptr,       # () fp32 out: labels outside [0, C) that are not ignore_index
    P,             # number of pixels
    keep_hi, keep_lo,   # int32 halves of keep_ratio's fp64 bit pattern
    thresh_bits,   # int32 pattern of -log(thresh) as fp32 (+inf without thresh)
    zero_steps,    # grid-stride steps that zero the first histogram: cdiv(ZERO1_END, n_programs * ZERO_BLOCK)
    BLOCK: tl.constexpr,
):
    """Second digit and partial sums; the last program writes the result and the state."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    d1 = tl.load(scratch_ptr + _S_D1)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    loss = tl.load(loss_ptr + offs, mask=offs < P, other=-1.0)
    bits = loss.to(tl.int32, bitcast=True)
    top = bits >> 15                              # ignored (negative) patterns stay negative
    hard = bits > thresh_bits
    tl.store(partial_ptr + pid, tl.sum(tl.where(top > d1, loss, 0.0).to(tl.float64)))
    tl.store(partial_ptr + n_programs + pid, tl.sum(tl.where(hard, loss, 0.0).to(tl.float64)))
    tl.store(partial_ptr + 2 * n_programs + pid, tl.sum(hard.to(tl.int32)).to(tl.float64))
    if tl.sum((top == d1).to(tl.int32)) > 0:      # only the programs that hold the k-th's bin
        _ohem_ce_second_histogram(loss_ptr, scratch_ptr, pid.to(tl.int64) * BLOCK, P, d1, BLOCK, _HIST_CHUNK)
    zoffs = tl.arange(0, _ZERO_BLOCK)
    for j in range(zero_steps):
        start = (pid + j * n_programs) * _ZERO_BLOCK
        tl.store(scratch_ptr + start + zoffs, tl.zeros([_ZERO_BLOCK], tl.int32), mask=start + zoffs < _ZERO1_END)
    if _ohem_ce_ticket(scratch_ptr, _S_TICKET2) == n_programs - 1:
        _ohem_ce_finalize(scratch_ptr, partial_ptr, state_ptr, result_ptr, bad_ptr, n_programs, d1,
                          keep_hi, keep_lo, thresh_bits)


@triton.jit
def _ohem_ce_finalize(scratch_ptr, partial_ptr, state_ptr, result_ptr, bad_ptr, n_programs, d1,
                      keep_hi, keep_lo, thresh_bits):
    """The last select program: the exact k-th loss, the kept sum, the state; resets the slots and the
    second histogram (so that a call leaves the whole scratch zero)."""
    n_valid = tl.load(scratch_ptr + _S_N_VALID, cache_modifier=".cg")
    n_bad = tl.load(scratch_ptr + _S_N_BAD, cache_modifier=".cg")
    n_nan = tl.load(scratch_ptr + _S_N_NAN, cache_modifier=".cg")
    ng1 = tl.load(scratch_ptr + _S_NG1, cache_modifier=".cg")
    k = _ohem_ce_num_kept(n_valid, keep_hi, keep_lo)
    cbins = tl.arange(0, 128)
    c2cnt = tl.load(scratch_ptr + _C2_CNT + cbins, cache_modifier=".cg")
    c2sum = tl.load((scratch_ptr + _C2_SUM).to(tl.pointer_type(tl.int64)) + cbins, cache_modifier=".cg")
    c2, ng_c, _ = _ohem_ce_pick(c2cnt, cbins, ng1, k)
    fbins = tl.arange(0, 256)
    fine = tl.load(scratch_ptr + _FINE2 + c2 * 256 + fbins, cache_modifier=".cg")
    d2, n_greater, n_tied = _ohem_ce_pick(fine, fbins, ng_c, k)
    # Losses of the k-th's top bin above the k-th: their count and the sum of their low 15 bits.
    low_sum = (tl.sum(tl.where(cbins > c2, c2sum, 0))
               + tl.sum(tl.where(fbins > d2, fine.to(tl.int64) * (c2 * 256 + fbins).to(tl.int64), 0)))
    cnt_in = n_greater - ng1
    kth_bits = (d1 << 15) | (c2 << 8) | d2
    base = (d1 << 15).to(tl.float32, bitcast=True).to(tl.float64)
    ulp = ((d1 << 15) | 1).to(tl.float32, bitcast=True).to(tl.float64) - base
    in_bin = tl.where(cnt_in > 0, cnt_in.to(tl.float64) * base + low_sum.to(tl.float64) * ulp, 0.0)
    acc_above = tl.zeros([_FIN_BLOCK], dtype=tl.float64)
    acc_hard = tl.zeros([_FIN_BLOCK], dtype=tl.float64)
    acc_n_hard = tl.zeros([_FIN_BLOCK], dtype=tl.float64)
    for start in range(0, n_programs, _FIN_BLOCK):
        offs = start + tl.arange(0, _FIN_BLOCK)
        mask = offs < n_programs
        acc_above += tl.load(partial_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        acc_hard += tl.load(partial_ptr + n_programs + offs, mask=mask, other=0.0, cache_modifier=".cg")
        acc_n_hard += tl.load(partial_ptr + 2 * n_programs + offs, mask=mask, other=0.0, cache_modifier=".cg")
    sum_above = tl.sum(acc_above) + in_bin
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
    poisoned = (n_bad + n_nan) > 0
    tl.store(result_ptr, tl.where(poisoned, nan, result.to(tl.float32)))
    tl.store(bad_ptr, n_bad.to(tl.float32))
    tl.store(state_ptr + _STATE_N_VALID, n_valid)
    tl.store(state_ptr + _STATE_N_BAD, n_bad)
    tl.store(state_ptr + _STATE_N_NAN, n_nan)
    tl.store(state_ptr + _STATE_CUT, cut)
    tl.store(state_ptr + _STATE_INV_N, tl.where(poisoned, nan, inv_n.to(tl.float32)).to(tl.int32, bitcast=True))
    tl.store(state_ptr + _STATE_TIE_W, tie_w.to(tl.float32).to(tl.int32, bitcast=True))
    tl.store(state_ptr + _STATE_K, k)
    tl.store(state_ptr + _STATE_KTH, kth_bits)
    sl = tl.arange(0, 16)
    tl.store(scratch_ptr + _SLOTS + sl, tl.zeros([16], tl.int32))     # counters, tickets, digit
    # The second histogram back to zero: the other select programs are done (ticket), and this
    # program's reads of it above come first (barrier). Only rows that received a loss are written:
    # the losses of the k-th's top bin, usually far fewer than the 32,768 words.
    tl.debug_barrier()
    rows = tl.arange(0, 16)
    for r0 in range(0, 128, 16):
        cnt = tl.load(scratch_ptr + _C2_CNT + r0 + rows, cache_modifier=".cg")
        words = (r0 + rows)[:, None] * 256 + fbins[None, :]
        tl.store(scratch_ptr + _FINE2 + words, tl.zeros([16, 256], tl.int32), mask=(cnt != 0)[:, None])
    tl.debug_barrier()
    tl.store(scratch_ptr + _C2_CNT + cbins, tl.zeros([128], tl.int32))
    tl.store((scratch_ptr + _C2_SUM).to(tl.pointer_type(tl.int64)) + cbins, tl.zeros([128], tl.int64))


def zero_steps(words: int, n_programs: int) -> int:
    """Grid-stride steps for ``n_programs`` to zero ``words`` scratch words, ZERO_BLOCK at a time."""
    return -(-words // (n_programs * ZERO_BLOCK))


def partials(like: torch.Tensor, n_programs: int) -> torch.Tensor:
    """Per-device buffer (``like``'s device) of the select programs' partial sums (3 fp64 per program;
    each call writes every element it reads, so it needs no zeroing); grown, never per call, outside
    graph capture."""
    key = like.get_device()
    buf = _PARTIALS.get(key)
    if buf is None or buf.numel() < 3 * n_programs:
        device = like.device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("ohem_cross_entropy: a new input size inside CUDA graph capture needs a larger "
                               "partial-sum buffer; run one step of this size eagerly before capturing")
        buf = _PARTIALS[key] = torch.empty(3 * n_programs, dtype=torch.float64, device=device)
    return buf


def select_launch(losses: torch.Tensor, work: torch.Tensor, p: int, n_programs: int, hi: int, lo: int,
                  tb: int) -> tuple:
    """Launch the select pass (after a forward kernel, or alone for an empty batch):
    returns (loss () fp32, state (STATE_SIZE,) int32, bad_labels () fp32)."""
    launch = _SELECT_LAUNCH.get(n_programs)
    if launch is None:
        launch = _SELECT_LAUNCH[n_programs] = (PlannedLaunch(_ohem_ce_select_kernel, (n_programs,), 6,
                                                             dict(BLOCK=RED_BLOCK, num_warps=8)),
                                               zero_steps(ZERO1_END, n_programs))
    # The per-call outputs from tensors of their dtypes on the device (int32 scratch, fp32 losses):
    # new_empty_strided parses no dtype or device.
    state = work.new_empty_strided((STATE_SIZE,), (1,))
    result = losses.new_empty_strided((), ())
    bad = losses.new_empty_strided((), ())
    # p (the pixel count) is not in this plan's key, and hi / lo / tb come from the call's keep ratio and
    # threshold: all four are per-call scalars of the PlannedLaunch (kernels/_launch.py)
    launch[0]((losses, work, partials(losses, n_programs), state, result, bad, p, hi, lo, tb, launch[1]),
              (p, hi, lo, tb))
    return result, state, bad
