// Raw CUDA kernels of InPlace-ABN (launched from inplace_abn_launch.cuh and the inplace_abn_*.cu units).
//
// Two layouts (ifbf_ops.h Geometry): NCS, rows of S contiguous values per (n, c); NSC (channels
// last), rows of C contiguous channels. Reductions write one partial state per (channel, block row)
// and a second tiny kernel combines them (deterministic, no atomics); accumulation is fp32 (Welford
// for the statistics). Elementwise passes load/store 16-byte vectors where the row length and the
// pointers allow it. index_t is int where the tensor has fewer than 2^31 elements, else int64_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "inplace_abn_common.h"

namespace ifbf {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kUnroll = 4;  // independent loads in flight per thread in the NCS loops

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// --- reduction states ---------------------------------------------------------------------------

struct Welford {  // count, mean and centred second moment; merge is Chan's formula
  float n, mean, m2;
  static __device__ __forceinline__ Welford zero() { return {0.f, 0.f, 0.f}; }
  __device__ __forceinline__ void push(float x) {
    n += 1.f;
    const float d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  __device__ __forceinline__ void merge(const Welford& o) {
    const float tot = n + o.n;
    if (tot == 0.f) return;
    const float d = o.mean - mean, f = o.n / tot;
    mean += d * f;
    m2 += o.m2 + d * d * n * f;
    n = tot;
  }
  __device__ __forceinline__ Welford shfl_down(int off) const {
    return {__shfl_down_sync(0xffffffffu, n, off), __shfl_down_sync(0xffffffffu, mean, off),
            __shfl_down_sync(0xffffffffu, m2, off)};
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

template <typename scalar_t>
struct StatsRed {
  using State = Welford;
  struct Ch {};
  __device__ __forceinline__ Ch channel(int64_t) const { return {}; }
  __device__ __forceinline__ void update(State& s, const Ch&, scalar_t x, scalar_t) const {
    s.push(static_cast<float>(x));
  }
};

template <Act A, typename scalar_t>
struct BackwardRed {  // sums of dz and dz * (z - b); divided by g once per channel at the end
  using State = Pair;
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
struct ForwardMap {  // y = act((x - mean) * g * rsqrt(var + eps) + b)
  const float *mean, *var, *weight, *bias;
  float eps, slope;
  struct Ch {
    float mean, scale, b;
  };
  __device__ __forceinline__ Ch channel(int64_t c) const {
    const float g = weight ? fabsf(weight[c]) + eps : 1.f;
    return {mean[c], g * rsqrtf(var[c] + eps), bias ? bias[c] : 0.f};
  }
  __device__ __forceinline__ scalar_t operator()(const Ch& ch, scalar_t x, scalar_t) const {
    return static_cast<scalar_t>(
        ActFn<A, float>::forward((static_cast<float>(x) - ch.mean) * ch.scale + ch.b, slope));
  }
};

template <Act A, typename scalar_t>
struct BackwardMap {
  // dx = g * invstd * (dz - mdz - xhat * mdzx) with xhat = (z - b) / g
  //    = a * dz - k * (z - b) + c0,  a = g * invstd, k = invstd * mdzx, c0 = -a * mdz
  const float *var, *weight, *bias, *mean_dz, *mean_dz_xhat;
  float eps, slope, inv_slope;
  struct Ch {
    float a, k, b, c0;
  };
  __device__ __forceinline__ Ch channel(int64_t c) const {
    const float invstd = rsqrtf(var[c] + eps);
    const float a = (weight ? fabsf(weight[c]) + eps : 1.f) * invstd;
    const float k = mean_dz_xhat ? invstd * mean_dz_xhat[c] : 0.f;
    return {a, k, bias ? bias[c] : 0.f, mean_dz ? -a * mean_dz[c] : 0.f};
  }
  __device__ __forceinline__ scalar_t operator()(const Ch& ch, scalar_t y, scalar_t dy) const {
    float z, dact;
    ActFn<A, float>::inverse(static_cast<float>(y), slope, inv_slope, z, dact);
    return static_cast<scalar_t>(ch.a * (static_cast<float>(dy) * dact) - ch.k * (z - ch.b) + ch.c0);
  }
};

// --- reductions -------------------------------------------------------------------------------------

// NCS: grid (C, G). Block (c, g) takes the units g, g + G, ... of channel c, a unit being a chunk of
// kThreads * kUnroll values of one row (n, c); partial[g * C + c] receives the block's state.
template <typename Red, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_ncs_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, Red red, index_t n_rows,
                      index_t C, index_t S, index_t chunks, typename Red::State* __restrict__ partial) {
  using St = typename Red::State;
  const index_t c = blockIdx.x;
  const auto ch = red.channel(c);
  St s = St::zero();
  const index_t units = n_rows * chunks;
  for (index_t u = blockIdx.y; u < units; u += gridDim.y) {
    const index_t n = u / chunks;
    const index_t s0 = (u - n * chunks) * (kThreads * kUnroll) + threadIdx.x;
    const index_t base = (n * C + c) * S;
    scalar_t xv[kUnroll], dv[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t i = s0 + k * kThreads;
      xv[k] = i < S ? x[base + i] : scalar_t(0);
      dv[k] = (dy != nullptr && i < S) ? dy[base + i] : scalar_t(0);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      if (s0 + k * kThreads < S) red.update(s, ch, xv[k], dv[k]);
  }
  s = block_reduce(s);
  if (threadIdx.x == 0) partial[static_cast<index_t>(blockIdx.y) * C + c] = s;
}

// NSC: block (BX, BY) with BX * BY = kThreads, each thread owning VEC adjacent channels (one 16-byte
// load per row when VEC > 1); grid (channel tiles, G) over row blocks.
template <typename Red, int VEC, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_nsc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, Red red, index_t M,
                      index_t C, typename Red::State* __restrict__ partial) {
  using St = typename Red::State;
  using V = Vec<scalar_t, VEC>;
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
    for (index_t r = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
         r += static_cast<index_t>(gridDim.y) * blockDim.y) {
      const V xv = *reinterpret_cast<const V*>(x + r * C + c0);
      V dv;
      if (dy != nullptr) {
        dv = *reinterpret_cast<const V*>(dy + r * C + c0);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) dv.v[j] = scalar_t(0);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) red.update(s[j], ch[j], xv.v[j], dv.v[j]);
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

// One warp per channel merges the G partial states of that channel, then fin(c, state).
template <typename St, typename Fin>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const St* __restrict__ partial, int64_t G, int64_t C, Fin fin) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (c >= C) return;  // whole warps leave together: the shuffles below stay full-warp
  St s = St::zero();
  for (int64_t g = lane; g < G; g += kWarp) s.merge(partial[g * C + c]);
  s = warp_reduce(s);
  if (lane == 0) fin(c, s);
}

struct StatsFin {
  float *mean, *var;
  __device__ __forceinline__ void operator()(int64_t c, const Welford& s) const {
    mean[c] = s.mean;
    var[c] = s.n > 0.f ? fmaxf(s.m2, 0.f) / s.n : 0.f;
  }
};

struct BackwardFin {
  const float* weight;
  float eps;
  float *sum_dz, *sum_dz_xhat;
  __device__ __forceinline__ void operator()(int64_t c, const Pair& s) const {
    sum_dz[c] = s.a;
    sum_dz_xhat[c] = weight ? s.b / (fabsf(weight[c]) + eps) : s.b;
  }
};

// --- elementwise passes -------------------------------------------------------------------------------

// NCS: grid-stride over units (row, chunk of kThreads * VEC * kUnroll values). VEC > 1 only when
// S % VEC == 0 and the pointers are 16-byte aligned, so a vector never straddles two rows.
template <typename Map, int VEC, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    map_ncs_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ out,
                   Map f, index_t n_rows, index_t C, index_t S, index_t chunks) {
  using V = Vec<scalar_t, VEC>;
  const index_t units = n_rows * chunks;
  for (index_t u = blockIdx.x; u < units; u += gridDim.x) {
    const index_t row = u / chunks;
    const auto ch = f.channel(row % C);
    const index_t base = row * S;
    const index_t s0 = (u - row * chunks) * (kThreads * VEC * kUnroll);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t i = s0 + (static_cast<index_t>(k) * kThreads + threadIdx.x) * VEC;
      if (i < S) {
        const V av = *reinterpret_cast<const V*>(a + base + i);
        V bv, ov;
        if (b != nullptr) {
          bv = *reinterpret_cast<const V*>(b + base + i);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) bv.v[j] = scalar_t(0);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) ov.v[j] = f(ch, av.v[j], bv.v[j]);
        *reinterpret_cast<V*>(out + base + i) = ov;
      }
    }
  }
}

// NSC: the thread layout of reduce_nsc_kernel; per-channel constants computed once per thread.
template <typename Map, int VEC, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    map_nsc_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ out,
                   Map f, index_t M, index_t C) {
  using V = Vec<scalar_t, VEC>;
  const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  typename Map::Ch ch[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) ch[j] = f.channel(c0 + j);
  for (index_t r = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += static_cast<index_t>(gridDim.y) * blockDim.y) {
    const index_t off = r * C + c0;
    const V av = *reinterpret_cast<const V*>(a + off);
    V bv, ov;
    if (b != nullptr) {
      bv = *reinterpret_cast<const V*>(b + off);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) bv.v[j] = scalar_t(0);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) ov.v[j] = f(ch[j], av.v[j], bv.v[j]);
    *reinterpret_cast<V*>(out + off) = ov;
  }
}

}  // namespace cuda
}  // namespace ifbf
