// The Python functions of launcher_node.cpp (a C++ autograd node around Python launchers), added to
// the module ifbf_fast._C by its init function in inplace_abn.cpp.
#pragma once

#include <Python.h>

namespace ifbf {

// The method table (launcher_apply), terminated by a null entry.
PyMethodDef* launcher_methods();

}  // namespace ifbf
