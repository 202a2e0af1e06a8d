// A CPU stand-in for the CUDA execution model, enough to run InPlace-ABN's kernels
// (csrc/inplace_abn_kernels.cuh) and their launchers (csrc/inplace_abn_launch.cuh) on CPU tensors.
//
// The CUDA sources compile as C++ with IFBF_SIMT_EMU defined (ifbf_fast/utils/simt_emu.py builds them).
// A launch runs its blocks one after another; the threads of a block are fibers (ucontext) on the calling
// thread, switched only where CUDA threads must meet:
//   * __syncthreads(): every thread of the block that has not returned arrives before any goes on;
//   * __shfl_down_sync(0xffffffff, v, delta): all 32 lanes of the warp exchange v. A shuffle that a lane
//     of the warp does not reach (it returned, or it waits at __syncthreads) is the undefined behaviour
//     it is on a GPU: the launch fails with an error that names the block, warp and lanes.
// Because blocks run one at a time, a function-local `static` is exactly per-block shared memory, so
// __shared__ expands to it. Between barriers a thread runs alone: the fibers interleave only at barriers,
// which is one of the schedules a GPU may pick (a kernel whose result depends on the schedule is wrong on
// both; simt::schedule() picks ascending, descending or shuffled orders of blocks and threads, so the
// tests can compare them). What this cannot show: timing, memory-ordering bugs between barriers, warp-synchronous code
// without a shuffle or barrier, and misaligned accesses other than those through simt::vload/vstore,
// which check their 16-byte alignment (a GPU faults with "misaligned address" there).
//
// The grid, block and shared-memory limits are an H200's (sm_90), so a launch a GPU would refuse fails
// here too. simt::stats() counts launches, blocks and threads and keeps each launch's grid and block for
// the tests to compare with the plans of inplace_abn_plan.h.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// The built-in variables: the scheduler sets them before it switches to a thread.
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

namespace simt {

struct LaunchRecord {
  dim3 grid, block;
};

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, switches = 0;
  int64_t vector_bytes = 0, narrow_bytes = 0;  // through vload/vstore: 16-byte accesses, and narrower ones
  int64_t scalar_bytes = 0;                     // through sload/sstore: the NCS rows' unaligned ends
  std::vector<LaunchRecord> records;
};

inline Stats& stats() {
  static Stats s;
  return s;
}

// The order in which the emulator runs the blocks of a grid and, between barriers, the threads of a
// block: 0 ascending, 1 descending, 2 a pseudo-random permutation from `seed` (fresh per block and per
// barrier phase). A kernel whose result depends on it has a race (two threads touching one location
// between barriers, or blocks that depend on each other's order): the tests compare the schedules.
struct Schedule {
  int mode = 0;
  uint64_t seed = 0;
};

inline Schedule& schedule() {
  static Schedule s;
  return s;
}

// The multiprocessor count the launchers plan for (cudaDevAttrMultiProcessorCount): an H200's 132 unless
// a test sets fewer (fewer programs than units: the grid-stride loops then take several turns).
inline int& sms() {
  static int n = 132;
  return n;
}

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

constexpr int kWarp = 32;
constexpr size_t kStack = 64 * 1024;

enum class Wait : int { Run, Block, Warp, Done };

struct Thread {
  ucontext_t ctx;
  uint3 tid;
  Wait wait = Wait::Run;
};

struct Block {
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t main;
  int current = -1;
  const std::function<void()>* body = nullptr;  // the launch's kernel call, shared by its blocks
  std::string error;
  std::vector<uint64_t> slots;  // one 8-byte slot per thread: the values a shuffle exchanges
};

inline Block& block() {
  static Block b;
  return b;
}

inline void yield(Wait w) {
  Block& b = block();
  Thread& t = b.threads[b.current];
  t.wait = w;
  ++stats().switches;
  if (swapcontext(&t.ctx, &b.main) != 0) std::abort();
}

inline void entry() {
  Block& b = block();
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = e.what();
  }
  b.threads[b.current].wait = Wait::Done;
  // uc_link returns to main
}

inline std::string where(unsigned warp = ~0u) {
  std::ostringstream s;
  s << "block (" << blockIdx.x << ", " << blockIdx.y << ", " << blockIdx.z << ") of grid (" << gridDim.x << ", "
    << gridDim.y << ", " << gridDim.z << "), block size (" << blockDim.x << ", " << blockDim.y << ", "
    << blockDim.z << ")";
  if (warp != ~0u) s << ", warp " << warp;
  return s.str();
}

// Runs the block's threads until all have returned; barriers release when every participant waits.
inline void run_block(const std::function<void()>& body, int nthreads) {
  Block& b = block();
  b.body = &body;
  b.error.clear();
  b.threads.assign(nthreads, Thread{});
  b.slots.assign(nthreads, 0);
  while (static_cast<int>(b.stacks.size()) < nthreads) b.stacks.emplace_back(new char[kStack]);
  for (int i = 0; i < nthreads; ++i) {
    Thread& t = b.threads[i];
    t.tid = {unsigned(i) % blockDim.x, (unsigned(i) / blockDim.x) % blockDim.y, unsigned(i) / (blockDim.x * blockDim.y)};
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = b.stacks[i].get();
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = &b.main;
    makecontext(&t.ctx, entry, 0);
  }
  const int warps = (nthreads + kWarp - 1) / kWarp;
  std::vector<int> order(nthreads);
  uint64_t rng = schedule().seed * 0x9E3779B97F4A7C15ull + (uint64_t(blockIdx.x) << 32) + blockIdx.y + 1;
  for (;;) {
    bool live = false;
    for (int i = 0; i < nthreads; ++i) order[i] = schedule().mode == 1 ? nthreads - 1 - i : i;
    if (schedule().mode == 2) {
      for (int i = nthreads - 1; i > 0; --i) {  // Fisher-Yates with a 64-bit LCG
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        std::swap(order[i], order[int((rng >> 33) % uint64_t(i + 1))]);
      }
    }
    for (int k = 0; k < nthreads; ++k) {
      const int i = order[k];
      Thread& t = b.threads[i];
      if (t.wait != Wait::Run) continue;
      threadIdx = t.tid;
      b.current = i;
      if (swapcontext(&b.main, &t.ctx) != 0) std::abort();
      if (!b.error.empty()) throw Error("simt: " + b.error + " (thread " + std::to_string(i) + " of " + where() + ")");
    }
    // Every thread now waits at a barrier or has returned.
    bool released = false;
    for (int w = 0; w < warps; ++w) {
      int at_warp = 0, done = 0, at_block = 0;
      const int lo = w * kWarp, hi = std::min(nthreads, lo + kWarp);
      for (int i = lo; i < hi; ++i) {
        const Wait s = b.threads[i].wait;
        at_warp += s == Wait::Warp;
        done += s == Wait::Done;
        at_block += s == Wait::Block;
      }
      if (at_warp == 0) continue;
      if (at_warp != kWarp) {
        std::ostringstream m;
        m << "simt: a full-warp shuffle (mask 0xffffffff) that only " << at_warp << " of 32 lanes reached ("
          << done << " returned, " << at_block << " wait at __syncthreads) in " << where(w);
        throw Error(m.str());
      }
      for (int i = lo; i < hi; ++i) b.threads[i].wait = Wait::Run;
      released = true;
    }
    if (released) continue;
    for (int i = 0; i < nthreads; ++i) live = live || b.threads[i].wait != Wait::Done;
    if (!live) break;
    // __syncthreads: the threads that returned do not take part (sm_70 and later count only live threads)
    for (int i = 0; i < nthreads; ++i)
      if (b.threads[i].wait == Wait::Block) b.threads[i].wait = Wait::Run;
  }
}

}  // namespace detail

// A kernel launch: grid and block checked against an sm_90 device's limits, the arguments converted to the
// kernel's parameter types (as the CUDA runtime copies them), every block run to completion.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535 || block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024) {
    std::ostringstream m;
    m << "simt: invalid configuration argument: grid (" << grid.x << ", " << grid.y << ", " << grid.z
      << "), block (" << block.x << ", " << block.y << ", " << block.z << ")";
    throw Error(m.str());
  }
  Stats& st = stats();
  ++st.launches;
  st.records.push_back({grid, block});
  std::tuple<P...> params(static_cast<P>(std::forward<A>(args))...);
  gridDim = grid;
  blockDim = block;
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = schedule().mode == 1 ? nblocks - 1 - i : i;
  if (schedule().mode == 2) {
    uint64_t rng = schedule().seed * 0xD1B54A32D192ED03ull + nblocks;
    for (uint64_t i = nblocks - 1; i > 0; --i) {
      rng = rng * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(order[i], order[(rng >> 33) % (i + 1)]);
    }
  }
  for (const uint64_t linear : order) {
    blockIdx = {unsigned(linear % grid.x), unsigned(linear / grid.x % grid.y), unsigned(linear / grid.x / grid.y)};
    detail::run_block(body, int(threads));
    ++st.blocks;
    st.threads += int64_t(threads);
  }
}

inline void count_scalar(size_t bytes) { stats().scalar_bytes += int64_t(bytes); }

// 16-byte vector accesses (Vec<T, N> of inplace_abn_kernels.cuh): a misaligned one faults on a GPU.
// Counted by width, so that a test sees which share of a pass's bytes moved as 16-byte vectors.
template <typename V>
inline void check_aligned(const void* p) {
  (sizeof(V) == 16 ? stats().vector_bytes : stats().narrow_bytes) += int64_t(sizeof(V));
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0) {
    std::ostringstream m;
    m << "misaligned address: a " << sizeof(V) << "-byte vector access at " << p << " (" << alignof(V)
      << "-byte alignment needed)";
    throw Error(m.str());
  }
}

}  // namespace simt

inline void __syncthreads() { simt::detail::yield(simt::detail::Wait::Block); }

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "simt: shuffles of up to 8 bytes");
  using namespace simt::detail;
  if (mask != 0xffffffffu || width != kWarp) throw simt::Error("only full-warp shuffles are emulated");
  Block& b = block();
  const int t = b.current, lane = t % kWarp;
  std::memcpy(&b.slots[t], &v, sizeof(T));
  yield(Wait::Warp);  // every lane has written its value
  T r = v;
  if (lane + int(delta) < kWarp) std::memcpy(&r, &b.slots[t + int(delta)], sizeof(T));
  yield(Wait::Warp);  // every lane has read before any writes again
  return r;
}
