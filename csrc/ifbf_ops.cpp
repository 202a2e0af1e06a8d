// Schemas of the ifbf_fast ops, the Python module stub, and the CPU registrations.
#include <Python.h>
#include <torch/library.h>

#include "ifbf_ops.h"

// The ops are reached through torch.ops.ifbf_fast.*; the module exists so that `import ifbf_fast._C`
// loads the library and runs the registrations below.
static struct PyModuleDef ifbf_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ifbf_module); }

TORCH_LIBRARY(ifbf_fast, m) {
  m.def("abn_statistics(Tensor x) -> (Tensor mean, Tensor var, Tensor count)");
}

TORCH_LIBRARY_IMPL(ifbf_fast, CPU, m) { m.impl("abn_statistics", &ifbf::abn_statistics_cpu); }
