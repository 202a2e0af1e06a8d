"""Test-wide set-up.

TRITON_INTERPRET=1 must be set before any Triton kernel is imported, so that the kernels run on CPU
tensors under Triton's interpreter on machines without a GPU (docs/DESIGN.md section 7). On a GPU
machine set IFBF_TEST_GPU=1 to leave it off and test the compiled kernels on CUDA tensors.
"""

import os

if os.environ.get("IFBF_TEST_GPU", "0") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_reset_impl():
    """Fresh, reproducible random inputs per test, and the implementation switch left as found."""
    from ifbf_fast.ops import _impl

    torch.manual_seed(0)
    saved = (_impl._global, list(_impl._stack))
    yield
    _impl._global, _impl._stack[:] = saved[0], saved[1]


@pytest.fixture
def device():
    """The device the fast paths are tested on: CUDA when IFBF_TEST_GPU=1, else the CPU."""
    if os.environ.get("IFBF_TEST_GPU", "0") not in ("", "0"):
        if not torch.cuda.is_available():
            pytest.skip("IFBF_TEST_GPU=1 but no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")
