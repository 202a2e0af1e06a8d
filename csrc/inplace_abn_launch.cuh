#pragma once
// What the CUDA launchers of InPlace-ABN share: grid sizes, vector width, 32/64-bit indexing, dtype and
// activation dispatch, and the generic reduce/map launches. The kernels are in inplace_abn_kernels.cuh;
// the arguments were checked in inplace_abn.cpp. Each entry point has a translation unit of its own
// (inplace_abn_{statistics,forward,backward_reduce,backward_dx}.cu) so that the build compiles them in
// parallel: one file held every instantiation and took most of the extension's build time.
// Everything here has internal linkage (anonymous namespace): each unit gets the copies it uses.
// ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in cuSPARSE/cuBLAS headers that a bare
// toolkit (nvcc + runtime, as on the build machines) does not ship.
//
// Under IFBF_SIMT_EMU (the CPU emulator of csrc/simt/simt_emu.h, for the tests) the same code runs on CPU
// tensors: launch_kernel() then runs the kernel's blocks on the CPU, and the device guard, the stream and
// the multiprocessor count are the emulator's. Nothing else differs.
#include <ATen/Dispatch.h>
#ifndef IFBF_SIMT_EMU
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>

#include "inplace_abn.h"
#include "inplace_abn_kernels.cuh"

namespace ifbf {
namespace {

using cuda::kThreads;

#ifdef IFBF_SIMT_EMU
#define IFBF_CUDA_GUARD(device) ((void)(device))
using Stream = int;
Stream current_stream() { return 0; }
int num_sms() { return simt::sms(); }

template <typename... P, typename... A>
void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, Stream, A&&... args) {
  simt::launch(kernel, grid, block, std::forward<A>(args)...);
}
#else
#define IFBF_CUDA_GUARD(device) const c10::cuda::CUDAGuard device_guard_(device)
using Stream = cudaStream_t;
Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

int num_sms() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return sms;
}

// kernel<<<grid, block, 0, stream>>>(args...), then the launch error check.
template <typename... P, typename... A>
void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, Stream stream, A&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

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

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

using plan::ceil_div;

// The vector width of a pass over tensors of `elt`-byte elements at these pointers (plan::pick_vec) and,
// for NCS, their common offset from a 16-byte boundary in elements (p0).
template <typename scalar_t>
int vector_width(const Geometry& g, int64_t& p0, const scalar_t* a, const scalar_t* b = nullptr,
                 const scalar_t* c = nullptr) {
  const auto mis = [](const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16); };
  bool ok;
  if (g.channels_last) {
    ok = aligned16(a) && aligned16(b) && aligned16(c);
    p0 = 0;
  } else {
    const int64_t m = mis(a);
    ok = (b == nullptr || mis(b) == m) && (c == nullptr || mis(c) == m);
    p0 = m / int64_t(sizeof(scalar_t));
  }
  const int vec = plan::pick_vec(g.channels_last, g.c, int(sizeof(scalar_t)), ok);
  if (vec == 1) p0 = 0;
  return vec;
}

// Calls f(std::integral_constant<int, V>{}) for the vector width chosen at run time.
template <typename scalar_t, typename F>
void dispatch_vec(int vec, F f) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (vec == kVec) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Partial reduction states, then one combine kernel: fin(c, state) for every channel.
template <typename Red, typename Fin, typename scalar_t>
void reduce(const Geometry& g, const scalar_t* x, const scalar_t* dy, const Red& red, const Fin& fin,
            const at::TensorOptions& opts) {
  using St = typename Red::State;
  static_assert(sizeof(St) % sizeof(float) == 0, "state must be a whole number of floats");
  const Stream stream = current_stream();
  int64_t p0;
  const int vec = vector_width(g, p0, x, dy);
  const plan::Launch L = plan::plan_reduce(g.channels_last, g.n, g.c, g.s, vec, Red::kTwoInputs ? 2 : 1, num_sms());
  at::Tensor partial = at::empty({L.groups * g.c * int64_t(sizeof(St) / sizeof(float))}, opts.dtype(at::kFloat));
  St* pp = reinterpret_cast<St*>(partial.data_ptr<float>());
  dispatch_index(g.n * g.c * g.s, [&](auto idx) {
    using index_t = decltype(idx);
    dispatch_vec<scalar_t>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      if (!g.channels_last) {
        launch_kernel(&cuda::reduce_ncs_kernel<Red, V, scalar_t, index_t>, dim3(L.grid_x), dim3(kThreads), stream,
                      x, dy, red, index_t(g.n * g.c), index_t(g.c), index_t(g.s), index_t(L.chunks), index_t(p0), pp);
      } else {
        launch_kernel(&cuda::reduce_nsc_kernel<Red, V, scalar_t, index_t>, dim3(L.grid_x, L.grid_y),
                      dim3(L.block_x, L.block_y), stream, x, dy, red, index_t(g.n), index_t(g.c), pp);
      }
    });
  });
  const plan::Launch C = plan::plan_combine(g.c, L.groups);
  launch_kernel(&cuda::combine_kernel<St, Fin>, dim3(C.grid_x), dim3(kThreads), stream,
                reinterpret_cast<const St*>(pp), L.groups, g.c, fin);
}

// out = f(a, b) elementwise with per-channel constants (b unused when Map::kTwoInputs is false).
template <typename Map, typename scalar_t>
void map(const Geometry& g, const scalar_t* a, const scalar_t* b, scalar_t* out, const Map& f) {
  const Stream stream = current_stream();
  int64_t p0;
  const int vec = vector_width(g, p0, a, b, static_cast<const scalar_t*>(out));
  const plan::Launch L = plan::plan_map(g.channels_last, g.n, g.c, g.s, vec, Map::kTwoInputs ? 2 : 1, num_sms());
  dispatch_index(g.n * g.c * g.s, [&](auto idx) {
    using index_t = decltype(idx);
    dispatch_vec<scalar_t>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      if (!g.channels_last) {
        launch_kernel(&cuda::map_ncs_kernel<Map, V, scalar_t, index_t>, dim3(L.grid_x), dim3(kThreads), stream,
                      a, b, out, f, index_t(g.n * g.c), index_t(g.c), index_t(g.s), index_t(L.chunks), index_t(p0));
      } else {
        launch_kernel(&cuda::map_nsc_kernel<Map, V, scalar_t, index_t>, dim3(L.grid_x, L.grid_y),
                      dim3(L.block_x, L.block_y), stream, a, b, out, f, index_t(g.n), index_t(g.c));
      }
    });
  });
}

const float* opt_ptr(const c10::optional<at::Tensor>& t, c10::optional<at::Tensor>& keep) {
  if (!t.has_value()) return nullptr;
  keep = t->contiguous();
  return keep->const_data_ptr<float>();
}

}  // namespace
}  // namespace ifbf
