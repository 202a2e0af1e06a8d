"""Triton kernels for FBF (DESIGN section 2); the host launchers, plans and bytes model are in ``fbf.py``.

    x   = cat(high, low, dim=1)            # never materialised: every kernel takes the two parts
    w   = sigmoid(weight @ mean_hw(x) + bias)
    out = x * (1 + w[:, :, None, None])

Two launches per direction, 7 x-sizes moved in all (forward 3, backward 4):
  forward   _fbf_reduce_kernel        reads x -> partial sums; the last program of each sample sums them,
                                      and computes pooled = sum / HW and gate = sigmoid(W @ pooled + b)
            _fbf_scale_kernel         reads x, writes out = x * (1 + gate)
  backward  _fbf_reduce_kernel HAS_G  reads grad_out, x -> partial sum_hw(grad_out * x); the last program
                                      of each sample computes dz = s * w * (1 - w) and
                                      shift = (dz @ W + grad_pooled) / HW
            _fbf_scale_kernel BACKWARD  reads grad_out, writes grad_x = grad_out * (1 + gate) + shift; its
                                      first programs also write grad_weight = dz^T @ pooled and
                                      grad_bias = sum_n dz (all dz are final: they come from the previous launch)

"The last program of a sample": every program of sample n adds 1 to ``counter[n]`` after its partial
sums are stored (a barrier, then an acq_rel atomic, so the sums are visible to whoever sees the count);
the one that sees the count complete runs the (N, C)-sized epilogue and puts the counter back to 0, so
the next launch finds it zeroed without a fill. The grid enumerates samples slowest, so samples finish in
turn and only the last sample's epilogue is left at the end of the launch. The scale pass walks the
samples in reverse order: the sample the reduce read last is the one most likely still in L2.

Layouts: every tensor is addressed through its own (n, c, h, w) strides, so contiguous NCHW,
channels_last and sliced views all run without a copy. When h and w collapse into one stride for every
tensor of a launch (FLAT_HW) the kernel uses that stride; a stride equal to 1 is specialised by Triton
to a constant, which is what lets the compiler vectorise along the contiguous dimension (hw for NCHW,
c for channels_last). NCHW-dense tensors take the ROWS path: 1-D blocks over each sample's part, started
at a multiple of 16 elements, so accesses vectorise even when H*W is odd and rows start unaligned.
A tensor that holds both parts (grad_out in the backward, out in the forward) is passed once, with the
``*_AT_C0`` flag: the second part starts C0 channels in (no narrow() views on the host).
Offsets are computed in int64: N*C*H*W passes 2^31 at realistic sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _split_sums(partial_ptr, n, offs, mask, C, SPLITS):
    """sum over the splits of partial[n, :, offs] (written by other programs: read past L1)."""
    acc = tl.zeros(offs.shape, dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(partial_ptr + (n * SPLITS + s).to(tl.int64) * C + offs, mask=mask, other=0.0,
                       cache_modifier=".cg")
    return acc


@triton.jit
def _gate_epilogue(n, C, HW, SPLITS, partial_ptr, pooled_ptr, gate_ptr, w_ptr, b_ptr, stride_wo, stride_wc,
                   BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """pooled[n] = sum_splits / HW, then gate[n] = sigmoid(W @ pooled[n] + b) (the forward's epilogue)."""
    for k0 in range(0, C, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < C
        tl.store(pooled_ptr + n * C + offs, _split_sums(partial_ptr, n, offs, mask, C, SPLITS) / HW, mask=mask)
    tl.debug_barrier()                     # pooled[n] is re-read below by other threads of this program
    for o0 in range(0, C, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        mask_o = offs_o < C
        acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < C
            p = tl.load(pooled_ptr + n * C + offs_k, mask=mask_k, other=0.0, cache_modifier=".cg")
            wt = tl.load(w_ptr + offs_o[:, None] * stride_wo + offs_k[None, :] * stride_wc,
                         mask=mask_o[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            acc += wt * p[None, :]
        z = tl.sum(acc, axis=1) + tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
        tl.store(gate_ptr + n * C + offs_o, tl.sigmoid(z), mask=mask_o)


@triton.jit
def _chain_epilogue(n, C, HW, SPLITS, partial_ptr, dz_ptr, shift_ptr, gate_ptr, ggate_ptr, gpooled_ptr,
                    w_ptr, stride_wo, stride_wc, HAS_GRAD_STATS: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """dz[n] = (s + grad_gate) * w * (1 - w), then shift[n] = (dz[n] @ W + grad_pooled[n]) / HW."""
    for k0 in range(0, C, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < C
        s = _split_sums(partial_ptr, n, offs, mask, C, SPLITS)
        if HAS_GRAD_STATS:
            s += tl.load(ggate_ptr + n * C + offs, mask=mask, other=0.0)
        w = tl.load(gate_ptr + n * C + offs, mask=mask, other=0.0)
        tl.store(dz_ptr + n * C + offs, s * w * (1.0 - w), mask=mask)
    tl.debug_barrier()
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
        for o0 in range(0, C, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            mask_o = offs_o < C
            d = tl.load(dz_ptr + n * C + offs_o, mask=mask_o, other=0.0, cache_modifier=".cg")
            wt = tl.load(w_ptr + offs_o[:, None] * stride_wo + offs_k[None, :] * stride_wc,
                         mask=mask_o[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            acc += wt * d[:, None]
        t = tl.sum(acc, axis=0)
        if HAS_GRAD_STATS:
            t += tl.load(gpooled_ptr + n * C + offs_k, mask=mask_k, other=0.0)
        tl.store(shift_ptr + n * C + offs_k, t / HW, mask=mask_k)


@triton.jit
def _fbf_reduce_kernel(
    x0_ptr, x1_ptr,              # high (N, C0, H, W) and low (N, C1, H, W), any strides
    g_ptr,                       # HAS_G: grad_out (N, C0 + C1, H, W), any strides; else unused
    stats_ptr,                   # (2, N, C) fp32 [pooled | gate]: written by the forward, gate read by the backward
    scratch_ptr,                 # fp32: forward [partial (N, SPLITS, C)], backward [dz | shift | partial]
    gstats_ptr,                  # HAS_GRAD_STATS: gradient of stats (2, N, C) fp32 [grad_pooled | grad_gate]
    w_ptr, b_ptr,                # weight (C, C) (strides stride_wo, stride_wc), bias (C,) forward only
    counter_ptr,                 # (N,) int32, zero before and after every launch
    N, C0, C1, HW, W,            # sizes; HW = H * W
    SPLITS, BLOCKS_PER_SPLIT,    # hw cut into SPLITS ranges of BLOCKS_PER_SPLIT blocks of BLOCK_HW
    stride_x0n, stride_x0c, stride_x0h, stride_x0w,
    stride_x1n, stride_x1c, stride_x1h, stride_x1w,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_wo, stride_wc,
    HAS_G: tl.constexpr,         # backward: sum grad_out * x instead of x
    HAS_GRAD_STATS: tl.constexpr,
    FLAT_HW: tl.constexpr,       # h, w collapse into one stride (passed as stride_*w)
    ROWS: tl.constexpr,          # NCHW-dense parts: one (n, c) row per program, 1-D aligned blocks
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,    # the epilogue's (C, C) tiles
):
    """1-D grid N * ROWS_PER_SAMPLE * SPLITS, sample slowest, split fastest. ROWS_PER_SAMPLE is C0 + C1
    with ROWS, else cdiv(C0, BLOCK_C) + cdiv(C1, BLOCK_C)."""
    pid = tl.program_id(0)
    C = C0 + C1
    NC = N * C
    if HAS_G:
        partial_ptr = scratch_ptr + 2 * NC
    else:
        partial_ptr = scratch_ptr
    if ROWS:
        rows = C
    else:
        nb0 = tl.cdiv(C0, BLOCK_C)
        rows = nb0 + tl.cdiv(C1, BLOCK_C)
    per_n = rows * SPLITS
    n = pid // per_n
    r = pid % per_n
    row = r // SPLITS
    split = r % SPLITS
    hw_start = split * BLOCKS_PER_SPLIT * BLOCK_HW
    hw_stop = tl.minimum(hw_start + BLOCKS_PER_SPLIT * BLOCK_HW, HW)
    out = partial_ptr + (n * SPLITS + split).to(tl.int64) * C
    g1_ptr = g_ptr + tl.cast(C0, tl.int64) * stride_gc       # grad_out's channels [C0, C)
    # The two parts take separate branches (not a select of pointers and strides) so that each keeps
    # its own stride-1 specialisation, hence its own vectorisation.
    if ROWS:
        if row < C0:
            s = _reduce_row(x0_ptr, g_ptr, n, row, C0, HW, hw_start, hw_stop, stride_x0n, stride_gn,
                            HAS_G, BLOCK_HW)
        else:
            s = _reduce_row(x1_ptr, g1_ptr, n, row - C0, C1, HW, hw_start, hw_stop, stride_x1n, stride_gn,
                            HAS_G, BLOCK_HW)
        tl.store(out + row, s)
    else:
        if row < nb0:
            s, offs_c, mask_c = _reduce_part(x0_ptr, g_ptr, n, row * BLOCK_C, C0, HW, W, hw_start, hw_stop,
                                             stride_x0n, stride_x0c, stride_x0h, stride_x0w,
                                             stride_gn, stride_gc, stride_gh, stride_gw,
                                             HAS_G, FLAT_HW, BLOCK_C, BLOCK_HW)
            tl.store(out + offs_c, s, mask=mask_c)
        else:
            s, offs_c, mask_c = _reduce_part(x1_ptr, g1_ptr, n, (row - nb0) * BLOCK_C, C1, HW, W, hw_start,
                                             hw_stop, stride_x1n, stride_x1c, stride_x1h, stride_x1w,
                                             stride_gn, stride_gc, stride_gh, stride_gw,
                                             HAS_G, FLAT_HW, BLOCK_C, BLOCK_HW)
            tl.store(out + C0 + offs_c, s, mask=mask_c)
    # Every thread's stores are issued before the count (barrier); the atomic is acq_rel at GPU scope,
    # so the program that sees the count complete also sees every partial sum of its sample.
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr + n, 1, sem="acq_rel", scope="gpu")
    if done == per_n - 1:
        tl.atomic_xchg(counter_ptr + n, 0, sem="relaxed", scope="gpu")    # zero for the next launch
        if HAS_G:
            _chain_epilogue(n, C, HW, SPLITS, partial_ptr, scratch_ptr, scratch_ptr + NC, stats_ptr + NC,
                            gstats_ptr + NC, gstats_ptr, w_ptr, stride_wo, stride_wc, HAS_GRAD_STATS,
                            BLOCK_O, BLOCK_K)
        else:
            _gate_epilogue(n, C, HW, SPLITS, partial_ptr, stats_ptr, stats_ptr + NC, w_ptr, b_ptr,
                           stride_wo, stride_wc, BLOCK_O, BLOCK_K)


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
def _param_grads(pid, nprog, N, C, dz_ptr, pooled_ptr, gw_ptr, gb_ptr, BLOCK: tl.constexpr):
    """grad_weight[o, :] = sum_n dz[n, o] * pooled[n, :] and grad_bias[o] = sum_n dz[n, o] for the rows
    o = pid, pid + nprog, ...; written in the parameters' dtypes, grad_weight contiguous (C, C)."""
    for o in range(pid, C, nprog):
        for k0 in range(0, C, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < C
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for i in range(N):
                acc += tl.load(dz_ptr + i * C + o) * tl.load(pooled_ptr + i * C + offs, mask=mask, other=0.0)
            tl.store(gw_ptr + tl.cast(o, tl.int64) * C + offs, acc.to(gw_ptr.dtype.element_ty), mask=mask)
        b = tl.load(dz_ptr + o)                  # N >= 1: the launchers leave empty inputs to torch
        for i in range(1, N):
            b += tl.load(dz_ptr + i * C + o)
        tl.store(gb_ptr + o, b.to(gb_ptr.dtype.element_ty))


@triton.jit
def _fbf_scale_kernel(
    src0_ptr, src1_ptr,          # parts [0, C0) and [C0, C): forward high/low, backward grad_out (S1_AT_C0)
    dst0_ptr, dst1_ptr,          # parts written: forward out (D1_AT_C0), backward grad_high/grad_low
    stats_ptr,                   # (2, N, C) fp32 [pooled | gate], the forward reduce's
    scratch_ptr,                 # BACKWARD: the backward reduce's [dz | shift | ...], (N, C) fp32 each
    gw_ptr, gb_ptr,              # BACKWARD: grad_weight (C, C) contiguous, grad_bias (C,), parameter dtypes
    N, C0, C1, HW, W,
    stride_s0n, stride_s0c, stride_s0h, stride_s0w,
    stride_s1n, stride_s1c, stride_s1h, stride_s1w,
    stride_d0n, stride_d0c, stride_d0h, stride_d0w,
    stride_d1n, stride_d1c, stride_d1h, stride_d1w,
    BACKWARD: tl.constexpr,      # add shift[n, c]; write the parameter gradients
    S1_AT_C0: tl.constexpr,      # src1 is src0's tensor: part 1 starts at its channel C0
    D1_AT_C0: tl.constexpr,      # dst1 is dst0's tensor: part 1 starts at its channel C0
    FLAT_HW: tl.constexpr,
    ROWS: tl.constexpr,          # NCHW-dense parts, BLOCK_HW <= HW: 1-D blocks of each sample's part
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_GW: tl.constexpr,      # BACKWARD: columns of grad_weight per step
):
    """1-D grid N * (cdiv(C0, BLOCK_C) + cdiv(C1, BLOCK_C)) * cdiv(HW, BLOCK_HW), one tile each;
    with ROWS, N * (cdiv(C0 * HW, BLOCK_HW) + cdiv(C1 * HW, BLOCK_HW)) blocks of BLOCK_HW elements.
    Samples in reverse order (the last one the reduce read is the likeliest still in L2).

    dst[n, c, hw] = src[n, c, hw] * (1 + gate[n, c]) (+ shift[n, c]), fp32 math, cast at the store.
    """
    pid = tl.program_id(0)
    C = C0 + C1
    if S1_AT_C0:
        src1_ptr = src1_ptr + tl.cast(C0, tl.int64) * stride_s1c
    if D1_AT_C0:
        dst1_ptr = dst1_ptr + tl.cast(C0, tl.int64) * stride_d1c
    gate_ptr = stats_ptr + N * C
    shift_ptr = scratch_ptr + N * C
    if BACKWARD:
        _param_grads(pid, tl.num_programs(0), N, C, scratch_ptr, stats_ptr, gw_ptr, gb_ptr, BLOCK_GW)
    if ROWS:
        rb0 = tl.cdiv(tl.cast(C0, tl.int64) * HW, BLOCK_HW)
        rb = rb0 + tl.cdiv(tl.cast(C1, tl.int64) * HW, BLOCK_HW)
        n = N - 1 - pid // rb
        b = pid % rb
        if b < rb0:
            _scale_rows(src0_ptr, dst0_ptr, gate_ptr, shift_ptr, n, b * BLOCK_HW, 0, C0, C, HW,
                        stride_s0n, stride_d0n, BACKWARD, BLOCK_HW)
        else:
            _scale_rows(src1_ptr, dst1_ptr, gate_ptr, shift_ptr, n, (b - rb0) * BLOCK_HW, C0, C1, C, HW,
                        stride_s1n, stride_d1n, BACKWARD, BLOCK_HW)
    else:
        n_hw_blocks = tl.cdiv(HW, BLOCK_HW)
        nb0 = tl.cdiv(C0, BLOCK_C)
        nb = nb0 + tl.cdiv(C1, BLOCK_C)
        rowblock = pid // n_hw_blocks
        hw0 = (pid % n_hw_blocks) * BLOCK_HW
        n = N - 1 - rowblock // nb
        cb = rowblock % nb
        if cb < nb0:
            _scale_part(src0_ptr, dst0_ptr, gate_ptr, shift_ptr, n, cb * BLOCK_C, 0, C0, C, HW, W, hw0,
                        stride_s0n, stride_s0c, stride_s0h, stride_s0w,
                        stride_d0n, stride_d0c, stride_d0h, stride_d0w,
                        BACKWARD, FLAT_HW, BLOCK_C, BLOCK_HW)
        else:
            _scale_part(src1_ptr, dst1_ptr, gate_ptr, shift_ptr, n, (cb - nb0) * BLOCK_C, C0, C1, C, HW, W, hw0,
                        stride_s1n, stride_s1c, stride_s1h, stride_s1w,
                        stride_d1n, stride_d1c, stride_d1h, stride_d1w,
                        BACKWARD, FLAT_HW, BLOCK_C, BLOCK_HW)
