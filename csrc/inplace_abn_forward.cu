// CUDA launcher of InPlace-ABN's forward map: y = act((x - mean) * invstd * (|w| + eps) + b) from the
// float64 statistics (ForwardMap, inplace_abn_kernels.cuh). The shared launch code is in
// inplace_abn_launch.cuh.
#include "inplace_abn_launch.cuh"

namespace ifbf {
namespace abn_cuda {

void forward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd, const Opt& weight,
                  const Opt& bias, double eps, Act act, double slope, at::Tensor& y) {
  IFBF_CUDA_GUARD(x.device());
  const Geometry g = geometry_of(x);
  c10::optional<at::Tensor> wk, bk;
  const float* pw = opt_ptr(weight, wk);
  const float* pb = opt_ptr(bias, bk);
  IFBF_DISPATCH_CUDA_TYPES(x.scalar_type(), "inplace_abn_forward_cuda", [&] {
    dispatch_act(act, [&](auto a) {
      cuda::ForwardMap<decltype(a)::value, scalar_t> f{mean.const_data_ptr<double>(), invstd.const_data_ptr<double>(),
                                                      pw, pb, float(eps), float(slope)};
      map(g, x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr), y.data_ptr<scalar_t>(), f);
    });
  });
}

}  // namespace abn_cuda
}  // namespace ifbf
