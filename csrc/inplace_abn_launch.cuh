#pragma once
// What the CUDA launchers of InPlace-ABN share: grid sizes, vector width, 32/64-bit indexing, dtype and
// activation dispatch, and the generic reduce/map launches. The kernels are in inplace_abn_kernels.cuh;
// the arguments were checked in inplace_abn.cpp. Each entry point has a translation unit of its own
// (inplace_abn_{statistics,forward,backward_reduce,backward_dx}.cu) so that the build compiles them in
// parallel: one file held every instantiation and took most of the extension's build time.
// Everything here has internal linkage (anonymous namespace): each unit gets the copies it uses.
// ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in cuSPARSE/cuBLAS headers that a bare
// toolkit (nvcc + runtime, as on the build machines) does not ship.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "inplace_abn.h"
#include "inplace_abn_kernels.cuh"

namespace ifbf {
namespace {

using cuda::kThreads;
using cuda::kUnroll;

// fp32, fp16 and bf16 only on CUDA (inplace_abn.cpp rejects fp64 there).
#define IFBF_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename F>
void dispatch_index(int64_t numel, F f) {
  // headroom: grid-stride loop counters step past the last index before the loop test
  if (numel < std::numeric_limits<int32_t>::max() - (int64_t{1} << 26)) {
    f(int32_t{0});
  } else {
    f(int64_t{0});
  }
}

int num_sms() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return sms;
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channels-last thread block: BX threads across channel vectors (a power of two up to a warp),
// BY = kThreads / BX across rows.
dim3 nsc_block(int64_t c, int vec) {
  const int64_t need = ceil_div(c, vec);
  int bx = 1;
  while (bx < cuda::kWarp && bx < need) bx *= 2;
  return dim3(bx, kThreads / bx);
}

constexpr int64_t kMaxGridY = 65535;

// Partial reduction states, then one combine kernel: fin(c, state) for every channel.
template <typename Red, typename Fin, typename scalar_t>
void reduce(const Geometry& g, const scalar_t* x, const scalar_t* dy, const Red& red, const Fin& fin,
            const at::TensorOptions& opts) {
  using St = typename Red::State;
  static_assert(sizeof(St) % sizeof(float) == 0, "state must be a whole number of floats");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t target = int64_t{num_sms()} * 4;  // resident blocks enough to saturate HBM
  const int64_t numel = g.n * g.c * g.s;
  int64_t G;
  at::Tensor partial;
  auto alloc = [&](int64_t groups) {
    return at::empty({groups * g.c * int64_t(sizeof(St) / sizeof(float))}, opts.dtype(at::kFloat));
  };
  if (!g.channels_last) {
    const int64_t chunks = ceil_div(g.s, kThreads * kUnroll);
    G = std::clamp<int64_t>(target / g.c, 1, std::min(g.n * chunks, kMaxGridY));
    partial = alloc(G);
    St* pp = reinterpret_cast<St*>(partial.data_ptr<float>());
    dispatch_index(numel, [&](auto idx) {
      using index_t = decltype(idx);
      cuda::reduce_ncs_kernel<Red, scalar_t, index_t><<<dim3(g.c, G), kThreads, 0, stream>>>(
          x, dy, red, index_t(g.n), index_t(g.c), index_t(g.s), index_t(chunks), pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = g.c % kVec == 0 && aligned16(x) && aligned16(dy);
    const dim3 block = nsc_block(g.c, vec ? kVec : 1);
    const int64_t gx = ceil_div(g.c, int64_t(block.x) * (vec ? kVec : 1));
    G = std::clamp<int64_t>(target / gx, 1, std::min(ceil_div(g.n, block.y), kMaxGridY));
    partial = alloc(G);
    St* pp = reinterpret_cast<St*>(partial.data_ptr<float>());
    dispatch_index(numel, [&](auto idx) {
      using index_t = decltype(idx);
      if (vec) {
        cuda::reduce_nsc_kernel<Red, kVec, scalar_t, index_t>
            <<<dim3(gx, G), block, 0, stream>>>(x, dy, red, index_t(g.n), index_t(g.c), pp);
      } else {
        cuda::reduce_nsc_kernel<Red, 1, scalar_t, index_t>
            <<<dim3(gx, G), block, 0, stream>>>(x, dy, red, index_t(g.n), index_t(g.c), pp);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const int64_t per_block = kThreads / cuda::kWarp;
  cuda::combine_kernel<St, Fin><<<ceil_div(g.c, per_block), kThreads, 0, stream>>>(
      reinterpret_cast<const St*>(partial.data_ptr<float>()), G, g.c, fin);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out = f(a, b) elementwise with per-channel constants.
template <typename Map, typename scalar_t>
void map(const Geometry& g, const scalar_t* a, const scalar_t* b, scalar_t* out, const Map& f) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t numel = g.n * g.c * g.s;
  const bool ptrs = aligned16(a) && aligned16(b) && aligned16(out);
  dispatch_index(numel, [&](auto idx) {
    using index_t = decltype(idx);
    if (!g.channels_last) {
      const bool vec = ptrs && g.s % kVec == 0;
      const int64_t per_unit = int64_t(kThreads) * kUnroll * (vec ? kVec : 1);
      const int64_t chunks = ceil_div(g.s, per_unit);
      const int64_t blocks = std::min<int64_t>(g.n * g.c * chunks, int64_t{num_sms()} * 16);
      if (vec) {
        cuda::map_ncs_kernel<Map, kVec, scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
            a, b, out, f, index_t(g.n * g.c), index_t(g.c), index_t(g.s), index_t(chunks));
      } else {
        cuda::map_ncs_kernel<Map, 1, scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
            a, b, out, f, index_t(g.n * g.c), index_t(g.c), index_t(g.s), index_t(chunks));
      }
    } else {
      const bool vec = ptrs && g.c % kVec == 0;
      const dim3 block = nsc_block(g.c, vec ? kVec : 1);
      const int64_t gx = ceil_div(g.c, int64_t(block.x) * (vec ? kVec : 1));
      const int64_t gy = std::clamp<int64_t>(int64_t{num_sms()} * 16 / gx, 1,
                                             std::min(ceil_div(g.n, block.y), kMaxGridY));
      if (vec) {
        cuda::map_nsc_kernel<Map, kVec, scalar_t, index_t>
            <<<dim3(gx, gy), block, 0, stream>>>(a, b, out, f, index_t(g.n), index_t(g.c));
      } else {
        cuda::map_nsc_kernel<Map, 1, scalar_t, index_t>
            <<<dim3(gx, gy), block, 0, stream>>>(a, b, out, f, index_t(g.n), index_t(g.c));
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const float* opt_ptr(const c10::optional<at::Tensor>& t, c10::optional<at::Tensor>& keep) {
  if (!t.has_value()) return nullptr;
  keep = t->contiguous();
  return keep->const_data_ptr<float>();
}

}  // namespace
}  // namespace ifbf
