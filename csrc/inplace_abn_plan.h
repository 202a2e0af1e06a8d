// Launch plans and the bytes model of InPlace-ABN's CUDA kernels, in plain C++ (no CUDA, no ATen).
//
// The CUDA launchers (inplace_abn_launch.cuh) take their grids, vector widths and partial-state counts
// from plan_reduce / plan_map below, and the kernels (inplace_abn_kernels.cuh) split every NCS row with
// row_split: the same functions are compiled into the CPU build and exposed to Python
// (ifbf_fast._C.abn_launch_model, ifbf_fast.ops.inplace_abn.launch_model), so that the tests check on
// the CPU what a GPU launch does: programs and waves on 132 SMs, the bytes each launch moves against the
// op's minimum, and that the head / body / tail split covers every element of a row exactly once.
//
// Work decomposition (the H200 needs about 3 MB in flight to reach its copy bandwidth):
// * NCS (contiguous (N, C, S)): a warp owns a unit, one chunk of kWarp * unroll vectors of one row;
//   each lane issues kLoads = 4 independent 16-byte loads (unroll = 4 per tensor, or 2 each of y, dy). The first chunk of a row also takes
//   the row's unaligned head and tail (fewer than VEC elements each) with scalar accesses, so that odd
//   H * W (438^2, 219^2, 110^2, 55^2) vectorise like the rest. A reduce writes one partial state per
//   unit: channel c gets N * chunks of them (no block reduction, no atomics: deterministic).
// * NSC (channels last, (M, C) with M = N * S): a thread owns VEC adjacent channels (one 16-byte access
//   per row) and `unroll` rows per iteration (kLoads independent loads in all); blocks of BX x BY
//   threads, a grid of channel tiles x row tiles. A reduce writes one partial per (channel, block row).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "inplace_abn_common.h"

namespace ifbf {
namespace plan {

constexpr int kThreads = 256;  // threads per block, every kernel
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int kLoads = 4;  // independent 16-byte loads per thread in every hot loop, all tensors together
// Accesses per thread and tensor per iteration: 4 for a pass over one tensor, 2 each over two (y, dy).
IFBF_HD constexpr int unroll_for(int tensors) { return kLoads / tensors; }
// Vectors per NCS warp unit.
IFBF_HD constexpr int64_t unit_vecs(int tensors) { return int64_t{kWarp} * unroll_for(tensors); }
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGridY = 65535;
constexpr int kHbmLatencyWaves = 2;  // the elementwise NSC grid: 2 waves of resident blocks

enum Kind : int { kReduceNCS = 0, kReduceNSC = 1, kCombine = 2, kMapNCS = 3, kMapNSC = 4, kEval = 5 };

// Blocks per SM each kernel is compiled for (__launch_bounds__(kThreads, blocks_per_sm(kind))): the register
// cap 65536 / (kThreads * blocks) that the SASS test checks. The NCS kernels fit 80 registers (bf16 spilled
// at 64), the combine and evaluation kernels 64; the NSC
// ones hold VEC channels of constants (and state) per thread and need up to 128 (bf16 statistics: 8
// float64 pairs of state and 8 float64 shifts; bf16 elu maps spill at 80). 2 blocks of 256 threads with
// 4 16-byte loads each still keep 32 KB per SM in flight (4.2 MB on 132 SMs).
IFBF_HD constexpr int blocks_per_sm(int kind) { return kind == kReduceNSC || kind == kMapNSC ? 2 : (kind == kCombine || kind == kEval ? 4 : 3); }

// NCS row split. `start` is the row's first element counted from a 16-byte boundary (only start mod vec
// matters, vec a power of two): `head` scalars up to the next boundary, `body` vectors of vec elements,
// `tail` scalars after them; head + vec * body + tail == S, head < vec, tail < vec.
template <typename index_t>
struct RowSplit {
  index_t head, body, tail;
};

template <typename index_t>
IFBF_HD RowSplit<index_t> row_split(index_t start, index_t S, int vec) {
  const index_t mis = start & index_t(vec - 1);
  index_t head = (index_t(vec) - mis) & index_t(vec - 1);
  head = head < S ? head : S;
  const index_t body = (S - head) / vec;
  return {head, body, S - head - body * vec};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Launch {
  int kind;
  int vec;                // elements per access (1: scalar)
  int64_t grid_x, grid_y;
  int block_x, block_y;
  int64_t chunks;         // NCS: warp units per row
  int64_t groups;         // reduce: partial states per channel (the combine's G)
  int unroll;             // independent accesses per thread and tensor per hot-loop iteration
  int tensors;            // full-size tensors the hot loop reads (1, or 2: y and dy)
};

// The vector width the pointers allow: NCS, all pointers share their offset from a 16-byte boundary
// (each row then splits the same way for all of them); NSC, all aligned and C a multiple of it.
inline int pick_vec(bool channels_last, int64_t c, int elt, bool pointers_ok) {
  const int v = 16 / elt;
  if (!pointers_ok) return 1;
  return channels_last ? (c % v == 0 ? v : 1) : v;
}

// Channels-last block: BX threads across channel vectors (a power of two up to `cap`), BY across rows.
// The reduce takes cap 8 (128 contiguous bytes per row, a full cache line): its partial states number
// G x C for G x (C / (8 VEC)) programs, so narrower channel tiles reach 132 programs with a smaller G
// (fewer partial bytes: layer3 at 55^2 channels last moved 10.7% over the minimum with 32).
constexpr int kReduceNscCap = 8;
inline void nsc_block(int64_t c, int vec, int cap, int& bx, int& by) {
  const int64_t need = ceil_div(c, vec);
  bx = 1;
  while (bx < cap && bx < need) bx *= 2;
  by = kThreads / bx;
}

inline Launch plan_ncs(int kind, int64_t n, int64_t c, int64_t s, int vec, int tensors) {
  Launch L{kind, vec, 1, 1, kThreads, 1, 1, 1, unroll_for(tensors), tensors};
  L.chunks = std::max<int64_t>(1, ceil_div(s / vec, unit_vecs(tensors)));
  L.grid_x = std::max<int64_t>(1, std::min(ceil_div(n * c * L.chunks, kWarps), kMaxGridX));  // grid-stride past
  L.groups = n * L.chunks;
  return L;
}

// Partial reduction (the combine that follows has its own plan_combine). n, c, s as in Geometry.
inline Launch plan_reduce(bool channels_last, int64_t n, int64_t c, int64_t s, int vec, int tensors, int sms) {
  if (!channels_last) return plan_ncs(kReduceNCS, n, c, s, vec, tensors);
  Launch L{kReduceNSC, vec, 1, 1, 1, 1, 1, 1, unroll_for(tensors), tensors};
  nsc_block(c, vec, kReduceNscCap, L.block_x, L.block_y);
  L.grid_x = ceil_div(c, int64_t{L.block_x} * vec);
  const int64_t tiles = ceil_div(n, int64_t{L.block_y} * L.unroll);
  // One wave of resident blocks: enough in flight (kLoads per thread) with few partial states.
  const int64_t want = ceil_div(int64_t{sms} * blocks_per_sm(kReduceNSC), L.grid_x);
  L.grid_y = std::clamp<int64_t>(want, 1, std::min(tiles, kMaxGridY));
  L.groups = L.grid_y;
  return L;
}

inline Launch plan_combine(int64_t c, int64_t groups) {
  return {kCombine, 1, ceil_div(c, kWarps), 1, kThreads, 1, 1, groups, kLoads, 1};  // a warp per channel
}

// Elementwise pass out = f(a[, b]).
inline Launch plan_map(bool channels_last, int64_t n, int64_t c, int64_t s, int vec, int tensors, int sms) {
  if (!channels_last) return plan_ncs(kMapNCS, n, c, s, vec, tensors);
  Launch L{kMapNSC, vec, 1, 1, 1, 1, 1, 1, unroll_for(tensors), tensors};
  nsc_block(c, vec, kWarp, L.block_x, L.block_y);
  L.grid_x = ceil_div(c, int64_t{L.block_x} * vec);
  const int64_t tiles = ceil_div(n, int64_t{L.block_y} * L.unroll);
  // Grid-stride over row tiles: the per-channel constants are computed once per thread and block.
  const int64_t want = ceil_div(int64_t{sms} * blocks_per_sm(kMapNSC) * kHbmLatencyWaves, L.grid_x);
  L.grid_y = std::clamp<int64_t>(want, 1, std::min(tiles, kMaxGridY));
  return L;
}

// --- bytes model ------------------------------------------------------------------------------------

// One launch of an op phase: the plan, and the bytes it reads and writes in DRAM (per-channel tensors
// counted once: a block re-reads them from L1/L2).
struct Modelled {
  const char* name;
  Launch launch;
  int tensors;  // full-size tensors read by the hot loop
  int64_t read, written;
};

// Phases: 0 training statistics (partial pass, combine with the running-statistics update), 1 forward
// map, 2 backward reduce (partial pass, combine with dweight / dbias / the batch means), 3 dx map,
// 4 evaluation statistics (running buffers -> float64 constants). State sizes: float64 pairs for the
// statistics, float pairs for the backward sums.
inline std::vector<Modelled> launch_model(int phase, bool channels_last, int64_t n, int64_t c, int64_t s, int elt,
                                          int vec, int sms) {
  const int64_t numel = n * c * s, x = numel * elt;
  std::vector<Modelled> out;
  if (phase == 0 || phase == 2) {
    const bool stats = phase == 0;
    const int tensors = stats ? 1 : 2;
    const int64_t state = stats ? 16 : 8;
    const Launch r = plan_reduce(channels_last, n, c, s, vec, tensors, sms);
    const int64_t partial = r.groups * c * state;
    out.push_back({stats ? "statistics_reduce" : "backward_reduce", r, tensors,
                   tensors * x + (stats ? c * elt : c * 4), partial});
    // statistics combine: partials, the shift K, the running buffers and num_batches_tracked (8 bytes)
    // in; mean, invstd (float64), invstd saved (float), the running buffers and the counter out.
    // Backward: partials and weight in; dweight, dbias, mean_dz, mean_dz_xhat out.
    out.push_back({stats ? "statistics_combine" : "backward_combine", plan_combine(c, r.groups), 0,
                   partial + (stats ? c * (elt + 8) + 8 : c * 4), stats ? c * 28 + 8 : c * 16});
  } else if (phase == 1 || phase == 3) {
    const bool fwd = phase == 1;
    const int tensors = fwd ? 1 : 2;
    // per channel: forward mean, invstd (float64), weight, bias; dx: invstd, weight, bias, two means
    out.push_back({fwd ? "forward_map" : "backward_map", plan_map(channels_last, n, c, s, vec, tensors, sms), tensors,
                   tensors * x + c * (fwd ? 24 : 20), x});
  } else {
    out.push_back({"eval_statistics", {kEval, 1, ceil_div(c, kThreads), 1, kThreads, 1, 1, 1, 1, 0}, 0, c * 8, c * 20});
  }
  return out;
}

// The op's minimum: training forward reads x twice (statistics, then the map: the statistics must be
// complete before any y) and writes y; backward reads y and dy twice (sums, then dx) and writes dx.
inline int64_t min_bytes(bool training, int64_t numel, int elt) {
  return (training ? 3 + 5 : 2 + 3) * numel * elt;
}

}  // namespace plan
}  // namespace ifbf
