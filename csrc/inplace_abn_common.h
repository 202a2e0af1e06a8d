// Activation functions of InPlace-ABN and their inverses, shared by the CPU and the CUDA kernels.
//
// Forward: y = act(z) with z = xhat * g + b, g = |weight| + eps (1 without weight).
// Backward recovers z and act'(z) from y alone (the point of InPlace-ABN: x is never saved).
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define IFBF_HD __host__ __device__ __forceinline__
#else
#define IFBF_HD inline
#endif

namespace ifbf {

enum class Act : int { LeakyRelu = 0, Elu = 1, Identity = 2 };

IFBF_HD float abn_expm1(float v) { return expm1f(v); }
IFBF_HD double abn_expm1(double v) { return expm1(v); }
IFBF_HD float abn_log1p(float v) { return log1pf(v); }
IFBF_HD double abn_log1p(double v) { return log1p(v); }

template <Act A, typename T>
struct ActFn;

template <typename T>
struct ActFn<Act::Identity, T> {
  static IFBF_HD T forward(T z, T /*slope*/) { return z; }
  // z = act^-1(y) and dact = act'(z)
  static IFBF_HD void inverse(T y, T /*slope*/, T& z, T& dact) {
    z = y;
    dact = T(1);
  }
};

template <typename T>
struct ActFn<Act::LeakyRelu, T> {
  static IFBF_HD T forward(T z, T slope) { return z >= T(0) ? z : z * slope; }
  // slope > 0 keeps the sign, so y < 0 exactly when z < 0.
  static IFBF_HD void inverse(T y, T slope, T& z, T& dact) {
    const bool neg = y < T(0);
    z = neg ? y / slope : y;
    dact = neg ? slope : T(1);
  }
};

template <typename T>
struct ActFn<Act::Elu, T> {  // alpha = 1 (ELU_ALPHA in ifbf_fast/ops/inplace_abn.py)
  static IFBF_HD T forward(T z, T /*slope*/) { return z > T(0) ? z : abn_expm1(z); }
  // act'(z) = exp(z) = y + 1 on the negative side (as torch's elu backward on the result). Where y
  // has saturated to -1 (z below about -17 in fp32, far less in fp16/bf16), z cannot be recovered:
  // it is clamped to a finite value so that dact = 0 multiplies a finite number, not -inf.
  static IFBF_HD void inverse(T y, T /*slope*/, T& z, T& dact) {
    if (y > T(0)) {
      z = y;
      dact = T(1);
    } else {
      const T yc = y > T(-0.9999999) ? y : T(-0.9999999);
      z = abn_log1p(yc);
      dact = y + T(1);
    }
  }
};

}  // namespace ifbf
