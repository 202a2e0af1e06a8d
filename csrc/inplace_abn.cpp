// Schemas of the InPlace-ABN ops, their argument checks, the CPU / CUDA registrations and the C++
// autograd of the fused single-process op.
//
// Every check happens here, before any kernel runs, with a message naming the op and the argument;
// the *_cpu / *_cuda implementations receive checked arguments in a layout they can walk
// (inplace_abn.h, canonical()).
//
// Host cost is part of the design: on one process a training step of InPlace-ABN is two dispatcher
// calls, `inplace_abn` forward and `inplace_abn_backward` from its autograd node, with no Python in
// between (the Autograd-key kernel below is a torch::autograd::Function). The forward also takes the
// module's num_batches_tracked (declared mutated, Tensor(c!)?) and increments it where it writes the
// running statistics, so BatchNorm2d's counter costs neither a dispatcher call nor a launch. The
// primitives serve the synchronised path, whose collectives run in Python between them; they get an
// Autograd-key kernel too, which marks their outputs non-differentiable (the Python autograd.Function
// of the synced path supplies the gradient), so that torch never falls back to its "no autograd
// kernel" warning.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <sstream>

#include "inplace_abn.h"
#include "inplace_abn_plan.h"
#include "launcher_node.h"

// The ops are reached through torch.ops.ifbf_fast.*; the module exists so that `import ifbf_fast._C`
// loads the library and runs the registrations below. Its functions expose the CUDA launch plans and
// bytes model (inplace_abn_plan.h) to the CPU tests, whatever the build: the same code the launchers run;
// launcher_node.cpp adds launcher_apply, the eager autograd route of the Triton ops.
namespace {

const char* kKindNames[] = {"reduce_ncs", "reduce_nsc", "combine", "map_ncs", "map_nsc", "eval"};

// abn_launch_model(phase, channels_last, n, c, s, elt, vec, sms) -> [dict per launch] (plan::launch_model);
// vec 0: the width plan::pick_vec gives 16-byte-aligned tensors (what fresh allocations are)
PyObject* abn_launch_model(PyObject*, PyObject* args) {
  int phase, channels_last, elt, vec, sms;
  long long n, c, s;
  if (!PyArg_ParseTuple(args, "ipLLLiii", &phase, &channels_last, &n, &c, &s, &elt, &vec, &sms)) return nullptr;
  if (phase < 0 || phase > 4 || elt <= 0 || 16 % elt != 0 || vec < 0 || (vec > 0 && 16 % (vec * elt) != 0) || sms <= 0 ||
      n < 0 || c <= 0 || s <= 0) {
    PyErr_SetString(PyExc_ValueError, "abn_launch_model: phase in 0..4, elt and vec * elt dividing 16 (vec 0: chosen), sms > 0, "
                                      "n >= 0, c > 0, s > 0");
    return nullptr;
  }
  if (vec == 0) vec = ifbf::plan::pick_vec(channels_last != 0, c, elt, true);  // fresh (aligned) tensors
  const auto launches = ifbf::plan::launch_model(phase, channels_last != 0, n, c, s, elt, vec, sms);
  PyObject* out = PyList_New(0);
  for (const auto& m : launches) {
    const auto& L = m.launch;
    PyObject* d = Py_BuildValue(
        "{s:s,s:s,s:i,s:(LL),s:(ii),s:L,s:L,s:i,s:i,s:L,s:L,s:i}", "name", m.name, "kind", kKindNames[L.kind], "vec",
        L.vec, "grid", (long long)L.grid_x, (long long)L.grid_y, "block", L.block_x, L.block_y, "chunks",
        (long long)L.chunks, "groups", (long long)L.groups, "unroll", L.unroll, "tensors", L.tensors, "read",
        (long long)m.read, "written", (long long)m.written, "blocks_per_sm", ifbf::plan::blocks_per_sm(L.kind));
    if (d == nullptr || PyList_Append(out, d) != 0) {
      Py_XDECREF(d);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(d);
  }
  return out;
}

// abn_row_split(start, S, vec) -> (head, body, tail) (plan::row_split, int64 as with a large tensor)
PyObject* abn_row_split(PyObject*, PyObject* args) {
  long long start, S;
  int vec;
  if (!PyArg_ParseTuple(args, "LLi", &start, &S, &vec)) return nullptr;
  if (vec <= 0 || (vec & (vec - 1)) != 0 || S < 0 || start < 0) {
    PyErr_SetString(PyExc_ValueError, "abn_row_split: vec a power of two, S >= 0, start >= 0");
    return nullptr;
  }
  const auto r = ifbf::plan::row_split<int64_t>(start, S, vec);
  return Py_BuildValue("(LLL)", (long long)r.head, (long long)r.body, (long long)r.tail);
}

// abn_min_bytes(training, numel, elt) -> the op's minimum DRAM traffic, forward + backward
PyObject* abn_min_bytes(PyObject*, PyObject* args) {
  int training, elt;
  long long numel;
  if (!PyArg_ParseTuple(args, "pLi", &training, &numel, &elt)) return nullptr;
  return PyLong_FromLongLong(ifbf::plan::min_bytes(training != 0, numel, elt));
}

PyMethodDef kMethods[] = {
    {"abn_launch_model", abn_launch_model, METH_VARARGS, "InPlace-ABN CUDA launch plan and bytes of one phase"},
    {"abn_row_split", abn_row_split, METH_VARARGS, "InPlace-ABN NCS row split: (head, body vectors, tail)"},
    {"abn_min_bytes", abn_min_bytes, METH_VARARGS, "InPlace-ABN minimum bytes moved, forward + backward"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

static struct PyModuleDef ifbf_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&ifbf_module);
  if (module != nullptr && PyModule_AddFunctions(module, ifbf::launcher_methods()) != 0) Py_CLEAR(module);
  return module;
}

#ifdef IFBF_WITH_CUDA
#define IFBF_ON_DEVICE(CUDA, NAME, ...) ((CUDA) ? abn_cuda::NAME##_cuda(__VA_ARGS__) : abn_cpu::NAME##_cpu(__VA_ARGS__))
#else
#define IFBF_ON_DEVICE(CUDA, NAME, ...) abn_cpu::NAME##_cpu(__VA_ARGS__)
#endif

namespace ifbf {
namespace {

using at::Tensor;

Act parse_act(const char* op, c10::string_view name, double slope) {
  Act act;
  if (name == "leaky_relu") {
    act = Act::LeakyRelu;
  } else if (name == "elu") {
    act = Act::Elu;
  } else if (name == "identity") {
    act = Act::Identity;
  } else {
    TORCH_CHECK_VALUE(false, op, ": activation must be 'leaky_relu', 'elu' or 'identity' (invertible); got '",
                      std::string(name), "'");
  }
  TORCH_CHECK_VALUE(act != Act::LeakyRelu || slope > 0, op,
                    ": leaky_relu slope must be > 0 to be invertible; got ", slope);
  return act;
}

at::ScalarType param_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_x(const char* op, const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": ", name, " must be (N, C, ...) with at least 2 dimensions; got ",
                    x.sizes());
  const auto t = x.scalar_type();
  const bool ok = t == at::kFloat || t == at::kHalf || t == at::kBFloat16 ||
                  (t == at::kDouble && x.device().is_cpu());
  TORCH_CHECK_TYPE(ok, op, ": ", name, " must be float32, float16 or bfloat16 (float64 on the CPU too); got ",
                   t, " on ", x.device());
}

// A (C,) tensor of dtype `want` on x's device.
void check_channel(const char* op, const char* name, const Tensor& t, const Tensor& x, at::ScalarType want) {
  const bool ok = t.dim() == 1 && t.size(0) == x.size(1) && t.scalar_type() == want && t.device() == x.device();
  if (ok) return;
  std::ostringstream expected;
  expected << "shape (" << x.size(1) << ",) " << want << " on " << x.device();
  TORCH_CHECK_VALUE(false, op, ": ", name, " is not compatible with x (wrong size, scalar type or device): expected ",
                    expected.str(), ", got shape ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

void check_param(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  check_channel(op, name, t, x, param_dtype(x));
}

void check_opt(const char* op, const char* name, const Opt& t, const Tensor& x) {
  if (t.has_value()) check_param(op, name, *t, x);
}

void check_stat(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  check_channel(op, name, t, x, at::kDouble);
}

// BatchNorm2d's num_batches_tracked: one int64 element on x's device (0-d in a module; a view into the
// trainer's flat buffer of every int64 buffer, so it is written through its own data pointer).
void check_counter(const char* op, const Opt& t, const Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->numel() == 1 && t->scalar_type() == at::kLong && t->device() == x.device(), op,
                    ": num_batches_tracked must be a one-element int64 tensor on ", x.device(), " (BatchNorm2d's); got shape ",
                    t->sizes(), " ", t->scalar_type(), " on ", t->device());
}

void check_momentum(const char* op, double momentum) {
  TORCH_CHECK_VALUE(momentum >= 0 && momentum <= 1, op, ": momentum must be in [0, 1]; got ", momentum);
}

void check_eps(const char* op, double eps) { TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0; got ", eps); }

void check_like(const char* op, const Tensor& dy, const Tensor& y) {
  TORCH_CHECK_VALUE(dy.sizes() == y.sizes() && dy.scalar_type() == y.scalar_type() && dy.device() == y.device(),
                    op, ": dy is not compatible with y (expected shape ", y.sizes(), " ", y.scalar_type(), " on ",
                    y.device(), ", got ", dy.sizes(), " ", dy.scalar_type(), " on ", dy.device(), ")");
}

// dy with exactly y's strides, so that one index walks both.
Tensor like_strides(const Tensor& dy, const Tensor& y) {
  if (dy.strides() == y.strides()) return dy;
  return at::empty_like(y).copy_(dy);
}

Tensor stat_like(const Tensor& x) { return at::empty({x.size(1)}, x.options().dtype(at::kDouble)); }
Tensor param_like(const Tensor& x) { return at::empty({x.size(1)}, x.options().dtype(param_dtype(x))); }

// --- primitives (the synchronised path) -------------------------------------------------------------

template <bool kCuda>
Stats statistics(const Tensor& x) {
  check_x("inplace_abn_statistics", "x", x);
  const auto xc = canonical(x);
  if (xc.numel() == 0) {  // a rank without samples: count 0, and mean/var that weigh nothing
    const auto z = at::zeros({x.size(1)}, x.options().dtype(at::kDouble));
    return {z, z.clone(), at::zeros({1}, x.options().dtype(at::kLong))};
  }
  return IFBF_ON_DEVICE(kCuda, statistics, xc);
}

template <bool kCuda>
Tensor forward(const Tensor& x, const Tensor& mean, const Tensor& invstd, const Opt& weight, const Opt& bias,
               double eps, c10::string_view activation, double slope) {
  const char* op = "inplace_abn_forward";
  check_x(op, "x", x);
  check_stat(op, "mean", mean, x);
  check_stat(op, "invstd", invstd, x);
  check_opt(op, "weight", weight, x);
  check_opt(op, "bias", bias, x);
  check_eps(op, eps);
  const Act act = parse_act(op, activation, slope);
  const auto xc = canonical(x);
  auto y = at::empty_like(xc);  // xc is dense: y gets its strides (NCHW or channels last)
  if (y.numel() != 0) IFBF_ON_DEVICE(kCuda, forward, xc, mean.contiguous(), invstd.contiguous(), weight, bias, eps, act, slope, y);
  return y;
}

template <bool kCuda>
Sums backward_reduce(const Tensor& y, const Tensor& dy, const Opt& weight, const Opt& bias, double eps,
                     c10::string_view activation, double slope) {
  const char* op = "inplace_abn_backward_reduce";
  check_x(op, "y", y);
  check_like(op, dy, y);
  check_opt(op, "weight", weight, y);
  check_opt(op, "bias", bias, y);
  check_eps(op, eps);
  const Act act = parse_act(op, activation, slope);
  const auto yc = canonical(y);
  if (yc.numel() == 0) return {at::zeros({y.size(1)}, y.options().dtype(param_dtype(y))),
                               at::zeros({y.size(1)}, y.options().dtype(param_dtype(y)))};
  return IFBF_ON_DEVICE(kCuda, backward_reduce, yc, like_strides(dy, yc), weight, bias, eps, act, slope);
}

template <bool kCuda>
Tensor backward_dx(const Tensor& y, const Tensor& dy, const Tensor& invstd, const Opt& weight, const Opt& bias,
                   const Opt& mean_dz, const Opt& mean_dz_xhat, double eps, c10::string_view activation, double slope) {
  const char* op = "inplace_abn_backward_dx";
  check_x(op, "y", y);
  check_like(op, dy, y);
  check_param(op, "invstd", invstd, y);
  check_opt(op, "weight", weight, y);
  check_opt(op, "bias", bias, y);
  check_opt(op, "mean_dz", mean_dz, y);
  check_opt(op, "mean_dz_xhat", mean_dz_xhat, y);
  TORCH_CHECK_VALUE(mean_dz.has_value() == mean_dz_xhat.has_value(), op,
                    ": mean_dz and mean_dz_xhat must be given together (training) or both be None (evaluation)");
  check_eps(op, eps);
  const Act act = parse_act(op, activation, slope);
  const auto yc = canonical(y);
  auto dx = at::empty_like(yc);
  if (dx.numel() != 0)
    IFBF_ON_DEVICE(kCuda, backward_dx, yc, like_strides(dy, yc), invstd.contiguous(), weight, bias, mean_dz,
                   mean_dz_xhat, eps, act, slope, dx);
  return dx;
}

// The synchronised path's running-statistics update from the union batch's float64 mean, biased var and
// count: one kernel for the lerps, the unbiased correction and the counter (was 9 small torch ops).
template <bool kCuda>
void running_update(const Tensor& mean, const Tensor& var, const Tensor& count, const Tensor& running_mean,
                    const Tensor& running_var, const Opt& num_batches_tracked, double momentum) {
  const char* op = "inplace_abn_running_update";
  TORCH_CHECK_VALUE(running_mean.dim() == 1 && running_mean.is_contiguous() &&
                        (running_mean.scalar_type() == at::kFloat || running_mean.scalar_type() == at::kDouble),
                    op, ": running_mean must be a contiguous (C,) float32 or float64 tensor; got shape ",
                    running_mean.sizes(), " ", running_mean.scalar_type());
  const auto rdt = running_mean.scalar_type();
  const int64_t c = running_mean.size(0);
  const auto same = [&](const char* name, const Tensor& t, at::ScalarType want, int64_t size) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == size && t.scalar_type() == want && t.device() == running_mean.device() &&
                          t.is_contiguous(),
                      op, ": ", name, " is not compatible with running_mean: expected a contiguous shape (", size, ",) ",
                      want, " on ", running_mean.device(), ", got shape ", t.sizes(), " ", t.scalar_type(), " on ",
                      t.device());
  };
  same("running_var", running_var, rdt, c);
  same("mean", mean, at::kDouble, c);
  same("var", var, at::kDouble, c);
  same("count", count, at::kDouble, 1);
  check_counter(op, num_batches_tracked, running_mean);
  check_momentum(op, momentum);
  IFBF_ON_DEVICE(kCuda, running_update, mean, var, count, running_mean, running_var,
                 num_batches_tracked.value_or(Tensor()), momentum);
}

// --- the fused single-process op ------------------------------------------------------------------

template <bool kCuda>
std::tuple<Tensor, Tensor> fused_forward(const Tensor& x, const Opt& weight, const Opt& bias,
                                         const Tensor& running_mean, const Tensor& running_var,
                                         const Opt& num_batches_tracked, bool training, double momentum, double eps,
                                         c10::string_view activation, double slope) {
  const char* op = "inplace_abn";
  check_x(op, "x", x);
  check_opt(op, "weight", weight, x);
  check_opt(op, "bias", bias, x);
  check_param(op, "running_mean", running_mean, x);
  check_param(op, "running_var", running_var, x);
  TORCH_CHECK_VALUE(running_mean.is_contiguous() && running_var.is_contiguous(), op,
                    ": running_mean and running_var must be contiguous (they are updated in place)");
  check_counter(op, num_batches_tracked, x);
  check_eps(op, eps);
  check_momentum(op, momentum);
  const Act act = parse_act(op, activation, slope);
  const auto xc = canonical(x);
  auto mean = stat_like(x), invstd = stat_like(x), invstd_saved = param_like(x);
  if (training) {
    const int64_t n = x.size(1) ? xc.numel() / x.size(1) : 0;
    TORCH_CHECK_VALUE(n >= 2, "inplace_abn: training needs more than 1 value per channel over the batch; got ", n,
                      " (x ", x.sizes(), ")");
    TrainStats st{mean, invstd, invstd_saved, running_mean, running_var, num_batches_tracked.value_or(Tensor()),
                  momentum, eps};
    IFBF_ON_DEVICE(kCuda, train_statistics, xc, st);
  } else {
    IFBF_ON_DEVICE(kCuda, eval_statistics, running_mean, running_var, eps, mean, invstd, invstd_saved);
  }
  auto y = at::empty_like(xc);
  if (y.numel() != 0) IFBF_ON_DEVICE(kCuda, forward, xc, mean, invstd, weight, bias, eps, act, slope, y);
  return {y, invstd_saved};
}

template <bool kCuda>
std::tuple<Tensor, Tensor, Tensor> fused_backward(const Tensor& y, const Tensor& dy, const Tensor& invstd,
                                                  const Opt& weight, const Opt& bias, bool training, bool param_grads,
                                                  double eps, c10::string_view activation, double slope) {
  const char* op = "inplace_abn_backward";
  check_x(op, "y", y);
  check_like(op, dy, y);
  check_param(op, "invstd", invstd, y);
  check_opt(op, "weight", weight, y);
  check_opt(op, "bias", bias, y);
  check_eps(op, eps);
  const Act act = parse_act(op, activation, slope);
  const auto yc = canonical(y);
  const auto dyc = like_strides(dy, yc);
  auto dweight = param_like(y), dbias = param_like(y), dx = at::empty_like(yc);
  Opt mean_dz, mean_dz_xhat;
  if ((training || param_grads) && yc.numel() != 0) {
    auto mdz = param_like(y), mdzx = param_like(y);
    IFBF_ON_DEVICE(kCuda, backward_reduce_params, yc, dyc, weight, bias, eps, act, slope, training, dweight, dbias,
                   mdz, mdzx);
    if (training) {
      mean_dz = mdz;
      mean_dz_xhat = mdzx;
    }
  } else {  // evaluation without parameter gradients (or an empty batch): nothing to reduce
    dweight.zero_();
    dbias.zero_();
  }
  if (dx.numel() != 0)
    IFBF_ON_DEVICE(kCuda, backward_dx, yc, dyc, invstd.contiguous(), weight, bias, mean_dz, mean_dz_xhat, eps, act,
                   slope, dx);
  return {dx, dweight, dbias};
}

// --- autograd -------------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FusedForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Opt&, const Opt&, const Tensor&, const Tensor&,
                                                    const Opt&, bool, double, double, c10::string_view, double);

const c10::TypedOperatorHandle<FusedForwardSig>& fused_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ifbf_fast::inplace_abn", "").typed<FusedForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  const Opt&, const Opt&, bool, bool, double,
                                                                  c10::string_view, double)>&
fused_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ifbf_fast::inplace_abn_backward", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                       const Opt&, const Opt&, bool, bool, double,
                                                                       c10::string_view, double)>();
  return op;
}

// The running buffers and the counter pass through the autograd Function as one non-tensor argument:
// autograd then records no input metadata, edge or gradient slot for them (they take no gradient),
// host time saved on every training call.
struct RunningState {
  const Tensor& running_mean;
  const Tensor& running_var;
  const Opt& num_batches_tracked;
};

// y and the float64 invstd are saved (never x): backward rebuilds x-hat from y by inverting the
// activation and the affine, the memory saving of InPlace-ABN. invstd is an output for the node to
// save; it is marked non-differentiable.
struct InplaceABNFunction : public torch::autograd::Function<InplaceABNFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Opt& weight, const Opt& bias,
                               const RunningState& state, bool training, double momentum, double eps,
                               c10::string_view activation, double slope) {
    Tensor y, invstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, invstd) = fused_forward_op().call(x, weight, bias, state.running_mean, state.running_var,
                                                    state.num_batches_tracked, training, momentum, eps, activation,
                                                    slope);
    }
    ctx->save_for_backward({y, invstd, weight.value_or(Tensor()), bias.value_or(Tensor())});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["slope"] = slope;
    ctx->mark_non_differentiable({invstd});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for invstd (nobody differentiates it)
    return {y, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(kInputs);  // y unused by the loss: no gradient at all
    const auto saved = ctx->get_saved_variables();
    const Tensor& y = saved[0];
    const Opt weight = saved[2].defined() ? Opt(saved[2]) : Opt();
    const Opt bias = saved[3].defined() ? Opt(saved[3]) : Opt();
    // needs_input_grad counts the tensor inputs that were given: x, then weight and bias if present.
    const bool need_w = weight.has_value() && ctx->needs_input_grad(1);
    const bool need_b = bias.has_value() && ctx->needs_input_grad(weight.has_value() ? 2 : 1);
    const std::string& act = ctx->saved_data["activation"].toStringRef();
    Tensor dx, dw, db;
    {
      // Straight to the device kernel: the op's Autograd-key kernel would only add this guard itself.
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dx, dw, db) = fused_backward_op().call(y, grads[0], saved[1], weight, bias,
                                                      ctx->saved_data["training"].toBool(), need_w || need_b,
                                                      ctx->saved_data["eps"].toDouble(), act,
                                                      ctx->saved_data["slope"].toDouble());
    }
    variable_list out(kInputs);  // one entry per forward argument: x, weight, bias get theirs
    out[0] = ctx->needs_input_grad(0) ? dx : Tensor();
    out[1] = need_w ? dw : Tensor();
    out[2] = need_b ? db : Tensor();
    return out;
  }

  static constexpr size_t kInputs = 9;  // the arguments of forward after ctx
};

std::tuple<Tensor, Tensor> fused_autograd(const Tensor& x, const Opt& weight, const Opt& bias,
                                          const Tensor& running_mean, const Tensor& running_var,
                                          const Opt& num_batches_tracked, bool training, double momentum, double eps,
                                          c10::string_view activation, double slope) {
  auto out = InplaceABNFunction::apply(x, weight, bias, RunningState{running_mean, running_var, num_batches_tracked},
                                       training, momentum, eps, activation, slope);
  return {out[0], out[1]};
}

// Autograd-key kernel of a primitive: run it below autograd; its outputs carry no gradient.
template <typename Sig>
struct NonDifferentiable;

template <typename Ret, typename... Args>
struct NonDifferentiable<Ret(Args...)> {
  template <const char* kName>
  static Ret call(Args... args) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").typed<Ret(Args...)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(args...);
  }
};

constexpr char kStatistics[] = "ifbf_fast::inplace_abn_statistics";
constexpr char kForward[] = "ifbf_fast::inplace_abn_forward";
constexpr char kBackwardReduce[] = "ifbf_fast::inplace_abn_backward_reduce";
constexpr char kBackwardDx[] = "ifbf_fast::inplace_abn_backward_dx";
constexpr char kBackward[] = "ifbf_fast::inplace_abn_backward";
constexpr char kRunningUpdate[] = "ifbf_fast::inplace_abn_running_update";

using StatisticsSig = Stats(const Tensor&);
using ForwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Opt&, const Opt&, double,
                          c10::string_view, double);
using BackwardReduceSig = Sums(const Tensor&, const Tensor&, const Opt&, const Opt&, double, c10::string_view, double);
using BackwardDxSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Opt&, const Opt&, const Opt&,
                             const Opt&, double, c10::string_view, double);
using RunningUpdateSig = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Opt&,
                              double);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Opt&,
                                                       const Opt&, bool, bool, double, c10::string_view, double);

}  // namespace
}  // namespace ifbf

TORCH_LIBRARY(ifbf_fast, m) {
  // The fake (meta) kernels live in Python: importing this module registers them.
  m.set_python_module("ifbf_fast.ops.inplace_abn");
  // The activation ops take any strides (canonical(): NCHW-contiguous and channels_last dense as they
  // are, anything else copied once) and give their outputs x's layout; the fake kernels say the same.
  // flexible_layout lets inductor hand them its own layout: without it, where the compiled graph's
  // convolutions run channels_last and eager's did not (inductor on the CPU, or a NCHW model on CUDA),
  // every op got x and dy copied to eager's strides and its outputs copied back, four full-size copies
  // per layer and step.
  const std::vector<at::Tag> any_layout = {at::Tag::flexible_layout};
  m.def("inplace_abn(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
        "Tensor(c!)? num_batches_tracked, bool training, float momentum, float eps, str activation, float slope) "
        "-> (Tensor y, Tensor invstd)",
        any_layout);
  m.def("inplace_abn_backward(Tensor y, Tensor dy, Tensor invstd, Tensor? weight, Tensor? bias, bool training, "
        "bool param_grads, float eps, str activation, float slope) -> (Tensor dx, Tensor dweight, Tensor dbias)",
        any_layout);
  m.def("inplace_abn_statistics(Tensor x) -> (Tensor mean, Tensor var, Tensor count)",
        any_layout);
  m.def("inplace_abn_forward(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, float eps, "
        "str activation, float slope) -> Tensor",
        any_layout);
  m.def("inplace_abn_backward_reduce(Tensor y, Tensor dy, Tensor? weight, Tensor? bias, float eps, str activation, "
        "float slope) -> (Tensor sum_dz, Tensor sum_dz_xhat)",
        any_layout);
  m.def("inplace_abn_backward_dx(Tensor y, Tensor dy, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? mean_dz, "
        "Tensor? mean_dz_xhat, float eps, str activation, float slope) -> Tensor",
        any_layout);
  m.def("inplace_abn_running_update(Tensor mean, Tensor var, Tensor count, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, float momentum) -> ()");
}

#define IFBF_REGISTER_DEVICE(KEY, CUDA)                                  \
  TORCH_LIBRARY_IMPL(ifbf_fast, KEY, m) {                                \
    m.impl("inplace_abn", &ifbf::fused_forward<CUDA>);                   \
    m.impl("inplace_abn_backward", &ifbf::fused_backward<CUDA>);         \
    m.impl("inplace_abn_statistics", &ifbf::statistics<CUDA>);           \
    m.impl("inplace_abn_forward", &ifbf::forward<CUDA>);                 \
    m.impl("inplace_abn_backward_reduce", &ifbf::backward_reduce<CUDA>); \
    m.impl("inplace_abn_backward_dx", &ifbf::backward_dx<CUDA>);         \
    m.impl("inplace_abn_running_update", &ifbf::running_update<CUDA>);   \
  }

IFBF_REGISTER_DEVICE(CPU, false)
#ifdef IFBF_WITH_CUDA
IFBF_REGISTER_DEVICE(CUDA, true)
#endif

TORCH_LIBRARY_IMPL(ifbf_fast, Autograd, m) {
  using namespace ifbf;
  m.impl("inplace_abn", &fused_autograd);
  m.impl("inplace_abn_backward", &NonDifferentiable<BackwardSig>::call<kBackward>);
  m.impl("inplace_abn_statistics", &NonDifferentiable<StatisticsSig>::call<kStatistics>);
  m.impl("inplace_abn_forward", &NonDifferentiable<ForwardSig>::call<kForward>);
  m.impl("inplace_abn_backward_reduce", &NonDifferentiable<BackwardReduceSig>::call<kBackwardReduce>);
  m.impl("inplace_abn_backward_dx", &NonDifferentiable<BackwardDxSig>::call<kBackwardDx>);
  m.impl("inplace_abn_running_update", &NonDifferentiable<RunningUpdateSig>::call<kRunningUpdate>);
}
