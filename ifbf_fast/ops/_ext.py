"""Loading of the C++/CUDA extension ``ifbf_fast._C`` and what it can run on.

Importing this module imports torch first (the extension links against libtorch) and then the
extension, which registers the ops ``torch.ops.ifbf_fast.*``. An ImportError here means the package
was installed without building ``csrc/`` (``pip install --no-build-isolation -e .`` builds it).
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    from ifbf_fast import _C  # noqa: F401  (registers torch.ops.ifbf_fast)
except ImportError as exc:  # re-raised with the fix in the message
    raise ImportError(f"ifbf_fast._C could not be loaded ({exc}); build it with "
                      f"`pip install --no-build-isolation -e .` from the repository root") from exc

ops = torch.ops.ifbf_fast


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("ifbf_fast::abn_statistics", "CUDA")


def abn_unavailable_reason(x: torch.Tensor) -> Optional[str]:
    """Why the C++ InPlace-ABN kernels cannot run on ``x``, or ``None`` if they can."""
    if x.device.type == "cpu":
        return None
    if x.device.type == "cuda":
        return None if has_cuda_kernels() else "ifbf_fast._C was built without its CUDA kernels"
    return f"no ifbf_fast._C kernels for device {x.device}"
