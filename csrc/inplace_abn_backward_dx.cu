// CUDA launcher of InPlace-ABN's dx map: dx from y, dy, the saved (float32) invstd and (training) the means of
// dz and dz * x-hat over the batch (BackwardMap, inplace_abn_kernels.cuh). The shared launch code is
// in inplace_abn_launch.cuh.
#include "inplace_abn_launch.cuh"

namespace ifbf {
namespace abn_cuda {

void backward_dx_cuda(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& invstd, const Opt& weight,
                      const Opt& bias, const Opt& mean_dz, const Opt& mean_dz_xhat, double eps, Act act, double slope,
                      at::Tensor& dx) {
  IFBF_CUDA_GUARD(y.device());
  const Geometry g = geometry_of(y);
  c10::optional<at::Tensor> wk, bk, mk, xk;
  const float* pw = opt_ptr(weight, wk);
  const float* pb = opt_ptr(bias, bk);
  const float* pm = opt_ptr(mean_dz, mk);
  const float* px = opt_ptr(mean_dz_xhat, xk);
  IFBF_DISPATCH_CUDA_TYPES(y.scalar_type(), "inplace_abn_backward_dx_cuda", [&] {
    dispatch_act(act, [&](auto a) {
      cuda::BackwardMap<decltype(a)::value, scalar_t> f{invstd.const_data_ptr<float>(), pw, pb, pm, px,
                                                       float(eps), float(slope), float(1.0 / slope)};
      map(g, y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), f);
    });
  });
}

}  // namespace abn_cuda
}  // namespace ifbf
