// Schemas of the ifbf_fast ops, their argument checks, and the CPU / CUDA registrations.
//
// Every check happens here, before any kernel runs, with a message naming the op and the argument;
// the *_cpu / *_cuda implementations receive checked arguments in a layout they can walk
// (ifbf_ops.h, canonical()).
#include <Python.h>
#include <torch/library.h>

#include <sstream>

#include "ifbf_ops.h"

// The ops are reached through torch.ops.ifbf_fast.*; the module exists so that `import ifbf_fast._C`
// loads the library and runs the registrations below.
static struct PyModuleDef ifbf_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ifbf_module); }

namespace ifbf {
namespace {

Act parse_act(const char* op, const std::string& name, double slope) {
  Act act;
  if (name == "leaky_relu") {
    act = Act::LeakyRelu;
  } else if (name == "elu") {
    act = Act::Elu;
  } else if (name == "identity") {
    act = Act::Identity;
  } else {
    TORCH_CHECK_VALUE(false, op, ": activation must be 'leaky_relu', 'elu' or 'identity' (invertible); got '",
                      name, "'");
  }
  TORCH_CHECK_VALUE(act != Act::LeakyRelu || slope > 0, op,
                    ": leaky_relu slope must be > 0 to be invertible; got ", slope);
  return act;
}

at::ScalarType param_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_x(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": ", name, " must be (N, C, ...) with at least 2 dimensions; got ",
                    x.sizes());
  const auto t = x.scalar_type();
  const bool ok = t == at::kFloat || t == at::kHalf || t == at::kBFloat16 ||
                  (t == at::kDouble && x.device().is_cpu());
  TORCH_CHECK_TYPE(ok, op, ": ", name, " must be float32, float16 or bfloat16 (float64 on the CPU too); got ",
                   t, " on ", x.device());
}

void check_channel(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  const bool ok = t.dim() == 1 && t.size(0) == x.size(1) && t.scalar_type() == param_dtype(x) &&
                  t.device() == x.device();
  if (ok) return;
  std::ostringstream want;
  want << "shape (" << x.size(1) << ",) " << param_dtype(x) << " on " << x.device();
  TORCH_CHECK_VALUE(false, op, ": ", name, " is not compatible with x (wrong size, scalar type or device): expected ",
                    want.str(), ", got shape ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

void check_opt(const char* op, const char* name, const c10::optional<at::Tensor>& t, const at::Tensor& x) {
  if (t.has_value()) check_channel(op, name, *t, x);
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0; got ", eps);
}

void check_like(const char* op, const at::Tensor& dy, const at::Tensor& y) {
  TORCH_CHECK_VALUE(dy.sizes() == y.sizes() && dy.scalar_type() == y.scalar_type() && dy.device() == y.device(),
                    op, ": dy is not compatible with y (expected shape ", y.sizes(), " ", y.scalar_type(), " on ",
                    y.device(), ", got ", dy.sizes(), " ", dy.scalar_type(), " on ", dy.device(), ")");
}

// dy with exactly y's strides, so that one index walks both.
at::Tensor like_strides(const at::Tensor& dy, const at::Tensor& y) {
  if (dy.strides() == y.strides()) return dy;
  return at::empty_like(y).copy_(dy);
}

template <bool kCuda>
Stats statistics(const at::Tensor& x) {
  check_x("abn_statistics", "x", x);
  const auto xc = canonical(x);
#ifdef IFBF_WITH_CUDA
  if (kCuda) return abn_statistics_cuda(xc);
#endif
  return abn_statistics_cpu(xc);
}

template <bool kCuda>
at::Tensor forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                   double eps, c10::string_view activation, double slope) {
  const char* op = "abn_forward";
  check_x(op, "x", x);
  check_channel(op, "mean", mean, x);
  check_channel(op, "var", var, x);
  check_opt(op, "weight", weight, x);
  check_opt(op, "bias", bias, x);
  check_eps(op, eps);
  const Act act = parse_act(op, std::string(activation), slope);
  const auto xc = canonical(x);
  auto y = at::empty_like(xc);  // xc is dense: y gets its strides (NCHW or channels last)
  if (y.numel() == 0) return y;
#ifdef IFBF_WITH_CUDA
  if (kCuda) {
    abn_forward_cuda(xc, mean.contiguous(), var.contiguous(), weight, bias, eps, act, slope, y);
    return y;
  }
#endif
  abn_forward_cpu(xc, mean.contiguous(), var.contiguous(), weight, bias, eps, act, slope, y);
  return y;
}

template <bool kCuda>
Sums backward_reduce(const at::Tensor& y, const at::Tensor& dy, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias, double eps, c10::string_view activation,
                     double slope) {
  const char* op = "abn_backward_reduce";
  check_x(op, "y", y);
  check_like(op, dy, y);
  check_opt(op, "weight", weight, y);
  check_opt(op, "bias", bias, y);
  check_eps(op, eps);
  const Act act = parse_act(op, std::string(activation), slope);
  const auto yc = canonical(y);
  const auto dyc = like_strides(dy, yc);
#ifdef IFBF_WITH_CUDA
  if (kCuda) return abn_backward_reduce_cuda(yc, dyc, weight, bias, eps, act, slope);
#endif
  return abn_backward_reduce_cpu(yc, dyc, weight, bias, eps, act, slope);
}

template <bool kCuda>
at::Tensor backward(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& var,
                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& mean_dz, const c10::optional<at::Tensor>& mean_dz_xhat,
                    double eps, c10::string_view activation, double slope) {
  const char* op = "abn_backward";
  check_x(op, "y", y);
  check_like(op, dy, y);
  check_channel(op, "var", var, y);
  check_opt(op, "weight", weight, y);
  check_opt(op, "bias", bias, y);
  check_opt(op, "mean_dz", mean_dz, y);
  check_opt(op, "mean_dz_xhat", mean_dz_xhat, y);
  TORCH_CHECK_VALUE(mean_dz.has_value() == mean_dz_xhat.has_value(), op,
                    ": mean_dz and mean_dz_xhat must be given together (training) or both be None (evaluation)");
  check_eps(op, eps);
  const Act act = parse_act(op, std::string(activation), slope);
  const auto yc = canonical(y);
  const auto dyc = like_strides(dy, yc);
  auto dx = at::empty_like(yc);
  if (dx.numel() == 0) return dx;
#ifdef IFBF_WITH_CUDA
  if (kCuda) {
    abn_backward_cuda(yc, dyc, var.contiguous(), weight, bias, mean_dz, mean_dz_xhat, eps, act, slope, dx);
    return dx;
  }
#endif
  abn_backward_cpu(yc, dyc, var.contiguous(), weight, bias, mean_dz, mean_dz_xhat, eps, act, slope, dx);
  return dx;
}

}  // namespace
}  // namespace ifbf

TORCH_LIBRARY(ifbf_fast, m) {
  // The fake (meta) kernels live in Python: importing this module registers them.
  m.set_python_module("ifbf_fast.ops._abn_fast");
  m.def("abn_statistics(Tensor x) -> (Tensor mean, Tensor var, Tensor count)");
  m.def("abn_forward(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
        "str activation, float slope) -> Tensor");
  m.def("abn_backward_reduce(Tensor y, Tensor dy, Tensor? weight, Tensor? bias, float eps, str activation, "
        "float slope) -> (Tensor sum_dz, Tensor sum_dz_xhat)");
  m.def("abn_backward(Tensor y, Tensor dy, Tensor var, Tensor? weight, Tensor? bias, Tensor? mean_dz, "
        "Tensor? mean_dz_xhat, float eps, str activation, float slope) -> Tensor");
}

TORCH_LIBRARY_IMPL(ifbf_fast, CPU, m) {
  m.impl("abn_statistics", &ifbf::statistics<false>);
  m.impl("abn_forward", &ifbf::forward<false>);
  m.impl("abn_backward_reduce", &ifbf::backward_reduce<false>);
  m.impl("abn_backward", &ifbf::backward<false>);
}

#ifdef IFBF_WITH_CUDA
TORCH_LIBRARY_IMPL(ifbf_fast, CUDA, m) {
  m.impl("abn_statistics", &ifbf::statistics<true>);
  m.impl("abn_forward", &ifbf::forward<true>);
  m.impl("abn_backward_reduce", &ifbf::backward_reduce<true>);
  m.impl("abn_backward", &ifbf::backward<true>);
}
#endif
