"""Loading of the C++/CUDA extension ``ifbf_fast._C`` and what it can run on.

Importing this module imports torch first (the extension links against libtorch) and then the
extension, which registers the ops ``torch.ops.ifbf_fast.*``. An ImportError here means the package
was installed without building ``csrc/`` (``pip install --no-build-isolation -e .`` builds it).
"""

from __future__ import annotations

from typing import Optional

import torch

from ifbf_fast.kernels import SUPPORTED_DTYPES

try:
    from ifbf_fast import _C  # noqa: F401  (registers torch.ops.ifbf_fast)
except ImportError as exc:  # re-raised with the fix in the message
    raise ImportError(f"ifbf_fast._C could not be loaded ({exc}); build it with "
                      f"`pip install --no-build-isolation -e .` from the repository root") from exc

ops = torch.ops.ifbf_fast

# The C++ autograd node around Python launchers (csrc/launcher_node.cpp): the eager route of the
# Triton ops (ops/fbf.py, ops/ohem_ce.py).
launcher_apply = _C.launcher_apply


# Looked up once: a torch._C query inside a function that torch.compile traces would break the graph.
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("ifbf_fast::inplace_abn_statistics", "CUDA")


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _HAS_CUDA_KERNELS


# the fast ops' dtypes (ifbf_fast.kernels.SUPPORTED_DTYPES), and float64 on the CPU (gradcheck)
_DTYPES = {"cpu": SUPPORTED_DTYPES + (torch.float64,), "cuda": SUPPORTED_DTYPES}
# The dtypes the kernels take per device, one set lookup per call (this runs on every InPlace-ABN call):
# x.is_cpu / x.is_cuda cost about 0.1 us on the CPU, x.device (a new torch.device object) about 0.8.
_RUNNABLE_CPU = frozenset(_DTYPES["cpu"])
_RUNNABLE_CUDA = frozenset(_DTYPES["cuda"] if _HAS_CUDA_KERNELS else ())


def abn_unavailable_reason(x: torch.Tensor) -> Optional[str]:
    """Why the C++ InPlace-ABN kernels cannot run on ``x``, or ``None`` if they can."""
    if x.dtype in (_RUNNABLE_CUDA if x.is_cuda else _RUNNABLE_CPU if x.is_cpu else ()):
        return None
    dev = x.device.type
    if dev not in _DTYPES:
        return f"no ifbf_fast._C kernels for device {x.device}"
    if dev == "cuda" and not has_cuda_kernels():
        return "ifbf_fast._C was built without its CUDA kernels"
    supported = _DTYPES[dev]
    return f"the InPlace-ABN kernels take {', '.join(str(d) for d in supported)} on {dev}, not {x.dtype}"
