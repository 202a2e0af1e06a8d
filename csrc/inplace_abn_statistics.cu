// CUDA launchers of InPlace-ABN's statistics: the primitive (mean and biased var of the local batch, for
// the synchronised path), the fused training statistics (mean, invstd and the running buffers updated
// in place, in the combine kernel's epilogue), and the evaluation constants from the running buffers.
// Shifted float64 sums, then one combine (StatsRed, inplace_abn_kernels.cuh). The shared launch code
// is in inplace_abn_launch.cuh.
#include "inplace_abn_launch.cuh"

namespace ifbf {
namespace abn_cuda {

namespace {
// Evaluation: the float64 mean and invstd from the running buffers, one thread per channel.
__global__ void eval_statistics_kernel(const float* __restrict__ running_mean, const float* __restrict__ running_var,
                                       double eps, int64_t C, double* __restrict__ mean, double* __restrict__ invstd,
                                       float* __restrict__ invstd_saved) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  mean[c] = running_mean[c];
  invstd[c] = inv_std(running_var[c], eps);
  invstd_saved[c] = static_cast<float>(invstd[c]);
}

// The synchronised path's running-statistics update (inplace_abn.cpp running_update), one thread per
// channel; thread 0 also increments num_batches_tracked (nullptr: none).
__global__ void running_update_kernel(const double* __restrict__ mean, const double* __restrict__ var,
                                      const double* __restrict__ count, double momentum, int64_t C,
                                      float* __restrict__ running_mean, float* __restrict__ running_var,
                                      int64_t* __restrict__ num_batches_tracked) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c == 0 && num_batches_tracked != nullptr) *num_batches_tracked += 1;
  if (c >= C) return;
  const double n = *count;
  running_mean[c] = static_cast<float>((1.0 - momentum) * running_mean[c] + momentum * mean[c]);
  running_var[c] = static_cast<float>(
      saturate((1.0 - momentum) * running_var[c] + momentum * var[c] * (n / (n - 1.0)), 3.4028234663852886e38));
}

// The stride between the first values of two channels: NCS S, NSC 1 (K of StatsRed).
int64_t k_stride(const Geometry& g) { return g.channels_last ? 1 : g.s; }
}  // namespace

Stats statistics_cuda(const at::Tensor& x) {
  IFBF_CUDA_GUARD(x.device());
  const Geometry g = geometry_of(x);
  const auto sopt = x.options().dtype(at::kDouble);
  auto mean = at::empty({g.c}, sopt);
  auto var = at::empty({g.c}, sopt);
  auto count = at::full({1}, g.n * g.s, x.options().dtype(at::kLong));
  IFBF_DISPATCH_CUDA_TYPES(x.scalar_type(), "inplace_abn_statistics_cuda", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    reduce(g, px, static_cast<const scalar_t*>(nullptr), cuda::StatsRed<scalar_t>{px, k_stride(g)},
           cuda::StatsFin<scalar_t>{px, k_stride(g), double(g.n * g.s), mean.data_ptr<double>(),
                                    var.data_ptr<double>()},
           x.options());
  });
  return {mean, var, count};
}

void train_statistics_cuda(const at::Tensor& x, TrainStats& st) {
  IFBF_CUDA_GUARD(x.device());
  const Geometry g = geometry_of(x);
  IFBF_DISPATCH_CUDA_TYPES(x.scalar_type(), "inplace_abn_cuda", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    reduce(g, px, static_cast<const scalar_t*>(nullptr), cuda::StatsRed<scalar_t>{px, k_stride(g)},
           cuda::TrainFin<scalar_t>{px, k_stride(g), double(g.n * g.s), st.eps, st.momentum,
                                    st.mean.data_ptr<double>(), st.invstd.data_ptr<double>(),
                                    st.invstd_saved.data_ptr<float>(), st.running_mean.data_ptr<float>(),
                                    st.running_var.data_ptr<float>(),
                                    st.num_batches_tracked.defined() ? st.num_batches_tracked.data_ptr<int64_t>()
                                                                     : nullptr},
           x.options());
  });
}

void eval_statistics_cuda(const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                          at::Tensor& mean, at::Tensor& invstd, at::Tensor& invstd_saved) {
  IFBF_CUDA_GUARD(running_mean.device());
  const int64_t c = running_mean.numel();
  if (c == 0) return;
  const auto rm = running_mean.contiguous(), rv = running_var.contiguous();
  launch_kernel(&eval_statistics_kernel, dim3(ceil_div(c, kThreads)), dim3(kThreads), current_stream(),
                rm.const_data_ptr<float>(), rv.const_data_ptr<float>(), eps, c, mean.data_ptr<double>(),
                invstd.data_ptr<double>(), invstd_saved.data_ptr<float>());
}

void running_update_cuda(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                         const at::Tensor& running_mean, const at::Tensor& running_var,
                         const at::Tensor& num_batches_tracked, double momentum) {
  IFBF_CUDA_GUARD(running_mean.device());
  TORCH_CHECK_VALUE(running_mean.scalar_type() == at::kFloat,
                    "inplace_abn_running_update: running buffers on CUDA must be float32; got ",
                    running_mean.scalar_type());
  const int64_t c = running_mean.numel();
  const int64_t blocks = std::max<int64_t>(ceil_div(c, kThreads), 1);  // the counter thread runs for C = 0 too
  launch_kernel(&running_update_kernel, dim3(blocks), dim3(kThreads), current_stream(), mean.const_data_ptr<double>(),
                var.const_data_ptr<double>(), count.const_data_ptr<double>(), momentum, c,
                running_mean.data_ptr<float>(), running_var.data_ptr<float>(),
                num_batches_tracked.defined() ? num_batches_tracked.data_ptr<int64_t>() : nullptr);
}

}  // namespace abn_cuda
}  // namespace ifbf
