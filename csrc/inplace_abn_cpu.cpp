// CPU kernels of InPlace-ABN: ATen parallel loops over channels (NCS) or row blocks (channels last).
//
// Reductions accumulate in double with a fixed split of the rows, so results do not depend on the
// thread count; the elementwise passes compute in float (double for fp64 x) with the activation a
// template parameter, so that the inner loops stay branch-free and the compiler can vectorise them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ifbf_ops.h"

namespace ifbf {
namespace {

// Fixed row blocks of a channels-last reduction (independent of the number of threads).
int64_t num_row_blocks(int64_t rows, int64_t c) {
  const int64_t per_block = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(c, 1));
  return std::min<int64_t>(std::max<int64_t>(1, (rows + per_block - 1) / per_block), 256);
}

// Runs f(c, nc_row_begin_offset...) style reductions: for every channel c, calls
//   visit(acc, ptr_offset, length) over the contiguous runs of channel c (NCS), or
//   visit_row(accs, row) over the rows of a channels-last tensor, summing per-block partials.
template <int K, typename NcsFn, typename NscFn>
std::vector<double> reduce_channels(const Geometry& g, NcsFn ncs, NscFn nsc) {
  std::vector<double> out(K * g.c, 0.0);
  if (!g.channels_last) {
    at::parallel_for(0, g.c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        double acc[K] = {};
        for (int64_t n = 0; n < g.n; ++n) ncs(acc, (n * g.c + ch) * g.s, g.s, ch);
        for (int k = 0; k < K; ++k) out[k * g.c + ch] = acc[k];
      }
    });
    return out;
  }
  const int64_t blocks = num_row_blocks(g.n, g.c);
  const int64_t rows_per = (g.n + blocks - 1) / blocks;
  std::vector<double> part(blocks * K * g.c, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double* acc = part.data() + b * K * g.c;
      const int64_t r1 = std::min(g.n, (b + 1) * rows_per);
      for (int64_t r = b * rows_per; r < r1; ++r) nsc(acc, r * g.c);
    }
  });
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < K * g.c; ++i) out[i] += part[b * K * g.c + i];
  return out;
}

template <typename scalar_t>
Stats statistics_impl(const at::Tensor& x) {
  const Geometry g = geometry_of(x);
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  const int64_t count = g.n * g.s;
  // Two passes (sum, then centred squares): exact where E[x^2] - E[x]^2 would cancel.
  auto sums = reduce_channels<1>(
      g,
      [&](double* acc, int64_t off, int64_t len, int64_t) {
        double s0 = 0, s1 = 0;
        int64_t i = 0;
        for (; i + 1 < len; i += 2) {
          s0 += static_cast<double>(px[off + i]);
          s1 += static_cast<double>(px[off + i + 1]);
        }
        if (i < len) s0 += static_cast<double>(px[off + i]);
        acc[0] += s0 + s1;
      },
      [&](double* acc, int64_t off) {
        for (int64_t ch = 0; ch < g.c; ++ch) acc[ch] += static_cast<double>(px[off + ch]);
      });
  std::vector<double> mean(g.c);
  for (int64_t ch = 0; ch < g.c; ++ch) mean[ch] = count ? sums[ch] / count : 0.0;
  auto m2 = reduce_channels<1>(
      g,
      [&](double* acc, int64_t off, int64_t len, int64_t ch) {
        const double m = mean[ch];
        double s0 = 0;
        for (int64_t i = 0; i < len; ++i) {
          const double d = static_cast<double>(px[off + i]) - m;
          s0 += d * d;
        }
        acc[0] += s0;
      },
      [&](double* acc, int64_t off) {
        for (int64_t ch = 0; ch < g.c; ++ch) {
          const double d = static_cast<double>(px[off + ch]) - mean[ch];
          acc[ch] += d * d;
        }
      });
  using param_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto popt = x.options().dtype(c10::CppTypeToScalarType<param_t>::value);
  auto mean_t = at::empty({g.c}, popt);
  auto var_t = at::empty({g.c}, popt);
  auto* pm = mean_t.template data_ptr<param_t>();
  auto* pv = var_t.template data_ptr<param_t>();
  for (int64_t ch = 0; ch < g.c; ++ch) {
    pm[ch] = static_cast<param_t>(mean[ch]);
    pv[ch] = static_cast<param_t>(count ? m2[ch] / count : 0.0);
  }
  return {mean_t, var_t, at::full({1}, count, x.options().dtype(at::kLong))};
}

// Per-channel gain g = |w| + eps (1 without weight) and shift b (0 without bias), in param type.
template <typename param_t>
void gain_shift(const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
                int64_t c, std::vector<param_t>& gain, std::vector<param_t>& shift) {
  gain.assign(c, param_t(1));
  shift.assign(c, param_t(0));
  if (weight.has_value()) {
    const auto w = weight->contiguous();
    const param_t* pw = w.const_data_ptr<param_t>();
    for (int64_t ch = 0; ch < c; ++ch) gain[ch] = std::abs(pw[ch]) + static_cast<param_t>(eps);
  }
  if (bias.has_value()) {
    const auto b = bias->contiguous();
    const param_t* pb = b.const_data_ptr<param_t>();
    for (int64_t ch = 0; ch < c; ++ch) shift[ch] = pb[ch];
  }
}

// Elementwise pass over a (layout-matched) pair of inputs and one output: f(in0, in1, ch) -> out.
template <typename scalar_t, typename F>
void map_channels(const Geometry& g, const scalar_t* a, const scalar_t* b, scalar_t* out, F f) {
  if (!g.channels_last) {
    at::parallel_for(0, g.n * g.c, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.s, 1)),
                     [&](int64_t begin, int64_t end) {
                       auto fl = f;  // per-thread copy: channel() sets per-channel state
                       for (int64_t row = begin; row < end; ++row) {
                         const int64_t ch = row % g.c, off = row * g.s;
                         fl.channel(ch);
                         for (int64_t i = 0; i < g.s; ++i)
                           out[off + i] = fl(a[off + i], b ? b[off + i] : scalar_t(0));
                       }
                     });
  } else {
    at::parallel_for(0, g.n, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.c, 1)),
                     [&](int64_t begin, int64_t end) {
                       auto fl = f;  // per-thread copy: channel() sets per-channel state
                       for (int64_t row = begin; row < end; ++row) {
                         const int64_t off = row * g.c;
                         for (int64_t ch = 0; ch < g.c; ++ch) {
                           fl.channel(ch);
                           out[off + ch] = fl(a[off + ch], b ? b[off + ch] : scalar_t(0));
                         }
                       }
                     });
  }
}

template <Act A, typename scalar_t>
struct ForwardFn {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t *scale_all, *shift_all;
  opmath_t slope, scale = 0, shift = 0;
  void channel(int64_t ch) {
    scale = scale_all[ch];
    shift = shift_all[ch];
  }
  scalar_t operator()(scalar_t x, scalar_t) const {
    return static_cast<scalar_t>(ActFn<A, opmath_t>::forward(static_cast<opmath_t>(x) * scale + shift, slope));
  }
};

template <Act A, typename scalar_t>
struct BackwardFn {  // dx = a * dz - k * (z - b) + c0 (see abn_backward_cpu)
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t *a_all, *k_all, *b_all, *c0_all;
  opmath_t slope, a = 0, k = 0, b = 0, c0 = 0;
  void channel(int64_t ch) {
    a = a_all[ch];
    k = k_all[ch];
    b = b_all[ch];
    c0 = c0_all[ch];
  }
  scalar_t operator()(scalar_t y, scalar_t dy) const {
    opmath_t z, dact;
    ActFn<A, opmath_t>::inverse(static_cast<opmath_t>(y), slope, z, dact);
    return static_cast<scalar_t>(a * (static_cast<opmath_t>(dy) * dact) - k * (z - b) + c0);
  }
};

template <typename F>
void dispatch_act(Act act, F f) {
  switch (act) {
    case Act::LeakyRelu: f(std::integral_constant<Act, Act::LeakyRelu>{}); break;
    case Act::Elu: f(std::integral_constant<Act, Act::Elu>{}); break;
    case Act::Identity: f(std::integral_constant<Act, Act::Identity>{}); break;
  }
}

}  // namespace

Stats abn_statistics_cpu(const at::Tensor& x) {
  Stats out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "abn_statistics_cpu",
                                  [&] { out = statistics_impl<scalar_t>(x); });
  return out;
}

void abn_forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                     double eps, Act act, double slope, at::Tensor& y) {
  const Geometry g = geometry_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "abn_forward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using param_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    std::vector<param_t> gain, shift;
    gain_shift<param_t>(weight, bias, eps, g.c, gain, shift);
    const param_t* pm = mean.const_data_ptr<param_t>();
    const param_t* pv = var.const_data_ptr<param_t>();
    std::vector<opmath_t> scale(g.c), sh(g.c);
    for (int64_t ch = 0; ch < g.c; ++ch) {
      const param_t s = gain[ch] / std::sqrt(pv[ch] + static_cast<param_t>(eps));
      scale[ch] = static_cast<opmath_t>(s);
      sh[ch] = static_cast<opmath_t>(shift[ch] - pm[ch] * s);
    }
    dispatch_act(act, [&](auto a) {
      ForwardFn<decltype(a)::value, scalar_t> f{scale.data(), sh.data(), static_cast<opmath_t>(slope)};
      map_channels<scalar_t>(g, x.const_data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(), f);
    });
  });
}

Sums abn_backward_reduce_cpu(const at::Tensor& y, const at::Tensor& dy,
                             const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, double eps, Act act, double slope) {
  const Geometry g = geometry_of(y);
  const auto popt = y.options().dtype(y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  auto sum_dz = at::empty({g.c}, popt);
  auto sum_dz_xhat = at::empty({g.c}, popt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "abn_backward_reduce_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using param_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    std::vector<param_t> gain, shift;
    gain_shift<param_t>(weight, bias, eps, g.c, gain, shift);
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    const scalar_t* pd = dy.const_data_ptr<scalar_t>();
    const opmath_t sl = static_cast<opmath_t>(slope);
    std::vector<double> sums;
    dispatch_act(act, [&](auto a) {
      using Fn = ActFn<decltype(a)::value, opmath_t>;
      // Accumulates dz and dz * (z - b); the division by g happens once per channel below.
      auto one = [&](double* acc, int64_t i, int64_t ch) {
        opmath_t z, dact;
        Fn::inverse(static_cast<opmath_t>(py[i]), sl, z, dact);
        const opmath_t dz = static_cast<opmath_t>(pd[i]) * dact;
        acc[0] += dz;
        acc[1] += static_cast<double>(dz) * static_cast<double>(z - static_cast<opmath_t>(shift[ch]));
      };
      sums = reduce_channels<2>(
          g,
          [&](double* acc, int64_t off, int64_t len, int64_t ch) {
            for (int64_t i = 0; i < len; ++i) one(acc, off + i, ch);
          },
          [&](double* acc, int64_t off) {
            for (int64_t ch = 0; ch < g.c; ++ch) {
              double pair[2] = {acc[ch], acc[g.c + ch]};
              one(pair, off + ch, ch);
              acc[ch] = pair[0];
              acc[g.c + ch] = pair[1];
            }
          });
    });
    param_t* p0 = sum_dz.data_ptr<param_t>();
    param_t* p1 = sum_dz_xhat.data_ptr<param_t>();
    for (int64_t ch = 0; ch < g.c; ++ch) {
      p0[ch] = static_cast<param_t>(sums[ch]);
      p1[ch] = static_cast<param_t>(sums[g.c + ch] / static_cast<double>(gain[ch]));
    }
  });
  return {sum_dz, sum_dz_xhat};
}

void abn_backward_cpu(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& var,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& mean_dz,
                      const c10::optional<at::Tensor>& mean_dz_xhat, double eps, Act act,
                      double slope, at::Tensor& dx) {
  const Geometry g = geometry_of(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "abn_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using param_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    std::vector<param_t> gain, shift;
    gain_shift<param_t>(weight, bias, eps, g.c, gain, shift);
    const param_t* pv = var.const_data_ptr<param_t>();
    const param_t* pmd = mean_dz ? mean_dz->const_data_ptr<param_t>() : nullptr;
    const param_t* pmx = mean_dz_xhat ? mean_dz_xhat->const_data_ptr<param_t>() : nullptr;
    // dx = g * invstd * (dz - mdz - xhat * mdzx), xhat = (z - b) / g
    //    = a * dz - k * (z - b) + c0  with a = g * invstd, k = invstd * mdzx, c0 = -a * mdz.
    std::vector<opmath_t> av(g.c), kv(g.c), bv(g.c), cv(g.c);
    for (int64_t ch = 0; ch < g.c; ++ch) {
      const param_t invstd = param_t(1) / std::sqrt(pv[ch] + static_cast<param_t>(eps));
      const param_t a = gain[ch] * invstd;
      const param_t k = pmx ? invstd * pmx[ch] : param_t(0);
      const param_t mdz = pmd ? pmd[ch] : param_t(0);
      av[ch] = static_cast<opmath_t>(a);
      kv[ch] = static_cast<opmath_t>(k);
      bv[ch] = static_cast<opmath_t>(shift[ch]);
      cv[ch] = static_cast<opmath_t>(-a * mdz);
    }
    dispatch_act(act, [&](auto a) {
      BackwardFn<decltype(a)::value, scalar_t> f{av.data(), kv.data(), bv.data(), cv.data(),
                                                  static_cast<opmath_t>(slope)};
      map_channels<scalar_t>(g, y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                             dx.data_ptr<scalar_t>(), f);
    });
  });
}

}  // namespace ifbf
