// CUDA launchers of InPlace-ABN's backward reduce: the per-channel sums of dz and dz * x-hat, rebuilt
// from y (the inverse activation). The primitive returns the two sums (the synchronised path
// all-reduces them); the fused variant writes dweight, dbias and the batch means in the combine
// kernel's epilogue (BackwardParamsFin). The shared launch code is in inplace_abn_launch.cuh.
#include "inplace_abn_launch.cuh"

namespace ifbf {
namespace abn_cuda {

Sums backward_reduce_cuda(const at::Tensor& y, const at::Tensor& dy, const Opt& weight, const Opt& bias, double eps,
                          Act act, double slope) {
  IFBF_CUDA_GUARD(y.device());
  const Geometry g = geometry_of(y);
  const auto popt = y.options().dtype(at::kFloat);
  auto sum_dz = at::empty({g.c}, popt);
  auto sum_dz_xhat = at::empty({g.c}, popt);
  c10::optional<at::Tensor> wk, bk;
  const float* pw = opt_ptr(weight, wk);
  const float* pb = opt_ptr(bias, bk);
  IFBF_DISPATCH_CUDA_TYPES(y.scalar_type(), "inplace_abn_backward_reduce_cuda", [&] {
    dispatch_act(act, [&](auto a) {
      reduce(g, y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
             cuda::BackwardRed<decltype(a)::value, scalar_t>{pb, float(slope), float(1.0 / slope)},
             cuda::BackwardFin{pw, float(eps), sum_dz.data_ptr<float>(), sum_dz_xhat.data_ptr<float>()},
             y.options());
    });
  });
  return {sum_dz, sum_dz_xhat};
}

void backward_reduce_params_cuda(const at::Tensor& y, const at::Tensor& dy, const Opt& weight, const Opt& bias,
                                 double eps, Act act, double slope, bool training, at::Tensor& dweight,
                                 at::Tensor& dbias, at::Tensor& mean_dz, at::Tensor& mean_dz_xhat) {
  IFBF_CUDA_GUARD(y.device());
  const Geometry g = geometry_of(y);
  c10::optional<at::Tensor> wk, bk;
  const float* pw = opt_ptr(weight, wk);
  const float* pb = opt_ptr(bias, bk);
  const float inv_n = float(1.0 / double(g.n * g.s));
  IFBF_DISPATCH_CUDA_TYPES(y.scalar_type(), "inplace_abn_backward_cuda", [&] {
    dispatch_act(act, [&](auto a) {
      reduce(g, y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
             cuda::BackwardRed<decltype(a)::value, scalar_t>{pb, float(slope), float(1.0 / slope)},
             cuda::BackwardParamsFin{pw, float(eps), inv_n, training, dweight.data_ptr<float>(),
                                     dbias.data_ptr<float>(), mean_dz.data_ptr<float>(),
                                     mean_dz_xhat.data_ptr<float>()},
             y.options());
    });
  });
}

}  // namespace abn_cuda
}  // namespace ifbf
