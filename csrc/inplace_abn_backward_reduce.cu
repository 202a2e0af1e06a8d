// CUDA launcher of InPlace-ABN's backward reduce: the per-channel sums of dz and dz * x-hat, rebuilt from y (the inverse activation).
// The shared launch code is in inplace_abn_launch.cuh.
#include "inplace_abn_launch.cuh"

namespace ifbf {

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

}  // namespace ifbf
