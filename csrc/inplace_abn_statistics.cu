// CUDA launcher of InPlace-ABN's statistics: per-channel mean and biased variance of x (Welford partials, then one combine).
// The shared launch code is in inplace_abn_launch.cuh.
#include "inplace_abn_launch.cuh"

namespace ifbf {

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

}  // namespace ifbf
