"""Module tests check the modules, not the fast paths (tests/ops does that against the references).

They run the reference ops: under ``TRITON_INTERPRET=1`` the Triton kernels would run in the
interpreter and make every forward pass slow, and a fast path under construction must not mask a
module bug (nor the reverse). A test that wants the switch's default says ``ops.use_impl("auto")``.
"""

import pytest

from ifbf_fast import ops


@pytest.fixture(autouse=True)
def _reference_ops():
    with ops.use_impl("reference"):
        yield
