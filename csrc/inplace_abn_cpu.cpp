// CPU kernels of InPlace-ABN: ATen parallel loops over (n, c) rows (NCS) or row blocks (channels last).
//
// Precision: elementwise work in float (double for fp64 x); the backward sums add float partials of at
// most kChunk values into double, the statistics accumulate in double throughout (squares of values
// near 1e20, or sums of bf16 values near 3e38, overflow float); a fixed split of the rows keeps the
// results independent of the thread count. Speed: the inner loops are branch-free (activations as max/min/select, inplace_abn_common.h),
// read per-channel constants from locals and use 8 independent accumulators, so the compiler
// vectorises them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "inplace_abn.h"

namespace ifbf {
namespace {

constexpr int kLanes = 8;       // independent accumulators of a row reduction
constexpr int64_t kChunk = 512;  // values per float partial before it is added in double

template <typename T>
using param_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Per-channel sums of K quantities q_k(value_a, value_b, channel constants):
// out[k * C + c] = sum over all (n, s) of q_k. `Op` has `static void add(T acc[K], const Ch&, T sl, a, b)`.
template <int K, typename Op, typename scalar_t, typename Ch>
std::vector<double> reduce_channels(const Geometry& g, const scalar_t* a, const scalar_t* b,
                                    const std::vector<Ch>& chs, double slope) {
  using T = typename Op::Acc;
  const T sl = static_cast<T>(slope);
  std::vector<double> out(K * g.c, 0.0);
  if (!g.channels_last) {
    at::parallel_for(0, g.c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const Ch p = chs[ch];
        double acc[K] = {};
        for (int64_t n = 0; n < g.n; ++n) {
          const int64_t off = (n * g.c + ch) * g.s;
          const scalar_t* pa = a + off;
          const scalar_t* pb = b ? b + off : nullptr;
          for (int64_t i0 = 0; i0 < g.s; i0 += kChunk) {
            const int64_t i1 = std::min(g.s, i0 + kChunk);
            T lanes[K][kLanes] = {};
            int64_t i = i0;
            for (; i + kLanes <= i1; i += kLanes) {
              for (int j = 0; j < kLanes; ++j) {
                T v[K];
                Op::value(v, p, sl, pa[i + j], pb ? pb[i + j] : scalar_t(0));
                for (int k = 0; k < K; ++k) lanes[k][j] += v[k];
              }
            }
            for (; i < i1; ++i) {
              T v[K];
              Op::value(v, p, sl, pa[i], pb ? pb[i] : scalar_t(0));
              for (int k = 0; k < K; ++k) lanes[k][0] += v[k];
            }
            for (int k = 0; k < K; ++k)
              for (int j = 0; j < kLanes; ++j) acc[k] += static_cast<double>(lanes[k][j]);
          }
        }
        for (int k = 0; k < K; ++k) out[k * g.c + ch] = acc[k];
      }
    });
    return out;
  }
  // Channels last: fixed row blocks, each with its own per-channel partials, summed in block order.
  const int64_t rows_per = std::max<int64_t>(1, std::min<int64_t>(kChunk, (int64_t{1} << 16) / std::max<int64_t>(g.c, 1)));
  const int64_t blocks = (g.n + rows_per - 1) / rows_per;
  std::vector<double> part(std::max<int64_t>(blocks, 1) * K * g.c, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> lanes(K * g.c);
    for (int64_t blk = begin; blk < end; ++blk) {
      std::fill(lanes.begin(), lanes.end(), T(0));
      const int64_t r1 = std::min(g.n, (blk + 1) * rows_per);
      for (int64_t r = blk * rows_per; r < r1; ++r) {
        const scalar_t* pa = a + r * g.c;
        const scalar_t* pb = b ? b + r * g.c : nullptr;
        for (int64_t ch = 0; ch < g.c; ++ch) {
          T v[K];
          Op::value(v, chs[ch], sl, pa[ch], pb ? pb[ch] : scalar_t(0));
          for (int k = 0; k < K; ++k) lanes[k * g.c + ch] += v[k];
        }
      }
      double* dst = part.data() + blk * K * g.c;
      for (int64_t i = 0; i < K * g.c; ++i) dst[i] = static_cast<double>(lanes[i]);
    }
  });
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t i = 0; i < K * g.c; ++i) out[i] += part[blk * K * g.c + i];
  return out;
}

// out = Op::apply(channel constants, slope, a, b) elementwise.
template <typename Op, typename scalar_t, typename Ch>
void map_channels(const Geometry& g, const scalar_t* a, const scalar_t* b, scalar_t* out,
                  const std::vector<Ch>& chs, double slope) {
  using T = at::opmath_type<scalar_t>;
  const T sl = static_cast<T>(slope);
  if (!g.channels_last) {
    at::parallel_for(0, g.n * g.c, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.s, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t row = begin; row < end; ++row) {
                         const Ch p = chs[row % g.c];  // a local: no aliasing with out
                         const int64_t off = row * g.s;
                         const scalar_t* __restrict__ pa = a + off;
                         scalar_t* __restrict__ po = out + off;
                         if (b != nullptr) {
                           const scalar_t* __restrict__ pb = b + off;
                           for (int64_t i = 0; i < g.s; ++i) po[i] = Op::apply(p, sl, pa[i], pb[i]);
                         } else {
                           for (int64_t i = 0; i < g.s; ++i) po[i] = Op::apply(p, sl, pa[i], scalar_t(0));
                         }
                       }
                     });
    return;
  }
  at::parallel_for(0, g.n, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.c, 1)), [&](int64_t begin, int64_t end) {
    const Ch* __restrict__ pc = chs.data();
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ pa = a + r * g.c;
      const scalar_t* __restrict__ pb = b ? b + r * g.c : nullptr;
      scalar_t* __restrict__ po = out + r * g.c;
      for (int64_t ch = 0; ch < g.c; ++ch) po[ch] = Op::apply(pc[ch], sl, pa[ch], pb ? pb[ch] : scalar_t(0));
    }
  });
}

// --- the per-element operations ---------------------------------------------------------------------

template <typename scalar_t>
struct SumOp {  // pass 1 of the statistics
  using T = double;
  using Acc = double;
  struct Ch {};
  static void value(T v[1], const Ch&, T, scalar_t x, scalar_t) { v[0] = static_cast<T>(x); }
};

template <typename scalar_t>
struct CentredSquareOp {  // pass 2: exact where E[x^2] - E[x]^2 would cancel
  using T = double;
  using Acc = double;
  struct Ch {
    T mean;
  };
  static void value(T v[1], const Ch& p, T, scalar_t x, scalar_t) {
    const T d = static_cast<T>(x) - p.mean;
    v[0] = d * d;
  }
};

template <Act A, typename scalar_t>
struct BackwardReduceOp {  // dz and dz * (z - b); divided by g once per channel
  using T = at::opmath_type<scalar_t>;
  using Acc = T;
  struct Ch {
    T b, inv_slope;
  };
  static void value(T v[2], const Ch& p, T sl, scalar_t y, scalar_t dy) {
    T z, dact;
    ActFn<A, T>::inverse(static_cast<T>(y), sl, p.inv_slope, z, dact);
    const T dz = static_cast<T>(dy) * dact;
    v[0] = dz;
    v[1] = dz * (z - p.b);
  }
};

template <Act A, typename scalar_t>
struct ForwardOp {  // y = act((x * pre - shift) * scale + b), shift = mean * pre (inplace_abn_common.h)
  using T = at::opmath_type<scalar_t>;
  struct Ch {
    T pre, shift, scale, b;
  };
  static scalar_t apply(const Ch& p, T sl, scalar_t x, scalar_t) {
    return static_cast<scalar_t>(ActFn<A, T>::forward((static_cast<T>(x) * p.pre - p.shift) * p.scale + p.b, sl));
  }
};

template <Act A, typename scalar_t>
struct BackwardOp {
  // dx = g * invstd * (dz - mdz - xhat * mdzx), xhat = (z - b) / g
  //    = a * dz - k * (z - b) + c0 with a = g * invstd, k = invstd * mdzx, c0 = -a * mdz
  using T = at::opmath_type<scalar_t>;
  struct Ch {
    T a, k, b, c0, inv_slope;
  };
  static scalar_t apply(const Ch& p, T sl, scalar_t y, scalar_t dy) {
    T z, dact;
    ActFn<A, T>::inverse(static_cast<T>(y), sl, p.inv_slope, z, dact);
    return static_cast<scalar_t>(p.a * (static_cast<T>(dy) * dact) - p.k * (z - p.b) + p.c0);
  }
};

// Per-channel gain g = |w| + eps (1 without weight) and shift b (0 without bias).
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

at::TensorOptions param_options(const at::Tensor& x) {
  return x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}


// Shifted double sums -> float64 mean and biased var of every channel (two passes: see CentredSquareOp).
template <typename scalar_t>
void mean_var(const Geometry& g, const scalar_t* px, std::vector<double>& mean, std::vector<double>& var) {
  const int64_t count = g.n * g.s;
  std::vector<typename SumOp<scalar_t>::Ch> none(g.c);
  const auto sums = reduce_channels<1, SumOp<scalar_t>>(g, px, static_cast<const scalar_t*>(nullptr), none, 0.0);
  mean.assign(g.c, 0.0);
  var.assign(g.c, 0.0);
  std::vector<typename CentredSquareOp<scalar_t>::Ch> centre(g.c);
  for (int64_t ch = 0; ch < g.c; ++ch) {
    mean[ch] = count ? sums[ch] / count : 0.0;
    centre[ch].mean = mean[ch];
  }
  const auto m2 = reduce_channels<1, CentredSquareOp<scalar_t>>(g, px, static_cast<const scalar_t*>(nullptr),
                                                                centre, 0.0);
  for (int64_t ch = 0; ch < g.c; ++ch) var[ch] = count ? m2[ch] / count : 0.0;
}

template <typename scalar_t, typename Fn>
void with_mean_var(const at::Tensor& x, Fn fn) {
  const Geometry g = geometry_of(x);
  std::vector<double> mean, var;
  mean_var<scalar_t>(g, x.const_data_ptr<scalar_t>(), mean, var);
  fn(g, mean, var);
}

}  // namespace

namespace abn_cpu {

Stats statistics_cpu(const at::Tensor& x) {
  const Geometry g = geometry_of(x);
  auto mean_t = at::empty({g.c}, x.options().dtype(at::kDouble));
  auto var_t = at::empty({g.c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_statistics_cpu", [&] {
    with_mean_var<scalar_t>(x, [&](const Geometry&, const std::vector<double>& mean, const std::vector<double>& var) {
      std::copy(mean.begin(), mean.end(), mean_t.data_ptr<double>());
      std::copy(var.begin(), var.end(), var_t.data_ptr<double>());
    });
  });
  return {mean_t, var_t, at::full({1}, g.n * g.s, x.options().dtype(at::kLong))};
}

void train_statistics_cpu(const at::Tensor& x, TrainStats& st) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_cpu", [&] {
    using param_t = param_of<scalar_t>;
    with_mean_var<scalar_t>(x, [&](const Geometry& g, const std::vector<double>& mean, const std::vector<double>& var) {
      const double n = static_cast<double>(g.n * g.s);
      const double unbias = n / (n - 1), m = st.momentum;
      const double vmax = static_cast<double>(std::numeric_limits<param_t>::max());
      double* pm = st.mean.data_ptr<double>();
      double* pi = st.invstd.data_ptr<double>();
      param_t* ps = st.invstd_saved.data_ptr<param_t>();
      param_t* rm = st.running_mean.data_ptr<param_t>();
      param_t* rv = st.running_var.data_ptr<param_t>();
      for (int64_t ch = 0; ch < g.c; ++ch) {
        pm[ch] = mean[ch];
        pi[ch] = inv_std(var[ch], st.eps);
        ps[ch] = static_cast<param_t>(pi[ch]);
        rm[ch] = static_cast<param_t>((1 - m) * static_cast<double>(rm[ch]) + m * mean[ch]);
        rv[ch] = static_cast<param_t>(
            saturate((1 - m) * static_cast<double>(rv[ch]) + m * var[ch] * unbias, vmax));
      }
    });
  });
  // BatchNorm2d's counter, once per training forward (the tensor may be a view: its own data pointer)
  if (st.num_batches_tracked.defined()) *st.num_batches_tracked.data_ptr<int64_t>() += 1;
}

void running_update_cpu(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                        const at::Tensor& running_mean, const at::Tensor& running_var,
                        const at::Tensor& num_batches_tracked, double momentum) {
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "inplace_abn_running_update_cpu", [&] {
    const double n = *count.const_data_ptr<double>();
    const double unbias = n / (n - 1), m = momentum;
    const double vmax = static_cast<double>(std::numeric_limits<scalar_t>::max());
    const double* pm = mean.const_data_ptr<double>();
    const double* pv = var.const_data_ptr<double>();
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    for (int64_t ch = 0; ch < running_mean.numel(); ++ch) {
      rm[ch] = static_cast<scalar_t>((1 - m) * static_cast<double>(rm[ch]) + m * pm[ch]);
      rv[ch] = static_cast<scalar_t>(saturate((1 - m) * static_cast<double>(rv[ch]) + m * pv[ch] * unbias, vmax));
    }
  });
  if (num_batches_tracked.defined()) *num_batches_tracked.data_ptr<int64_t>() += 1;
}

void eval_statistics_cpu(const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                         at::Tensor& mean, at::Tensor& invstd, at::Tensor& invstd_saved) {
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "inplace_abn_eval_cpu", [&] {
    const auto rm = running_mean.contiguous(), rv = running_var.contiguous();
    const scalar_t* pm = rm.const_data_ptr<scalar_t>();
    const scalar_t* pv = rv.const_data_ptr<scalar_t>();
    for (int64_t ch = 0; ch < rm.numel(); ++ch) {
      mean.data_ptr<double>()[ch] = static_cast<double>(pm[ch]);
      invstd.data_ptr<double>()[ch] = inv_std(static_cast<double>(pv[ch]), eps);
      invstd_saved.data_ptr<scalar_t>()[ch] = static_cast<scalar_t>(invstd.data_ptr<double>()[ch]);
    }
  });
}

void forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd, const Opt& weight,
                 const Opt& bias, double eps, Act act, double slope, at::Tensor& y) {
  const Geometry g = geometry_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    using param_t = param_of<scalar_t>;
    std::vector<param_t> gain, shift;
    gain_shift<param_t>(weight, bias, eps, g.c, gain, shift);
    const double* pm = mean.const_data_ptr<double>();
    const double* pi = invstd.const_data_ptr<double>();
    dispatch_act(act, [&](auto a) {
      using Op = ForwardOp<decltype(a)::value, scalar_t>;
      std::vector<typename Op::Ch> chs(g.c);
      for (int64_t ch = 0; ch < g.c; ++ch) {
        const auto k = forward_constants(pm[ch], pi[ch], static_cast<double>(gain[ch]));
        chs[ch] = {static_cast<T>(k.pre), static_cast<T>(k.shift), static_cast<T>(k.scale), static_cast<T>(shift[ch])};
      }
      map_channels<Op>(g, x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr),
                       y.data_ptr<scalar_t>(), chs, slope);
    });
  });
}

// The per-channel sums of dz and dz * xhat (xhat = (z - b) / g), in the parameter dtype.
template <typename Fin>
void backward_sums(const at::Tensor& y, const at::Tensor& dy, const Opt& weight, const Opt& bias, double eps, Act act,
                   double slope, Fin fin) {
  const Geometry g = geometry_of(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "inplace_abn_backward_reduce_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    using param_t = param_of<scalar_t>;
    std::vector<param_t> gain, shift;
    gain_shift<param_t>(weight, bias, eps, g.c, gain, shift);
    std::vector<double> sums;
    dispatch_act(act, [&](auto a) {
      using Op = BackwardReduceOp<decltype(a)::value, scalar_t>;
      std::vector<typename Op::Ch> chs(g.c);
      for (int64_t ch = 0; ch < g.c; ++ch) chs[ch] = {static_cast<T>(shift[ch]), static_cast<T>(1.0 / slope)};
      sums = reduce_channels<2, Op>(g, y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), chs, slope);
    });
    for (int64_t ch = 0; ch < g.c; ++ch)
      fin(param_t{}, g, ch, sums[ch], sums[g.c + ch] / static_cast<double>(gain[ch]));
  });
}

Sums backward_reduce_cpu(const at::Tensor& y, const at::Tensor& dy, const Opt& weight, const Opt& bias, double eps,
                         Act act, double slope) {
  auto sum_dz = at::empty({y.size(1)}, param_options(y));
  auto sum_dz_xhat = at::empty({y.size(1)}, param_options(y));
  backward_sums(y, dy, weight, bias, eps, act, slope, [&](auto p, const Geometry&, int64_t ch, double s0, double s1) {
    using param_t = decltype(p);
    sum_dz.data_ptr<param_t>()[ch] = static_cast<param_t>(s0);
    sum_dz_xhat.data_ptr<param_t>()[ch] = static_cast<param_t>(s1);
  });
  return {sum_dz, sum_dz_xhat};
}

void backward_reduce_params_cpu(const at::Tensor& y, const at::Tensor& dy, const Opt& weight, const Opt& bias,
                                double eps, Act act, double slope, bool training, at::Tensor& dweight,
                                at::Tensor& dbias, at::Tensor& mean_dz, at::Tensor& mean_dz_xhat) {
  const auto w = weight.has_value() ? weight->contiguous() : at::Tensor();
  backward_sums(y, dy, weight, bias, eps, act, slope, [&](auto p, const Geometry& g, int64_t ch, double s0, double s1) {
    using param_t = decltype(p);
    double sign = 1.0;
    if (w.defined()) {
      const double wc = static_cast<double>(w.const_data_ptr<param_t>()[ch]);
      sign = wc > 0 ? 1.0 : (wc < 0 ? -1.0 : 0.0);
    }
    dweight.data_ptr<param_t>()[ch] = static_cast<param_t>(s1 * sign);
    dbias.data_ptr<param_t>()[ch] = static_cast<param_t>(s0);
    if (training) {
      const double n = static_cast<double>(g.n * g.s);
      mean_dz.data_ptr<param_t>()[ch] = static_cast<param_t>(s0 / n);
      mean_dz_xhat.data_ptr<param_t>()[ch] = static_cast<param_t>(s1 / n);
    }
  });
}

void backward_dx_cpu(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& invstd, const Opt& weight,
                     const Opt& bias, const Opt& mean_dz, const Opt& mean_dz_xhat, double eps, Act act, double slope,
                     at::Tensor& dx) {
  const Geometry g = geometry_of(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "inplace_abn_backward_dx_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    using param_t = param_of<scalar_t>;
    std::vector<param_t> gain, shift;
    gain_shift<param_t>(weight, bias, eps, g.c, gain, shift);
    const param_t* pi = invstd.const_data_ptr<param_t>();
    const param_t* pmd = mean_dz ? mean_dz->const_data_ptr<param_t>() : nullptr;
    const param_t* pmx = mean_dz_xhat ? mean_dz_xhat->const_data_ptr<param_t>() : nullptr;
    dispatch_act(act, [&](auto a) {
      using Op = BackwardOp<decltype(a)::value, scalar_t>;
      std::vector<typename Op::Ch> chs(g.c);
      for (int64_t ch = 0; ch < g.c; ++ch) {
        const double is = static_cast<double>(pi[ch]);
        const double ga = static_cast<double>(gain[ch]) * is;
        chs[ch] = {static_cast<T>(ga), static_cast<T>(pmx ? is * pmx[ch] : 0.0), static_cast<T>(shift[ch]),
                   static_cast<T>(pmd ? -ga * pmd[ch] : 0.0), static_cast<T>(1.0 / slope)};
      }
      map_channels<Op>(g, y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), chs,
                       slope);
    });
  });
}

}  // namespace abn_cpu
}  // namespace ifbf
