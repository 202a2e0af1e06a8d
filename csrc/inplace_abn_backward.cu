// CUDA launcher of InPlace-ABN's backward: dx from y, dy and the (all-reduced) means of dz and dz * x-hat.
// The shared launch code is in inplace_abn_launch.cuh.
#include "inplace_abn_launch.cuh"

namespace ifbf {

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
