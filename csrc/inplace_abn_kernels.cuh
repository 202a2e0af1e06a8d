// Raw CUDA kernels of InPlace-ABN (launched from inplace_abn_launch.cuh and the inplace_abn_*.cu units).
//
// Two layouts (inplace_abn.h Geometry): NCS, rows of S contiguous values per (n, c); NSC (channels
// last), rows of C contiguous channels. The work decomposition (warp units over NCS rows with scalar
// heads and tails, VEC channels x kUnroll rows per NSC thread) and the grids are in inplace_abn_plan.h,
// where the CPU tests read them. Reductions write partial states and a second tiny kernel combines
// them (deterministic, no atomics) and runs the per-channel epilogue; accumulation is fp32 for the
// backward sums, shifted float64 sums for the statistics. Hot loops load and store 16-byte vectors in
// both layouts wherever the pointers allow it (NCS: any row length). index_t is int where the tensor
// has fewer than 2^31 elements, else int64_t.
#pragma once

#ifdef IFBF_SIMT_EMU
#include "simt/simt_emu.h"  // the CPU stand-in for the CUDA execution model (tests only)
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "inplace_abn_common.h"
#include "inplace_abn_plan.h"

namespace ifbf {
namespace cuda {

constexpr int kThreads = plan::kThreads;
constexpr int kWarp = plan::kWarp;


template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Every vector access of the hot loops goes through these two: under the CPU emulator they check the
// alignment that a GPU would fault on; on the GPU they are the plain load and store.
template <typename V>
__device__ __forceinline__ V vload(const V* p) {
#ifdef IFBF_SIMT_EMU
  simt::check_aligned<V>(p);
#endif
  return *p;
}

template <typename V>
__device__ __forceinline__ void vstore(V* p, const V& v) {
#ifdef IFBF_SIMT_EMU
  simt::check_aligned<V>(p);
#endif
  *p = v;
}

// The scalar accesses of the NCS rows' unaligned heads and tails: plain on the GPU, counted by the
// emulator, so that a test adds up every full-size byte a pass moves (each element exactly once).
template <typename T>
__device__ __forceinline__ T sload(const T* p) {
#ifdef IFBF_SIMT_EMU
  simt::count_scalar(sizeof(T));
#endif
  return *p;
}

template <typename T>
__device__ __forceinline__ void sstore(T* p, const T& v) {
#ifdef IFBF_SIMT_EMU
  simt::count_scalar(sizeof(T));
#endif
  *p = v;
}

// --- reduction states ---------------------------------------------------------------------------

struct DPair {  // two float64 sums: the shifted sums of the statistics (d = x - K, sum d, sum d^2)
  double a, b;
  static __device__ __forceinline__ DPair zero() { return {0.0, 0.0}; }
  __device__ __forceinline__ void merge(const DPair& o) {
    a += o.a;
    b += o.b;
  }
  __device__ __forceinline__ DPair shfl_down(int off) const {
    return {__shfl_down_sync(0xffffffffu, a, off), __shfl_down_sync(0xffffffffu, b, off)};
  }
};

struct Pair {  // two plain fp32 sums
  float a, b;
  static __device__ __forceinline__ Pair zero() { return {0.f, 0.f}; }
  __device__ __forceinline__ void merge(const Pair& o) {
    a += o.a;
    b += o.b;
  }
  __device__ __forceinline__ Pair shfl_down(int off) const {
    return {__shfl_down_sync(0xffffffffu, a, off), __shfl_down_sync(0xffffffffu, b, off)};
  }
};

template <typename St>
__device__ __forceinline__ St warp_reduce(St s) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) s.merge(s.shfl_down(off));
  return s;
}

// Reduces over a 1-D block of kThreads; the result is valid in thread 0.
template <typename St>
__device__ __forceinline__ St block_reduce(St s) {
  __shared__ St smem[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp;
  s = warp_reduce(s);
  if (lane == 0) smem[wid] = s;
  __syncthreads();
  if (wid == 0) {
    s = lane < kThreads / kWarp ? smem[lane] : St::zero();
    s = warp_reduce(s);
  }
  return s;
}

// --- per-element operations -----------------------------------------------------------------------

// Statistics: float64 sums of d = x - K and d^2 with one shift K per channel (its first value), so that
// neither overflows (squares of fp32 values near 1e20 do in fp32, sums of bf16 values near 3e38 too)
// nor cancels (var = (sum d^2 - (sum d)^2 / n) / n loses only what |mean - K| / std costs, in float64).
// The partials of all blocks share K, so they merge by addition. x and the stride of K come with it.
template <typename scalar_t>
struct StatsRed {
  using State = DPair;
  static constexpr bool kTwoInputs = false;  // x only
  const scalar_t* x;
  int64_t k_stride;  // K of channel c is x[c * k_stride]: NCS S, NSC 1
  struct Ch {
    double k;
  };
  __device__ __forceinline__ Ch channel(int64_t c) const { return {static_cast<double>(static_cast<float>(x[c * k_stride]))}; }
  __device__ __forceinline__ void update(State& s, const Ch& ch, scalar_t v, scalar_t) const {
    const double d = static_cast<double>(static_cast<float>(v)) - ch.k;
    s.a += d;
    s.b = fma(d, d, s.b);
  }
};

template <Act A, typename scalar_t>
struct BackwardRed {  // sums of dz and dz * (z - b); divided by g once per channel at the end
  using State = Pair;
  static constexpr bool kTwoInputs = true;  // y and dy
  const float* bias;
  float slope, inv_slope;
  struct Ch {
    float b;
  };
  __device__ __forceinline__ Ch channel(int64_t c) const { return {bias ? bias[c] : 0.f}; }
  __device__ __forceinline__ void update(State& s, const Ch& ch, scalar_t y, scalar_t dy) const {
    float z, dact;
    ActFn<A, float>::inverse(static_cast<float>(y), slope, inv_slope, z, dact);
    const float dz = static_cast<float>(dy) * dact;
    s.a += dz;
    s.b += dz * (z - ch.b);
  }
};

template <Act A, typename scalar_t>
struct ForwardMap {  // y = act((x * pre - shift) * scale + b) (forward_constants, inplace_abn_common.h)
  static constexpr bool kTwoInputs = false;  // x only
  const double *mean, *invstd;
  const float *weight, *bias;
  float eps, slope;
  struct Ch {
    float pre, shift, scale, b;
  };
  __device__ __forceinline__ Ch channel(int64_t c) const {
    const double g = weight ? fabsf(weight[c]) + eps : 1.0;
    const auto k = forward_constants(mean[c], invstd[c], g);
    return {static_cast<float>(k.pre), static_cast<float>(k.shift), static_cast<float>(k.scale), bias ? bias[c] : 0.f};
  }
  __device__ __forceinline__ scalar_t operator()(const Ch& ch, scalar_t x, scalar_t) const {
    return static_cast<scalar_t>(
        ActFn<A, float>::forward((static_cast<float>(x) * ch.pre - ch.shift) * ch.scale + ch.b, slope));
  }
};

template <Act A, typename scalar_t>
struct BackwardMap {
  // dx = g * invstd * (dz - mdz - xhat * mdzx) with xhat = (z - b) / g
  //    = a * dz - k * (z - b) + c0,  a = g * invstd, k = invstd * mdzx, c0 = -a * mdz
  static constexpr bool kTwoInputs = true;  // y and dy
  const float *invstd, *weight, *bias, *mean_dz, *mean_dz_xhat;
  float eps, slope, inv_slope;
  struct Ch {
    float a, k, b, c0;
  };
  __device__ __forceinline__ Ch channel(int64_t c) const {
    const double is = invstd[c];
    const double a = (weight ? fabsf(weight[c]) + eps : 1.0) * is;
    const double k = mean_dz_xhat ? is * mean_dz_xhat[c] : 0.0;
    return {static_cast<float>(a), static_cast<float>(k), bias ? bias[c] : 0.f,
            static_cast<float>(mean_dz ? -a * mean_dz[c] : 0.0)};
  }
  __device__ __forceinline__ scalar_t operator()(const Ch& ch, scalar_t y, scalar_t dy) const {
    float z, dact;
    ActFn<A, float>::inverse(static_cast<float>(y), slope, inv_slope, z, dact);
    return static_cast<scalar_t>(ch.a * (static_cast<float>(dy) * dact) - ch.k * (z - ch.b) + ch.c0);
  }
};

// --- reductions -------------------------------------------------------------------------------------

// NCS: a warp per unit (row, chunk of kWarp * U vectors), plan::plan_ncs; grid-stride over the units.
// Each lane loads U independent vectors per tensor (4 loads in all), then reduces them; the row's unaligned head and
// tail (plan::row_split; p0 = the offset of x from a 16-byte boundary, in elements, the same for dy)
// go to the lanes of the row's first chunk. partial[(n * chunks + chunk) * C + c] receives the unit's state.
template <typename Red, int VEC, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads, plan::blocks_per_sm(plan::kReduceNCS))
    reduce_ncs_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, Red red, index_t rows,
                      index_t C, index_t S, index_t chunks, index_t p0, typename Red::State* __restrict__ partial) {
  using St = typename Red::State;
  using V = Vec<scalar_t, VEC>;
  constexpr int U = plan::unroll_for(Red::kTwoInputs ? 2 : 1);
  constexpr index_t kUnit = plan::unit_vecs(Red::kTwoInputs ? 2 : 1);
  const int lane = threadIdx.x % kWarp;
  const index_t units = rows * chunks;
  for (index_t u = static_cast<index_t>(blockIdx.x) * plan::kWarps + threadIdx.x / kWarp; u < units;
       u += static_cast<index_t>(gridDim.x) * plan::kWarps) {  // warp-uniform: the shuffles stay full-warp
    const index_t row = u / chunks, chunk = u - row * chunks;
    const index_t n = row / C, c = row - n * C;
    const auto ch = red.channel(c);
    const index_t base = row * S;
    const auto sp = plan::row_split<index_t>(p0 + base, S, VEC);
    const scalar_t* xr = x + base + sp.head;  // 16-byte aligned
    const scalar_t* dr = Red::kTwoInputs ? dy + base + sp.head : nullptr;
    St s = St::zero();
    V xv[U], dv[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const index_t j = chunk * kUnit + k * kWarp + lane;
      if (j < sp.body) {
        xv[k] = vload(reinterpret_cast<const V*>(xr) + j);
        if (Red::kTwoInputs) dv[k] = vload(reinterpret_cast<const V*>(dr) + j);
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (chunk * kUnit + k * kWarp + lane < sp.body) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) red.update(s, ch, xv[k].v[e], Red::kTwoInputs ? dv[k].v[e] : scalar_t(0));
      }
    }
    if (VEC > 1 && chunk == 0 && lane < sp.head + sp.tail) {  // the unaligned ends, one element per lane
      const index_t i = lane < sp.head ? lane : S - sp.tail + (lane - sp.head);
      red.update(s, ch, sload(x + base + i), Red::kTwoInputs ? sload(dy + base + i) : scalar_t(0));
    }
    s = warp_reduce(s);
    if (lane == 0) partial[(n * chunks + chunk) * C + c] = s;
  }
}

// NSC: block (BX, BY) with BX * BY = kThreads, each thread owning VEC adjacent channels (one 16-byte
// access per row when VEC > 1) and U rows per iteration (rows r0 + k * BY of a tile of BY * U rows: 4
// independent loads per thread in all); grid (channel tiles, G) grid-strides over the row tiles. partial[g * C + c] per block row g.
template <typename Red, int VEC, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads, plan::blocks_per_sm(plan::kReduceNSC))
    reduce_nsc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, Red red, index_t M,
                      index_t C, typename Red::State* __restrict__ partial) {
  using St = typename Red::State;
  using V = Vec<scalar_t, VEC>;
  constexpr int U = plan::unroll_for(Red::kTwoInputs ? 2 : 1);
  __shared__ St smem[kThreads];
  const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;  // VEC > 1 only when C % VEC == 0: a thread's channels are all valid
  typename Red::Ch ch[VEC];
  St s[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    ch[j] = red.channel(active ? c0 + j : 0);
    s[j] = St::zero();
  }
  if (active) {
    const index_t by = blockDim.y;
    for (index_t r0 = static_cast<index_t>(blockIdx.y) * by * U + threadIdx.y; r0 < M;
         r0 += static_cast<index_t>(gridDim.y) * by * U) {
      V xv[U], dv[U];
#pragma unroll
      for (int k = 0; k < U; ++k) {
        const index_t r = r0 + k * by;
        if (r < M) {
          xv[k] = vload(reinterpret_cast<const V*>(x + r * C + c0));
          if (Red::kTwoInputs) dv[k] = vload(reinterpret_cast<const V*>(dy + r * C + c0));
        }
      }
#pragma unroll
      for (int k = 0; k < U; ++k) {
        if (r0 + k * by < M) {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            red.update(s[j], ch[j], xv[k].v[j], Red::kTwoInputs ? dv[k].v[j] : scalar_t(0));
        }
      }
    }
  }
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    smem[t] = s[j];
    __syncthreads();
    for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
      if (threadIdx.y < stride) smem[t].merge(smem[t + stride * blockDim.x]);
      __syncthreads();
    }
    if (threadIdx.y == 0 && active) partial[static_cast<index_t>(blockIdx.y) * C + c0 + j] = smem[threadIdx.x];
    __syncthreads();
  }
}

// One warp per channel merges the G partial states of that channel (plan::kLoads independent loads
// per lane in flight: the partials of a channels-last reduce are a few hundred per channel), then
// fin(c, state).
template <typename St, typename Fin>
__global__ void __launch_bounds__(kThreads, plan::blocks_per_sm(plan::kCombine))
    combine_kernel(const St* __restrict__ partial, int64_t G, int64_t C, Fin fin) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (c >= C) return;  // whole warps leave together: the shuffles below stay full-warp
  St s = St::zero();
  for (int64_t g0 = lane; g0 < G; g0 += int64_t{kWarp} * plan::kLoads) {
    St t[plan::kLoads];
#pragma unroll
    for (int k = 0; k < plan::kLoads; ++k) {
      const int64_t g = g0 + int64_t{k} * kWarp;
      t[k] = g < G ? partial[g * C + c] : St::zero();
    }
#pragma unroll
    for (int k = 0; k < plan::kLoads; ++k) s.merge(t[k]);
  }
  s = warp_reduce(s);
  if (lane == 0) fin(c, s);
}

// Mean and biased var (float64) of channel c from its shifted sums (StatsRed).
template <typename scalar_t>
__device__ __forceinline__ void shifted_mean_var(const scalar_t* x, int64_t k_stride, double n, int64_t c,
                                                 const DPair& s, double& mean, double& var) {
  const double k = static_cast<double>(static_cast<float>(x[c * k_stride]));
  const double m = s.a / n;
  mean = k + m;
  var = fmax((s.b - s.a * m) / n, 0.0);
}

template <typename scalar_t>
struct StatsFin {  // the primitive (synchronised path): mean and var of the local batch
  const scalar_t* x;
  int64_t k_stride;
  double n;
  double *mean, *var;
  __device__ __forceinline__ void operator()(int64_t c, const DPair& s) const {
    shifted_mean_var(x, k_stride, n, c, s, mean[c], var[c]);
  }
};

// The fused training epilogue: float64 mean and invstd, and the running buffers lerped in place with
// the unbiased variance (saturated at the float max: a float32 buffer cannot hold more). BatchNorm2d's
// num_batches_tracked (nullptr: none) is incremented here too, by the one thread that finishes channel
// 0 (lane 0 of one warp of the combine grid), so the counter needs no launch of its own.
template <typename scalar_t>
struct TrainFin {
  const scalar_t* x;
  int64_t k_stride;
  double n, eps, momentum;
  double *mean, *invstd;
  float *invstd_saved, *running_mean, *running_var;
  int64_t* num_batches_tracked;
  __device__ __forceinline__ void operator()(int64_t c, const DPair& s) const {
    if (c == 0 && num_batches_tracked != nullptr) *num_batches_tracked += 1;
    double m, v;
    shifted_mean_var(x, k_stride, n, c, s, m, v);
    mean[c] = m;
    invstd[c] = inv_std(v, eps);
    invstd_saved[c] = static_cast<float>(invstd[c]);
    running_mean[c] = static_cast<float>((1.0 - momentum) * running_mean[c] + momentum * m);
    running_var[c] = static_cast<float>(
        saturate((1.0 - momentum) * running_var[c] + momentum * v * (n / (n - 1.0)), 3.4028234663852886e38));
  }
};

struct BackwardFin {  // the primitive: the two sums
  const float* weight;
  float eps;
  float *sum_dz, *sum_dz_xhat;
  __device__ __forceinline__ void operator()(int64_t c, const Pair& s) const {
    sum_dz[c] = s.a;
    sum_dz_xhat[c] = weight ? s.b / (fabsf(weight[c]) + eps) : s.b;
  }
};

// The fused backward epilogue: dweight = sum(dz * xhat) * sign(w), dbias = sum(dz), and in training
// the means over the batch that the dx map needs.
struct BackwardParamsFin {
  const float* weight;
  float eps, inv_n;
  bool training;
  float *dweight, *dbias, *mean_dz, *mean_dz_xhat;
  __device__ __forceinline__ void operator()(int64_t c, const Pair& s) const {
    float sxh = s.b, sign = 1.f;
    if (weight) {
      const float w = weight[c];
      sxh /= fabsf(w) + eps;
      sign = w > 0.f ? 1.f : (w < 0.f ? -1.f : 0.f);
    }
    dweight[c] = sxh * sign;
    dbias[c] = s.a;
    if (training) {
      mean_dz[c] = s.a * inv_n;
      mean_dz_xhat[c] = sxh * inv_n;
    }
  }
};

// --- elementwise passes -------------------------------------------------------------------------------

// NCS: the warp units of reduce_ncs_kernel (row, chunk of kWarp * U vectors): U independent vector
// loads per lane and tensor (4 in all), then the stores; the row's unaligned head and tail in its first
// chunk. a, b and out share p0, their offset from a 16-byte boundary in elements.
template <typename Map, int VEC, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads, plan::blocks_per_sm(plan::kMapNCS))
    map_ncs_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ out,
                   Map f, index_t rows, index_t C, index_t S, index_t chunks, index_t p0) {
  using V = Vec<scalar_t, VEC>;
  constexpr int U = plan::unroll_for(Map::kTwoInputs ? 2 : 1);
  constexpr index_t kUnit = plan::unit_vecs(Map::kTwoInputs ? 2 : 1);
  const int lane = threadIdx.x % kWarp;
  const index_t units = rows * chunks;
  for (index_t u = static_cast<index_t>(blockIdx.x) * plan::kWarps + threadIdx.x / kWarp; u < units;
       u += static_cast<index_t>(gridDim.x) * plan::kWarps) {
    const index_t row = u / chunks, chunk = u - row * chunks;
    const auto ch = f.channel(row % C);
    const index_t base = row * S;
    const auto sp = plan::row_split<index_t>(p0 + base, S, VEC);
    const V* ar = reinterpret_cast<const V*>(a + base + sp.head);  // 16-byte aligned
    const V* br = Map::kTwoInputs ? reinterpret_cast<const V*>(b + base + sp.head) : nullptr;
    V* orow = reinterpret_cast<V*>(out + base + sp.head);
    V av[U], bv[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const index_t j = chunk * kUnit + k * kWarp + lane;
      if (j < sp.body) {
        av[k] = vload(ar + j);
        if (Map::kTwoInputs) bv[k] = vload(br + j);
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const index_t j = chunk * kUnit + k * kWarp + lane;
      if (j < sp.body) {
        V ov;
#pragma unroll
        for (int e = 0; e < VEC; ++e) ov.v[e] = f(ch, av[k].v[e], Map::kTwoInputs ? bv[k].v[e] : scalar_t(0));
        vstore(orow + j, ov);
      }
    }
    if (VEC > 1 && chunk == 0 && lane < sp.head + sp.tail) {  // the unaligned ends, one element per lane
      const index_t i = base + (lane < sp.head ? lane : S - sp.tail + (lane - sp.head));
      sstore(out + i, f(ch, sload(a + i), Map::kTwoInputs ? sload(b + i) : scalar_t(0)));
    }
  }
}

// NSC: the thread layout of reduce_nsc_kernel (VEC channels x U rows per thread and iteration);
// per-channel constants computed once per thread, grid-stride over the row tiles.
template <typename Map, int VEC, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads, plan::blocks_per_sm(plan::kMapNSC))
    map_nsc_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ out,
                   Map f, index_t M, index_t C) {
  using V = Vec<scalar_t, VEC>;
  constexpr int U = plan::unroll_for(Map::kTwoInputs ? 2 : 1);
  const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  typename Map::Ch ch[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) ch[j] = f.channel(c0 + j);
  const index_t by = blockDim.y;
  for (index_t r0 = static_cast<index_t>(blockIdx.y) * by * U + threadIdx.y; r0 < M;
       r0 += static_cast<index_t>(gridDim.y) * by * U) {
    V av[U], bv[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const index_t r = r0 + k * by;
      if (r < M) {
        av[k] = vload(reinterpret_cast<const V*>(a + r * C + c0));
        if (Map::kTwoInputs) bv[k] = vload(reinterpret_cast<const V*>(b + r * C + c0));
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const index_t r = r0 + k * by;
      if (r < M) {
        V ov;
#pragma unroll
        for (int j = 0; j < VEC; ++j) ov.v[j] = f(ch[j], av[k].v[j], Map::kTwoInputs ? bv[k].v[j] : scalar_t(0));
        vstore(reinterpret_cast<V*>(out + r * C + c0), ov);
      }
    }
  }
}

}  // namespace cuda
}  // namespace ifbf
