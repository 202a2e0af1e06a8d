"""The Triton interpreter computes what the compiled kernels compute (kernels/_interpreter.py): a
runtime scalar as a loop bound (Triton 3.6 with NumPy >= 2.4 refused it), fp32 -> bf16 rounding to
nearest even (the interpreter truncated; ``cvt.rn.bf16.f32`` rounds) and bf16 ``tl.dot`` on the
values (the interpreter multiplied the uint16 storage)."""
import numpy as np
import pytest
import torch

from ifbf_fast.kernels import _interpreter
from ifbf_fast.kernels import ohem_ce as K

pytestmark = pytest.mark.skipif(not K.INTERPRETER, reason="the interpreter's behaviour (TRITON_INTERPRET=1)")


def _edge_values():
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(20000, generator=g) * 10, torch.randn(2000, generator=g) * 1e-39,   # subnormals
                   torch.randn(2000, generator=g) * 3e38])
    bits = torch.randint(0, 2 ** 16, (4000,), generator=g, dtype=torch.int32)
    ties = ((bits << 16) | 0x8000).view(torch.float32)           # exactly half-way: the even neighbour wins
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895314e38, 3.4028235e38, 1.0 + 2 ** -8,
                            1.0 + 3 * 2 ** -8, -8.62301254272461])
    x = torch.cat([x, ties, special])
    return x[torch.isfinite(x) | torch.isinf(x)]


def test_fp32_to_bf16_bits_round_like_pytorch():
    x = _edge_values()
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = _interpreter.f32_to_bf16_bits(x.numpy())
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(float(x[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]
    nan = _interpreter.f32_to_bf16_bits(np.array([np.nan, -np.nan], dtype=np.float32))
    assert np.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).float().numpy()).all()


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def to_bf16(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.bfloat16), mask=offs < n)

    @triton.jit
    def count_steps(out_ptr, steps, start):
        acc = 0
        for _ in range(start, steps):        # a runtime loop bound: the scalar's __index__
            acc += 1
        tl.store(out_ptr, acc)

    @triton.jit
    def dot_bf16(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        a = tl.load(a_ptr + r[:, None] * N + r[None, :])
        b = tl.load(b_ptr + r[:, None] * N + r[None, :])
        tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))

    return to_bf16, count_steps, dot_bf16


def test_kernels_round_to_bf16_as_the_gpu_does():
    """A kernel's fp32 -> bf16 cast and store, bit for bit against PyTorch's (round to nearest even)."""
    to_bf16, _, _ = _kernels()
    x = _edge_values()
    y = torch.full(x.shape, float("nan"), dtype=torch.bfloat16)
    to_bf16[((x.numel() + 1023) // 1024,)](x, y, x.numel(), BLOCK=1024)
    torch.testing.assert_close(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16), rtol=0, atol=0)


def test_a_runtime_scalar_bounds_a_loop():
    _, count_steps, _ = _kernels()
    out = torch.zeros(1, dtype=torch.int32)
    for start, steps in ((0, 5), (2, 9), (3, 3)):
        count_steps[(1,)](out, steps, start)
        assert int(out) == steps - start


def test_patch_is_idempotent_and_names_its_fixes():
    fixes = _interpreter.patch()
    assert _interpreter.patch() == fixes
    assert set(fixes) <= {"index", "bf16_rne", "bf16_dot"}
    import triton
    if triton.__version__.startswith("3.6."):
        assert "index" in fixes


def test_a_bf16_matmul_multiplies_the_values():
    """bf16 x bf16 -> fp32 as the tensor cores compute it: products of bf16 values are exact in fp32."""
    _, _, dot_bf16 = _kernels()
    g = torch.Generator().manual_seed(3)
    a = torch.randn(16, 16, generator=g).to(torch.bfloat16)
    b = torch.randn(16, 16, generator=g).to(torch.bfloat16)
    c = torch.full((16, 16), float("nan"))
    dot_bf16[(1,)](a, b, c, N=16)
    torch.testing.assert_close(c, (a.double() @ b.double()).float(), rtol=1e-6, atol=1e-6)
