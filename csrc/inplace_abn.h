// Declarations of every CPU / CUDA kernel pair of ifbf_fast._C (mapillary/inplace_abn layout:
// ifbf_ops.cpp checks arguments and registers the ops; *_cpu.cpp and *_cuda.cu implement them).
//
// InPlace-ABN primitives (x: (N, C, ...) fp32/fp16/bf16, fp64 on CPU; per-channel tensors in the
// "parameter dtype": fp64 for fp64 x, else fp32):
//   abn_statistics(x)                              -> mean, biased var, count of the local batch
//   abn_forward(x, mean, var, w?, b?, ...)         -> y = act((x - mean) * rsqrt(var + eps) * g + b)
//   abn_backward_reduce(y, dy, w?, b?, ...)        -> sum(dz), sum(dz * xhat), z and xhat rebuilt from y
//   abn_backward(y, dy, var, w?, b?, mdz?, mdzx?)  -> dx = (dz - mdz - xhat * mdzx) * g * rsqrt(var + eps)
// with g = |w| + eps (1 without weight) and dz the gradient before the activation. The *_impl
// functions receive checked arguments in one of the two layouts below.
#pragma once

#include <torch/types.h>

#include <string>
#include <tuple>
#include <vector>

#include "inplace_abn_common.h"

namespace ifbf {

// How the kernels walk x. NCS: contiguous (N, C, S) with S = prod(spatial); NSC: channels last,
// i.e. contiguous (M, C) with M = N * S. Any other strides are copied to NCS first (one copy).
struct Geometry {
  bool channels_last;  // NSC
  int64_t n;           // NCS: N; NSC: M = N * S rows
  int64_t c;
  int64_t s;           // NCS: S; NSC: 1
};

inline bool is_nsc_dense(const at::Tensor& x) {
  if (x.dim() < 3) return false;
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  return x.permute(perm).is_contiguous();
}

// x itself when the kernels can walk it, else a contiguous copy.
inline at::Tensor canonical(const at::Tensor& x) {
  return (x.is_contiguous() || is_nsc_dense(x)) ? x : x.contiguous();
}

inline Geometry geometry_of(const at::Tensor& x) {  // x canonical
  const int64_t n = x.size(0), c = x.size(1);
  int64_t s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s *= x.size(d);
  if (s == 1 || !x.is_contiguous()) return {true, n * s, c, 1};  // (N, C) is channels last too
  return {false, n, c, s};
}


using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Sums = std::tuple<at::Tensor, at::Tensor>;

Stats abn_statistics_cpu(const at::Tensor& x);
void abn_forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                     double eps, Act act, double slope, at::Tensor& y);
Sums abn_backward_reduce_cpu(const at::Tensor& y, const at::Tensor& dy,
                             const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, double eps, Act act, double slope);
void abn_backward_cpu(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& var,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& mean_dz,
                      const c10::optional<at::Tensor>& mean_dz_xhat, double eps, Act act,
                      double slope, at::Tensor& dx);

#ifdef IFBF_WITH_CUDA
Stats abn_statistics_cuda(const at::Tensor& x);
void abn_forward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                      double eps, Act act, double slope, at::Tensor& y);
Sums abn_backward_reduce_cuda(const at::Tensor& y, const at::Tensor& dy,
                              const c10::optional<at::Tensor>& weight,
                              const c10::optional<at::Tensor>& bias, double eps, Act act,
                              double slope);
void abn_backward_cuda(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& var,
                       const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& mean_dz,
                       const c10::optional<at::Tensor>& mean_dz_xhat, double eps, Act act,
                       double slope, at::Tensor& dx);
#endif

}  // namespace ifbf
