"""Inductor hands the fused ops its own layouts: no copy of x to eager's strides before each op.

Inductor may run a graph's convolutions in another layout than eager did: channels_last on the CPU
(mkldnn) for an NCHW model, and on CUDA for an NCHW model with layout optimisation. A custom op with
the default layout constraint (needs_exact_strides) then gets every input copied back to eager's
strides and its outputs copied forward again: for InPlace-ABN four full-size copies per layer and step.
The fused ops are tagged ``flexible_layout`` (csrc/inplace_abn.cpp, ops/fbf.py, ops/ohem_ce.py): their
kernels take any strides and their fake kernels state the output layouts the kernels produce.

Checked on the CPU, where mkldnn makes inductor's convolutions channels_last: the number of fused
kernels in the compiled forward and backward does not grow with the number of conv + InPlace-ABN
layers (each layer would add two copy kernels to each), and the compiled step matches eager.
"""
import os
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from ifbf_fast import nn as inn
from ifbf_fast import ops

_needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                   reason="needs mkldnn: inductor keeps NCHW convolutions NCHW without it")
# The chain runs on CPU tensors through the fast FBF, which needs the Triton interpreter; on a GPU
# machine (IFBF_TEST_GPU=1) the kernels are compiled instead, and the GPU benches cover the layouts.
_needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                        reason="needs the Triton interpreter (IFBF_TEST_GPU=1 leaves it off)")


class _Chain(torch.nn.Module):
    """conv -> InPlace-ABN, ``depth`` times, then FBF of the last activation and a convolution of it."""

    def __init__(self, depth: int, c: int = 8):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(depth))
        self.norms = torch.nn.ModuleList(inn.InPlaceABN(c) for _ in range(depth))
        self.side = torch.nn.Conv2d(c, c, 1, bias=False)
        self.fbf_weight = torch.nn.Parameter(torch.randn(2 * c, 2 * c) / (2 * c))
        self.fbf_bias = torch.nn.Parameter(torch.zeros(2 * c))
        self.head = torch.nn.Conv2d(2 * c, c, 1, bias=False)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = norm(conv(x))
        return self.head(ops.fbf(x, self.side(x), self.fbf_weight, self.fbf_bias))


def _step(model, x):
    model(x).square().mean().backward()


def _kernel_calls(codes) -> list:
    """Fused kernels called per compiled graph (forward, backward): ``cpp_fused_<name>(`` call lines."""
    return [len(re.findall(r"^\s+cpp_fused_\w+\(", code, re.M)) for code in codes]


def _compile_and_count(depth: int):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Chain(depth).train()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with ops.use_impl("fast"):
        _, codes = run_and_get_code(_step, torch.compile(model), x)
    torch._dynamo.reset()
    assert len(codes) == 2, "expected one forward and one backward graph"
    assert all("ifbf_fast.inplace_abn" in code for code in codes)
    return _kernel_calls(codes), codes


@_needs_mkldnn
@_needs_interpreter
@pytest.mark.timeout(900)
def test_no_layout_copies_per_layer_and_the_compiled_step_matches_eager():
    calls_2, codes = _compile_and_count(2)
    calls_4, _ = _compile_and_count(4)
    # Two more conv + ABN layers, no more kernels: no copy around any InPlace-ABN, forward or backward.
    assert calls_4 == calls_2, (calls_2, calls_4)
    # every interior InPlace-ABN reads the convolution's output buffer itself
    fwd = codes[0]
    conv_out = set(re.findall(r"^\s+(buf\d+) = extern_kernels\.convolution\(", fwd, re.M))
    abn_in = re.findall(r"torch\.ops\.ifbf_fast\.inplace_abn\.default\((buf\d+)", fwd)
    assert abn_in and set(abn_in) <= conv_out, (abn_in, conv_out)

    torch.manual_seed(0)
    eager, compiled = _Chain(2).train(), _Chain(2).train()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(2, 8, 6, 6)
    with ops.use_impl("fast"):
        ye = eager(x)
        yc = torch.compile(compiled)(x)
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
        ye.square().mean().backward()
        yc.square().mean().backward()
    torch._dynamo.reset()
    for (name, pe), (_, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-3, atol=1e-5, msg=name)
    for (name, be), (_, bc) in zip(eager.named_buffers(), compiled.named_buffers()):
        torch.testing.assert_close(bc, be, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("op", ["inplace_abn", "inplace_abn_backward", "inplace_abn_statistics",
                                "inplace_abn_forward", "inplace_abn_backward_reduce", "inplace_abn_backward_dx",
                                "fbf_fwd", "fbf_bwd", "ohem_ce_fwd", "ohem_ce_bwd", "ohem_ce_up_fwd",
                                "ohem_ce_up_bwd"])
def test_fused_ops_are_tagged_flexible_layout(op):
    from ifbf_fast.ops._ext import ops as ifbf_ops     # torch.ops.ifbf_fast, the C++ ops registered

    assert torch.Tag.flexible_layout in getattr(ifbf_ops, op).default.tags
