// CUDA launchers of InPlace-ABN: grid sizes, vector width, 32/64-bit indexing, dtype and activation
// dispatch. The kernels are in inplace_abn_kernels.cuh; the arguments were checked in ifbf_ops.cpp.
// ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in cuSPARSE/cuBLAS headers that a bare
// toolkit (nvcc + runtime, as on the build machines) does not ship.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "ifbf_ops.h"
#include "inplace_abn_kernels.cuh"

namespace ifbf {
namespace {

using cuda::kThreads;
using cuda::kUnroll;

// fp32, fp16 and bf16 only on CUDA (ifbf_ops.cpp rejects fp64 there).
#define IFBF_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename F>
void dispatch_act(Act act, F f) {
  switch (act) {
    case Act::LeakyRelu: f(std::integral_constant<Act, Act::LeakyRelu>{}); break;
    case Act::Elu: f(std::integral_constant<Act, Act::Elu>{}); break;
    case Act::Identity: f(std::integral_constant<Act, Act::Identity>{}); break;
  }
}

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

Stats abn_statistics_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  const auto popt = x.options().dtype(at::kFloat);
  auto mean = at::empty({g.c}, popt);
  auto var = at::empty({g.c}, popt);
  auto count = at::full({1}, g.n * g.s, x.options().dtype(at::kLong));
  if (x.numel() == 0) {  // a rank without samples: count 0, and mean/var that weigh nothing
    mean.zero_();
    var.zero_();
    return {mean, var, count};
  }
  IFBF_DISPATCH_CUDA_TYPES(x.scalar_type(), "abn_statistics_cuda", [&] {
    reduce(g, x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr), cuda::StatsRed<scalar_t>{},
           cuda::StatsFin{mean.data_ptr<float>(), var.data_ptr<float>()}, x.options());
  });
  return {mean, var, count};
}

void abn_forward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                      double eps, Act act, double slope, at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  c10::optional<at::Tensor> wk, bk;
  const float* pw = opt_ptr(weight, wk);
  const float* pb = opt_ptr(bias, bk);
  IFBF_DISPATCH_CUDA_TYPES(x.scalar_type(), "abn_forward_cuda", [&] {
    dispatch_act(act, [&](auto a) {
      cuda::ForwardMap<decltype(a)::value, scalar_t> f{mean.const_data_ptr<float>(), var.const_data_ptr<float>(),
                                                      pw, pb, float(eps), float(slope)};
      map(g, x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr), y.data_ptr<scalar_t>(), f);
    });
  });
}

Sums abn_backward_reduce_cuda(const at::Tensor& y, const at::Tensor& dy,
                              const c10::optional<at::Tensor>& weight,
                              const c10::optional<at::Tensor>& bias, double eps, Act act,
                              double slope) {
  const c10::cuda::CUDAGuard guard(y.device());
  const Geometry g = geometry_of(y);
  const auto popt = y.options().dtype(at::kFloat);
  auto sum_dz = at::empty({g.c}, popt);
  auto sum_dz_xhat = at::empty({g.c}, popt);
  if (y.numel() == 0) return {sum_dz.zero_(), sum_dz_xhat.zero_()};
  c10::optional<at::Tensor> wk, bk;
  const float* pw = opt_ptr(weight, wk);
  const float* pb = opt_ptr(bias, bk);
  IFBF_DISPATCH_CUDA_TYPES(y.scalar_type(), "abn_backward_reduce_cuda", [&] {
    dispatch_act(act, [&](auto a) {
      reduce(g, y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
             cuda::BackwardRed<decltype(a)::value, scalar_t>{pb, float(slope), float(1.0 / slope)},
             cuda::BackwardFin{pw, float(eps), sum_dz.data_ptr<float>(), sum_dz_xhat.data_ptr<float>()},
             y.options());
    });
  });
  return {sum_dz, sum_dz_xhat};
}

void abn_backward_cuda(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& var,
                       const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& mean_dz,
                       const c10::optional<at::Tensor>& mean_dz_xhat, double eps, Act act,
                       double slope, at::Tensor& dx) {
  const c10::cuda::CUDAGuard guard(y.device());
  const Geometry g = geometry_of(y);
  c10::optional<at::Tensor> wk, bk, mk, xk;
  const float* pw = opt_ptr(weight, wk);
  const float* pb = opt_ptr(bias, bk);
  const float* pm = opt_ptr(mean_dz, mk);
  const float* px = opt_ptr(mean_dz_xhat, xk);
  IFBF_DISPATCH_CUDA_TYPES(y.scalar_type(), "abn_backward_cuda", [&] {
    dispatch_act(act, [&](auto a) {
      cuda::BackwardMap<decltype(a)::value, scalar_t> f{var.const_data_ptr<float>(), pw, pb, pm, px,
                                                       float(eps), float(slope), float(1.0 / slope)};
      map(g, y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), f);
    });
  });
}

}  // namespace ifbf
