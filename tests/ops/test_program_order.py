"""The Triton kernels do not depend on the order in which their programs run.

Under the interpreter (TRITON_INTERPRET=1, tests/conftest.py) every launch runs its programs one after
another in grid order; on a GPU they run in any order and at once. The FBF reduce's last program of a
sample adds the splits' partial sums, the OHEM forward's programs fill one histogram with atomics and
the select pass's last program (by ticket) finishes the threshold: all of it must hold whichever program
comes last. ``program_order`` renumbers the programs of every interpreted launch (reversed, or a seeded
shuffle) and each op's forward and gradients must come out bitwise the same as in grid order; that they
do not rely on one program running before another is what makes the reductions deterministic too.
"""
import contextlib
import os
import random
import types

import pytest
import torch

from ifbf_fast import ops

from ._compare import poisoned, run

# The interpreter's order is what is permuted: with IFBF_TEST_GPU=1 the kernels run compiled on a GPU,
# in the card's own order, and these CPU-tensor cases have no fast path to take.
pytestmark = pytest.mark.skipif(os.environ.get("IFBF_TEST_GPU", "0") not in ("", "0"),
                                reason="interpreter only (IFBF_TEST_GPU=1 runs the compiled kernels)")


@contextlib.contextmanager
def program_order(mode: str, seed: int = 0):
    """Every interpreted launch inside runs its programs in ``mode`` order: "grid" (the interpreter's own),
    "reverse", or "shuffle" (a permutation drawn from ``seed`` and the grid size)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    perm = []

    def grid_dim(self, nx, ny, nz):
        set_dim(nx, ny, nz)
        n = nx * ny * nz
        order = list(range(n))
        if mode == "reverse":
            order.reverse()
        elif mode == "shuffle":
            random.Random(seed * 1_000_003 + n).shuffle(order)
        perm[:] = order

    def grid_idx(self, x, y, z):
        _nx, ny, nz = self.grid_dim
        p = perm[(x * ny + y) * nz + z]
        set_idx(p // (ny * nz), (p // nz) % ny, p % nz)

    builder.set_grid_dim = types.MethodType(grid_dim, builder)
    builder.set_grid_idx = types.MethodType(grid_idx, builder)
    try:
        yield
    finally:
        del builder.set_grid_dim, builder.set_grid_idx


ORDERS = [("reverse", 0), ("shuffle", 1)]


def _orders_agree(call):
    with ops.use_impl("fast"), poisoned():
        with program_order("grid"):
            want = call()
        for mode, seed in ORDERS:
            with program_order(mode, seed):
                got = call()
            for name, w in want.items():
                assert torch.equal(got[name], w), f"{name} differs when the programs run in {mode} order ({seed})"


def test_program_order_renumbers_every_program():
    """The context really permutes: a kernel that records its program id sees every id once, in the
    permuted order."""
    import triton
    import triton.language as tl

    @triton.jit
    def _order(out_ptr, counter_ptr):
        slot = tl.atomic_add(counter_ptr, 1)
        tl.store(out_ptr + slot, tl.program_id(0))

    for mode, expected in (("grid", list(range(6))), ("reverse", list(range(6))[::-1])):
        out, counter = torch.full((6,), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        with program_order(mode):
            _order[(6,)](out, counter)
        assert out.tolist() == expected
    out, counter = torch.full((6,), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    with program_order("shuffle", 3):
        _order[(6,)](out, counter)
    assert sorted(out.tolist()) == list(range(6)) and out.tolist() != list(range(6))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fbf_forward_and_gradients(layout):
    """NCHW 48 x 48 planes (2,304 >= 2,048: the ROWS path, several hw splits per sample); channels last
    20 x 20 (the C_MAJOR path, likewise split)."""
    g = torch.Generator().manual_seed(0)
    side = 48 if layout == "nchw" else 20
    high, low = torch.randn(2, 6, side, side, generator=g), torch.randn(2, 4, side, side, generator=g)
    if layout == "channels_last":
        high, low = (t.contiguous(memory_format=torch.channels_last) for t in (high, low))
    weight, bias = torch.randn(10, 10, 1, 1, generator=g) * 0.3, torch.randn(10, generator=g)
    grad = torch.randn(2, 10, side, side, generator=g)
    _orders_agree(lambda: run(ops.fbf, [high, low, weight, bias], grad,
                              {0: "grad_high", 1: "grad_low", 2: "grad_weight", 3: "grad_bias"}))


@pytest.mark.parametrize("variant", ["plain", "fused"])
def test_ohem_forward_and_gradients(variant):
    """Several forward programs share the histogram; the select pass's last program finishes it."""
    g = torch.Generator().manual_seed(1)
    n, c, h, w = (2, 5, 40, 36) if variant == "plain" else (2, 5, 24, 20)
    shape = (n, c, h // 4, w // 4) if variant == "fused" else (n, c, h, w)
    logits = torch.randn(shape, generator=g) * 3
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[0, :3] = 255
    op = ops.ohem_cross_entropy_upsampled if variant == "fused" else ops.ohem_cross_entropy
    _orders_agree(lambda: run(op, [logits, target, 0.75, None], 1.0, {0: "grad_logits"}))
