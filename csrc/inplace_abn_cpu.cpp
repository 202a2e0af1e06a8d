// CPU kernels of InPlace-ABN.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include "ifbf_ops.h"

namespace ifbf {

std::tuple<at::Tensor, at::Tensor, at::Tensor> abn_statistics_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "abn_statistics: x must be (N, C, ...); got ", x.sizes());
  const int64_t c = x.size(1);
  // (C, N*S) view in fp64 accumulation for a two-pass mean/variance that does not cancel.
  auto xc = x.transpose(0, 1).reshape({c, -1}).to(at::kDouble);
  const int64_t n = xc.size(1);
  auto mean = at::empty({c}, x.options().dtype(at::kFloat));
  auto var = at::empty({c}, x.options().dtype(at::kFloat));
  auto xa = xc.accessor<double, 2>();
  auto ma = mean.accessor<float, 1>();
  auto va = var.accessor<float, 1>();
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      double s = 0;
      for (int64_t i = 0; i < n; ++i) s += xa[ch][i];
      const double m = n ? s / n : 0.0;
      double q = 0;
      for (int64_t i = 0; i < n; ++i) q += (xa[ch][i] - m) * (xa[ch][i] - m);
      ma[ch] = static_cast<float>(m);
      va[ch] = static_cast<float>(n ? q / n : 0.0);
    }
  });
  auto count = at::full({1}, n, x.options().dtype(at::kLong));
  return {mean, var, count};
}

}  // namespace ifbf
