// Declarations of every CPU / CUDA kernel pair of InPlace-ABN in ifbf_fast._C (mapillary/inplace_abn
// layout: inplace_abn.cpp checks arguments, registers the ops and their C++ autograd; inplace_abn_cpu.cpp
// and the inplace_abn_*.cu units implement them).
//
// x: (N, C, ...) fp32/fp16/bf16 (fp64 on the CPU too). Per-channel tensors: the *statistics* (mean,
// var, invstd = 1 / sqrt(var + eps)) are float64 on every device, so that they hold what fp32 cannot
// (var of values near 1e20 overflows fp32, its invstd does not); the *parameters* (weight, bias, the
// running buffers, the gradient sums) are in the "parameter dtype": fp64 for fp64 x, else fp32.
// g = |weight| + eps (1 without weight), dz = the gradient before the activation.
//
// The invstd saved for backward (and taken by the backward ops) is in the parameter dtype: the
// gradients it scales are below the normal float range wherever float32 cannot hold it.
//
// Single process, one dispatcher call per direction (C++ autograd, inplace_abn.cpp):
//   inplace_abn(x, w?, b?, running_mean!, running_var!, num_batches_tracked!?, training, momentum, eps, act,
//               slope) -> y, invstd
//       training: batch statistics, running buffers updated in place (unbiased var) and num_batches_tracked
//       incremented by 1 (BatchNorm2d's counter, in the same kernel: no launch of its own), y;
//       evaluation: the running statistics, nothing written but y
//   inplace_abn_backward(y, dy, invstd, w?, b?, training, param_grads, ...) -> dx, dweight, dbias
// Primitives for the synchronised path (collectives are Python calls between them):
//   inplace_abn_statistics(x)                          -> mean, biased var (float64), count of the batch
//   inplace_abn_forward(x, mean, invstd, w?, b?, ...)  -> y = act((x - mean) * invstd * g + b)
//   inplace_abn_backward_reduce(y, dy, w?, b?, ...)    -> sum(dz), sum(dz * xhat), z and xhat rebuilt from y
//   inplace_abn_backward_dx(y, dy, invstd, w?, b?, mdz?, mdzx?) -> dx = (dz - mdz - xhat * mdzx) * g * invstd
//   inplace_abn_running_update(mean, var, count, running_mean!, running_var!, num_batches_tracked!?, momentum)
//       the running buffers lerped with the union statistics (unbiased var) and the counter + 1, one kernel
// The *_cpu / *_cuda functions receive checked arguments in one of the two layouts below.
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

// Dense channels last (..., C contiguous): read from the strides, no permuted view (host cost per call).
inline bool is_nsc_dense(const at::Tensor& x) {
  if (x.dim() < 3 || (x.size(1) != 1 && x.stride(1) != 1)) return false;
  int64_t expected = x.size(1);
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return x.size(0) == 1 || x.stride(0) == expected;
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
using Opt = c10::optional<at::Tensor>;

// What the fused training statistics write: the float64 mean and invstd of the batch, and the running
// buffers (parameter dtype) lerped in place with the unbiased variance (saturated at the dtype's max).
struct TrainStats {
  at::Tensor mean, invstd;       // outputs, (C,) float64 (for the forward map)
  at::Tensor invstd_saved;       // output, (C,) parameter dtype (saved for backward)
  at::Tensor running_mean, running_var;  // updated in place
  at::Tensor num_batches_tracked;        // one int64 element, + 1 in place; undefined: no counter
  double momentum, eps;
};

#define IFBF_DECLARE_ABN(DEV)                                                                              \
  Stats statistics_##DEV(const at::Tensor& x);                                                            \
  void train_statistics_##DEV(const at::Tensor& x, TrainStats& st);                                      \
  void eval_statistics_##DEV(const at::Tensor& running_mean, const at::Tensor& running_var, double eps,    \
                             at::Tensor& mean, at::Tensor& invstd, at::Tensor& invstd_saved);            \
  void forward_##DEV(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd, const Opt& weight, \
                     const Opt& bias, double eps, Act act, double slope, at::Tensor& y);                  \
  Sums backward_reduce_##DEV(const at::Tensor& y, const at::Tensor& dy, const Opt& weight, const Opt& bias,  \
                             double eps, Act act, double slope);                                          \
  /* fused: dweight = sum(dz * xhat) * sign(w), dbias = sum(dz), and (training) their means over the batch */ \
  void backward_reduce_params_##DEV(const at::Tensor& y, const at::Tensor& dy, const Opt& weight,         \
                                    const Opt& bias, double eps, Act act, double slope, bool training,     \
                                    at::Tensor& dweight, at::Tensor& dbias, at::Tensor& mean_dz,          \
                                    at::Tensor& mean_dz_xhat);                                           \
  void backward_dx_##DEV(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& invstd, const Opt& weight, \
                         const Opt& bias, const Opt& mean_dz, const Opt& mean_dz_xhat, double eps, Act act, \
                         double slope, at::Tensor& dx);                                          \
  /* count: (1,) float64 (the union batch); num_batches_tracked may be undefined */                      \
  void running_update_##DEV(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,        \
                            const at::Tensor& running_mean, const at::Tensor& running_var,                \
                            const at::Tensor& num_batches_tracked, double momentum);

namespace abn_cpu {
IFBF_DECLARE_ABN(cpu)
}
#ifdef IFBF_WITH_CUDA
namespace abn_cuda {
IFBF_DECLARE_ABN(cuda)
}
#endif

}  // namespace ifbf
