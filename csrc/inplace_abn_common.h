// Activation functions of InPlace-ABN and their inverses, shared by the CPU and the CUDA kernels.
//
// Forward: y = act(z) with z = xhat * g + b, g = |weight| + eps (1 without weight).
// Backward recovers z and act'(z) from y alone (the point of InPlace-ABN: x is never saved).
#pragma once

#include <cmath>
#include <type_traits>

#ifdef __CUDACC__
#define IFBF_HD __host__ __device__ __forceinline__
#else
#define IFBF_HD inline
#endif

namespace ifbf {

enum class Act : int { LeakyRelu = 0, Elu = 1, Identity = 2 };

// Host-side: calls f(std::integral_constant<Act, act>{}) so that kernels get the activation at compile time.
template <typename F>
void dispatch_act(Act act, F f) {
  switch (act) {
    case Act::LeakyRelu: f(std::integral_constant<Act, Act::LeakyRelu>{}); break;
    case Act::Elu: f(std::integral_constant<Act, Act::Elu>{}); break;
    case Act::Identity: f(std::integral_constant<Act, Act::Identity>{}); break;
  }
}

IFBF_HD float abn_expm1(float v) { return expm1f(v); }
IFBF_HD double abn_expm1(double v) { return expm1(v); }
IFBF_HD float abn_log1p(float v) { return log1pf(v); }
IFBF_HD double abn_log1p(double v) { return log1p(v); }

template <Act A, typename T>
struct ActFn;

template <typename T>
struct ActFn<Act::Identity, T> {
  static IFBF_HD T forward(T z, T /*slope*/) { return z; }
  // z = act^-1(y) and dact = act'(z); inv_slope = 1 / slope, computed once by the caller
  static IFBF_HD void inverse(T y, T /*slope*/, T /*inv_slope*/, T& z, T& dact) {
    z = y;
    dact = T(1);
  }
};

IFBF_HD float abn_abs(float v) { return fabsf(v); }
IFBF_HD double abn_abs(double v) { return fabs(v); }
IFBF_HD float abn_copysign(float m, float s) { return copysignf(m, s); }
IFBF_HD double abn_copysign(double m, double s) { return copysign(m, s); }

// The activations avoid comparisons: with signs that vary element to element a branch mispredicts
// half the time on the CPU and diverges on the GPU, and GCC does not turn float comparisons into
// selects (they may trap) so a loop holding one is not vectorised. max(v, 0) and min(v, 0) are exact
// as (v +- |v|) / 2; the sign comes from copysign (a bit operation).
template <typename T>
IFBF_HD T abn_max0(T v) { return T(0.5) * (v + abn_abs(v)); }
template <typename T>
IFBF_HD T abn_min0(T v) { return T(0.5) * (v - abn_abs(v)); }
template <typename T>
IFBF_HD T abn_is_neg(T v) { return T(0.5) - T(0.5) * abn_copysign(T(1), v); }  // 1 for v < 0 (and -0)

template <typename T>
struct ActFn<Act::LeakyRelu, T> {
  static IFBF_HD T forward(T z, T slope) { return abn_max0(z) + abn_min0(z) * slope; }
  // slope > 0 keeps the sign, so y < 0 exactly when z < 0.
  static IFBF_HD void inverse(T y, T slope, T inv_slope, T& z, T& dact) {
    z = abn_max0(y) + abn_min0(y) * inv_slope;
    dact = T(1) + (slope - T(1)) * abn_is_neg(y);
  }
};

template <typename T>
struct ActFn<Act::Elu, T> {  // alpha = 1 (ELU_ALPHA in ifbf_fast/ops/inplace_abn.py)
  static IFBF_HD T forward(T z, T /*slope*/) { return abn_max0(z) + abn_expm1(abn_min0(z)); }
  // act'(z) = exp(z) = y + 1 on the negative side (as torch's elu backward on the result). Where y
  // has saturated to -1 (z below about -17 in fp32, far less in fp16/bf16), z cannot be recovered:
  // it is clamped to a finite value so that dact = 0 multiplies a finite number, not -inf.
  static IFBF_HD void inverse(T y, T /*slope*/, T /*inv_slope*/, T& z, T& dact) {
    const T neg = abn_min0(y);
    const T clamped = neg > T(-0.9999999) ? neg : T(-0.9999999);
    z = abn_max0(y) + abn_log1p(clamped);
    dact = T(1) + neg;
  }
};

// Per-channel constants of the forward map y = act((x * pre - shift) * scale + b), computed in double
// from the float64 statistics. pre = 1 except where the standard deviation passes 2^64: then
// pre = 2^-64 (exact), so that x * pre - shift cannot overflow (x - mean does, for values of opposite
// sign near the float max, e.g. bf16 near 3e38) and scale = g * invstd / pre stays a normal float
// (invstd alone can be subnormal there, which the --use_fast_math CUDA kernels flush to zero).
struct ForwardConstants {
  double pre, shift, scale;
};
constexpr double kPreScale = 5.421010862427522170e-20;  // 2^-64
IFBF_HD ForwardConstants forward_constants(double mean, double invstd, double gain) {
  const double pre = invstd < kPreScale ? kPreScale : 1.0;
  return {pre, mean * pre, gain * invstd / pre};
}

// 1 / sqrt(var + eps) in double; var = inf (a float running_var that saturated) gives 0.
IFBF_HD double inv_std(double var, double eps) { return 1.0 / sqrt(var + eps); }

// The largest finite value of the running-statistics dtype: the unbiased variance is saturated there
// rather than stored as inf (a float32 buffer cannot hold the variance of values beyond ~1.8e19).
IFBF_HD double saturate(double v, double max_value) { return v < max_value ? v : max_value; }

}  // namespace ifbf
