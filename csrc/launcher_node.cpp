// A C++ autograd node around Python launchers: the eager route of the Triton ops (FBF, OHEM-CE).
//
// Why: a torch.autograd.Function costs tens of microseconds of Python per training call before any
// kernel is launched (Function.apply's Python wrapper, the ctx object, save_for_backward,
// mark_non_differentiable, ctx.saved_tensors, needs_input_grad), more than the fused ops' launches
// need (bench/bench_fbf.py and bench/bench_ohem_ce.py, their host benches). Here the graph
// bookkeeping is C++ and Python runs only the launchers themselves:
//
//   _C.launcher_apply(name, forward, backward, n_inputs, *args)
//
//   * args[:n_inputs] are tensors: the inputs that get a gradient; the rest are passed through;
//   * forward(*args) runs with grad mode off and returns (result, saved, state): result is the
//     differentiable output tensor, or a tuple whose first item is it (the other items are returned
//     as they are and carry no gradient); saved is a tuple of tensors kept for backward, not the
//     output itself (as SavedVariables: in-place changes are detected, saved-tensor hooks apply);
//     state is any Python object handed to backward (not referring to the output: see PyRef);
//   * backward(grad, *saved, state) returns the n_inputs gradients (a tuple, or one tensor when
//     n_inputs is 1); None for an input that gets none. It runs under the grad mode the autograd
//     engine sets (on only with create_graph=True). It is not called when the gradient is undefined.
//
// Without grad mode, or when no input requires a gradient, forward runs and no node is made.
// Returns result. The node's name() is `name` (what grad_fn.name() shows).
//
// The node type differs between the torch versions the project builds against: torch 2.11 holds
// autograd nodes in std::shared_ptr (made with deleteNode), torch 2.14 in c10::intrusive_ptr. make_node
// picks the right one at compile time; everything else used here is the same in both.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "launcher_node.h"

namespace ifbf {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// A Python reference owned by a node (set with a new reference), released under the GIL (the engine may
// drop the node on a thread that does not hold it); leaked, as torch's own PyNode does, once the
// interpreter is gone. What it holds is invisible to Python's cycle collector: the state handed to
// backward must not refer to the node's output.
struct PyRef {
  PyObject* obj = nullptr;
  PyRef() = default;
  PyRef(const PyRef&) = delete;
  PyRef& operator=(const PyRef&) = delete;
  void reset() {
    if (obj != nullptr && Py_IsInitialized()) {
      PyGILState_STATE g = PyGILState_Ensure();
      Py_CLEAR(obj);
      PyGILState_Release(g);
    }
    obj = nullptr;
  }
  ~PyRef() { reset(); }
};

// The Python error now set, as a C++ exception that keeps it: the engine may rethrow it on another
// thread, and torch's error handling restores the original Python exception for the caller.
[[noreturn]] void throw_persisted() {
  python_error err;
  err.persist();
  throw std::move(err);
}

struct LauncherNode : public Node {
  std::string name_;
  PyRef backward_;
  PyRef state_;
  std::vector<SavedVariable> saved_;
  bool released_ = false;

  std::string name() const override { return name_; }

  void release_variables() override {
    for (auto& s : saved_) s.reset_data();
    state_.reset();
    released_ = true;
  }

  variable_list apply(variable_list&& grads) override {
    const size_t n_inputs = num_outputs();
    if (!grads[0].defined()) return variable_list(n_inputs);  // nothing flows back through this output
    TORCH_CHECK(!released_, name_, ": trying to backward through the graph a second time (or to read saved "
                "tensors after they were freed). Specify retain_graph=True the first time.");
    // Unpacked before taking the GIL: an in-place change of a saved tensor raises here, with torch's message.
    variable_list saved;
    saved.reserve(saved_.size());
    for (auto& s : saved_) saved.push_back(s.unpack());

    pybind11::gil_scoped_acquire gil;
    const Py_ssize_t n_args = 2 + static_cast<Py_ssize_t>(saved.size());
    PyObject* args = PyTuple_New(n_args);
    if (args == nullptr) throw_persisted();
    PyTuple_SET_ITEM(args, 0, THPVariable_Wrap(grads[0]));
    for (size_t i = 0; i < saved.size(); ++i) {
      PyTuple_SET_ITEM(args, 1 + static_cast<Py_ssize_t>(i), THPVariable_Wrap(saved[i]));
    }
    PyObject* state = state_.obj != nullptr ? state_.obj : Py_None;
    Py_INCREF(state);
    PyTuple_SET_ITEM(args, n_args - 1, state);
    PyObject* res = PyObject_Call(backward_.obj, args, nullptr);
    Py_DECREF(args);
    if (res == nullptr) throw_persisted();

    variable_list out(n_inputs);
    auto take = [&](PyObject* item, size_t i) {
      if (item == Py_None) return true;
      if (!THPVariable_Check(item)) return false;
      out[i] = THPVariable_Unpack(item);
      return true;
    };
    bool ok;
    if (PyTuple_Check(res)) {
      ok = static_cast<size_t>(PyTuple_GET_SIZE(res)) == n_inputs;
      for (size_t i = 0; ok && i < n_inputs; ++i) ok = take(PyTuple_GET_ITEM(res, static_cast<Py_ssize_t>(i)), i);
    } else {
      ok = n_inputs == 1 && take(res, 0);
    }
    Py_DECREF(res);
    TORCH_CHECK(ok, name_, ": the backward launcher must return ", n_inputs, " gradient(s) (tensors or None)");
    return out;
  }
};

// torch 2.11: std::shared_ptr with deleteNode (found by argument-dependent lookup, so that this
// branch is only looked at where it is taken); torch 2.14: c10::intrusive_ptr.
template <typename N>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>();
  } else {
    return std::shared_ptr<N>(new N(), [](N* p) { deleteNode(p); });
  }
}

PyObject* type_error(const char* message) {
  PyErr_SetString(PyExc_TypeError, message);
  return nullptr;
}

// launcher_apply(name, forward, backward, n_inputs, *args) -> result (see the top of this file)
PyObject* launcher_apply(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  const Py_ssize_t n_args = PyTuple_GET_SIZE(args);
  if (n_args < 4) return type_error("launcher_apply(name, forward, backward, n_inputs, *args)");
  PyObject* name = PyTuple_GET_ITEM(args, 0);
  PyObject* forward = PyTuple_GET_ITEM(args, 1);
  PyObject* backward = PyTuple_GET_ITEM(args, 2);
  const long n_inputs = PyLong_AsLong(PyTuple_GET_ITEM(args, 3));
  if (n_inputs == -1 && PyErr_Occurred()) return nullptr;
  if (!PyUnicode_Check(name) || !PyCallable_Check(forward) || !PyCallable_Check(backward) || n_inputs < 1 ||
      n_inputs > n_args - 4) {
    return type_error("launcher_apply: name must be a str, forward and backward callables, 1 <= n_inputs <= len(args)");
  }
  variable_list inputs;
  inputs.reserve(static_cast<size_t>(n_inputs));
  for (Py_ssize_t i = 0; i < n_inputs; ++i) {
    PyObject* t = PyTuple_GET_ITEM(args, 4 + i);
    if (!THPVariable_Check(t)) return type_error("launcher_apply: the first n_inputs arguments must be tensors");
    inputs.push_back(THPVariable_Unpack(t));
  }
  const bool needs_grad = torch::autograd::compute_requires_grad(inputs);

  PyObject* fwd_args = PyTuple_GetSlice(args, 4, n_args);
  if (fwd_args == nullptr) return nullptr;
  PyObject* res;
  {
    at::AutoGradMode no_grad(false);  // as a torch.autograd.Function's forward: the launchers record no graph
    res = PyObject_Call(forward, fwd_args, nullptr);
  }
  Py_DECREF(fwd_args);
  if (res == nullptr) return nullptr;
  if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 3) {
    Py_DECREF(res);
    return type_error("launcher_apply: forward must return (result, saved, state)");
  }
  PyObject* result = PyTuple_GET_ITEM(res, 0);
  PyObject* saved = PyTuple_GET_ITEM(res, 1);
  PyObject* first = PyTuple_Check(result) && PyTuple_GET_SIZE(result) > 0 ? PyTuple_GET_ITEM(result, 0) : result;
  if (!THPVariable_Check(first) || !PyTuple_Check(saved)) {
    Py_DECREF(res);
    return type_error("launcher_apply: forward's result must be a tensor or a tuple starting with one, and saved a "
                      "tuple of tensors");
  }
  if (needs_grad) {
    const at::Tensor& out = THPVariable_Unpack(first);
    if (out.requires_grad()) {  // an input handed back, or a tensor with a graph of its own
      Py_DECREF(res);
      return type_error("launcher_apply: forward's differentiable output must be a new tensor");
    }
    auto node = make_node<LauncherNode>();
    node->name_ = PyUnicode_AsUTF8(name);
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    torch::autograd::set_history(out, node);
    const Py_ssize_t n_saved = PyTuple_GET_SIZE(saved);
    node->saved_.reserve(static_cast<size_t>(n_saved));
    for (Py_ssize_t i = 0; i < n_saved; ++i) {
      PyObject* t = PyTuple_GET_ITEM(saved, i);
      if (!THPVariable_Check(t)) {
        Py_DECREF(res);
        return type_error("launcher_apply: forward's saved must be a tuple of tensors");
      }
      const at::Tensor& v = THPVariable_Unpack(t);
      if (v.is_same(out)) {  // would need the node itself to unpack (torch saves outputs without grad_fn)
        Py_DECREF(res);
        return type_error("launcher_apply: forward must not save its differentiable output");
      }
      node->saved_.emplace_back(v, /*is_output=*/false);
    }
    node->backward_.obj = backward;
    Py_INCREF(backward);
    PyObject* state = PyTuple_GET_ITEM(res, 2);
    if (state != Py_None) {
      node->state_.obj = state;
      Py_INCREF(state);
    }
  }
  Py_INCREF(result);
  Py_DECREF(res);
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef kLauncherMethods[] = {
    {"launcher_apply", launcher_apply, METH_VARARGS,
     "launcher_apply(name, forward, backward, n_inputs, *args): a C++ autograd node around Python launchers"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* launcher_methods() { return kLauncherMethods; }

}  // namespace ifbf
