// Declarations of every CPU / CUDA kernel pair of ifbf_fast._C (mapillary/inplace_abn layout:
// ifbf_ops.cpp checks arguments and registers the ops; *_cpu.cpp and *_cuda.cu implement them).
#pragma once

#include <torch/types.h>

#include <tuple>

namespace ifbf {

// Per-channel batch statistics of x (N, C, ...): fp32 mean, biased variance and count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> abn_statistics_cpu(const at::Tensor& x);
#ifdef IFBF_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> abn_statistics_cuda(const at::Tensor& x);
#endif

}  // namespace ifbf
