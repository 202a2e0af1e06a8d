"""Optional fused variant: bilinear upsampling of the logits inside the OHEM loss, against
``F.interpolate`` + the reference (under the interpreter unless IFBF_TEST_GPU=1); buffers poisoned with
NaN, comparisons and tolerances from tests/ops/_compare.py (``TOLERANCE["ohem_ce"]``)."""
import pytest
import torch
import torch.nn.functional as F

from ifbf_fast import ops
from ifbf_fast.kernels import ohem_ce_upsampled as K
from ifbf_fast.ops.ohem_ce import ohem_cross_entropy_ref
from ifbf_fast.ops.ohem_ce_upsampled import (ohem_cross_entropy_upsampled, ohem_cross_entropy_upsampled_fast,
                                             ohem_cross_entropy_upsampled_ref)

from ._compare import DTYPES, assert_within
from .test_ohem_ce import _check_grad, _check_loss, _run, _separated_at_kth

pytestmark = pytest.mark.usefixtures("poison")

# (N, C, h, w) -> (H, W): the exact x4 of the network, a non-integer factor, one class, odd sizes.
CASES = [((2, 19, 5, 9), (20, 36)), ((1, 19, 4, 4), (13, 17)), ((1, 1, 3, 3), (12, 12)), ((2, 5, 3, 7), (11, 29))]


def _fresh(shape, size, dtype, device, keep_ratio=0.75):
    for _ in range(20):
        logits = (torch.randn(shape) * 2).to(dtype).to(device)
        target = torch.randint(0, shape[1], (shape[0],) + size)
        target[torch.rand(target.shape) < 0.2] = 255
        target = target.to(device)
        up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        if shape[1] == 1 or _separated_at_kth(up, target, keep_ratio):
            return logits, target
    raise RuntimeError("no input without near-ties in 20 draws")


def _ref_fp32_interp(x, t, *args):
    # The fused kernels' semantics: interpolation in fp32 from the given (possibly low-precision) logits.
    return ohem_cross_entropy_ref(F.interpolate(x.float(), size=tuple(t.shape[-2:]), mode="bilinear",
                                                align_corners=False), t, *args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("thresh", [None, 0.7])
def test_matches_interpolate_then_reference(device, dtype, case, thresh):
    shape, size = case
    logits, target = _fresh(shape, size, dtype, device)
    got, g_got = _run(ohem_cross_entropy_upsampled_fast, logits, target, 0.75, thresh)
    want, g_want = _run(_ref_fp32_interp, logits, target, 0.75, thresh)
    _check_loss(got, want, "loss")
    assert g_got.dtype == dtype and g_got.shape == logits.shape
    _check_grad(g_got, g_want, dtype, "grad_logits")
    if dtype != torch.float32:
        # Against the unfused low-precision path (upsampled logits rounded to bf16/fp16): no worse than
        # that path's own distance to fp32, plus a small slack.
        ref_lowp = ohem_cross_entropy_upsampled_ref(logits, target, 0.75, thresh)
        ref_fp32 = ohem_cross_entropy_upsampled_ref(logits.float(), target, 0.75, thresh)
        assert_within(got, ref_fp32, ref_lowp, "loss vs the unfused low-precision path", atol=0.0, extra_atol=1e-5)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("classes,layout,lowres", [
    (19, "nchw", (9, 23)), (19, "channels_last", (9, 23)), (12, "nchw", (9, 23)), (40, "nchw", (9, 23)),
    (19, "nchw", (1, 9)), (19, "nchw", (8, 1)), (19, "channels_last", (1, 1))])
def test_forward_matmul_path_equals_the_gather_path(device, dtype, classes, layout, lowres):
    """The forward's matmul interpolation (exact x4 of fp16 / bf16 logits, ``forward_mma``: aligned
    tiles, loop-invariant weights, clamped windows) against the per-pixel gather of the four corners,
    which the same values in fp32 take: per-pixel losses equal up to fp32 rounding (the order of four
    additions). 9 x 23 -> 36 x 92: several programs of 8 tiles, every image edge, a partial last tile
    column (92 + 2 columns from -2), 16-, 32- and 64-lane class blocks (tiles of 4 x 64, 4 x 32 and
    4 x 16 pixels); one source row, column or pixel, whose clamped neighbours all read it. Loss and
    gradients against interpolate + the reference on this path: test_matches_interpolate_then_reference
    (its exact-x4 case in fp16 / bf16)."""
    shape, size = (2, classes) + lowres, (4 * lowres[0], 4 * lowres[1])
    plan = K.forward_mma(shape[2:], size, classes, dtype)
    assert plan["MMA"] and not K.forward_mma(shape[2:], size, classes, torch.float32)["MMA"]
    if lowres == (9, 23):
        assert K.forward_tiles(shape[2:], size, plan) > 2 * K.FWD_TILES and (size[1] + 2) % plan["OT_W"] != 0
    logits, target = _fresh(shape, size, dtype, device)
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    loss, losses, _, _ = K.ohem_ce_up_fwd(logits, target, 0.75, -1.0, 255)
    loss32, losses32, _, _ = K.ohem_ce_up_fwd(logits.float(), target, 0.75, -1.0, 255)
    torch.testing.assert_close(losses, losses32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss32, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("classes,layout,lowres", [
    (19, "nchw", (15, 17)), (19, "channels_last", (15, 17)), (12, "nchw", (8, 9)), (40, "nchw", (9, 8)),
    (19, "nchw", (1, 9)), (19, "nchw", (8, 1)), (19, "channels_last", (1, 1))])
def test_backward_x4_kernel_equals_the_gather_path(device, dtype, classes, layout, lowres):
    """The x4 backward (``_ohem_ce_up_bwd_x4_kernel``: exact x4 of fp16 / bf16 logits, tensor-core
    recompute and transposed interpolation) against the gather backward, which the same values in fp32
    take: each gradient element equal up to an ulp of the logits' dtype (the x4 kernel sums the terms
    in two bf16 pieces: 16 significant bits, against the gather's fp32). The shapes cover 3 x 3
    programs of 7 x 7 owned pixels with partial last ones (15 x 17), one row or column (whose clamped
    neighbours above, below, left and right all fold into it), one pixel, and 16-, 32- and 64-lane
    class blocks; the labels include ignored pixels, the kept set is separated at the k-th loss."""
    shape = (2, classes) + lowres
    size = (4 * lowres[0], 4 * lowres[1])
    assert K.backward_x4(lowres, size, classes, dtype) is not None
    assert K.backward_x4(lowres, size, classes, torch.float32) is None
    logits, target = _fresh(shape, size, dtype, device)
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    grad_out = torch.full((), 1.5, device=device)
    loss, losses, state, _ = K.ohem_ce_up_fwd(logits, target, 0.75, -1.0, 255)
    got = K.ohem_ce_up_bwd(grad_out, logits, target, losses, state)
    loss32, losses32, state32, _ = K.ohem_ce_up_fwd(logits.float(), target, 0.75, -1.0, 255)
    want = K.ohem_ce_up_bwd(grad_out, logits.float(), target, losses32, state32)
    assert got.dtype == dtype and got.stride() == logits.stride()
    assert torch.isfinite(got).all(), "an element left unwritten (poisoned) or a NaN"
    # one ulp of the output dtype (fp16's subnormal step below 2^-14: OHEM gradients are ~1 / kept
    # pixels), and 2^-16 of the largest gradient for the x4 kernel's 16-bit split of each term
    ulp, step = (2.0 ** -8, 0.0) if dtype == torch.bfloat16 else (2.0 ** -10, 2.0 ** -24)
    err = (got.double() - want.double()).abs()
    bound = ulp * want.double().abs() + step + 2.0 ** -16 * float(want.abs().max())
    assert bool((err <= bound).all()), (f"largest error {float(err.max()):.3g}, "
                                        f"{int((err > bound).sum())} of {err.numel()} elements beyond an ulp")
    assert float(want.abs().sum()) > 0


def test_layouts_all_ignored_and_switch(device):
    logits, target = _fresh((2, 19, 5, 9), (20, 36), torch.float32, device)
    cl = logits.contiguous(memory_format=torch.channels_last)
    got, g_got = _run(ohem_cross_entropy_upsampled_fast, cl, target)
    want, g_want = _run(ohem_cross_entropy_upsampled_ref, logits, target)
    _check_loss(got, want, "loss")
    _check_grad(g_got, g_want, torch.float32, "grad_logits")
    assert g_got.is_contiguous(memory_format=torch.channels_last)
    ignored = torch.full_like(target, 255)
    loss, grad = _run(ohem_cross_entropy_upsampled_fast, logits, ignored)
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    bad = target.clone()
    bad[0, 0, 0] = 19
    loss, grad = _run(ohem_cross_entropy_upsampled_fast, logits, bad)
    assert torch.isnan(loss) and torch.isnan(grad).all()
    # A factor below ~3 is not fused: "fast" says so, "auto" takes the reference.
    small = torch.randn(1, 19, 10, 10, device=device)
    t2 = torch.randint(0, 19, (1, 15, 15), device=device)
    with pytest.raises(ValueError, match="factor"):
        ohem_cross_entropy_upsampled_fast(small, t2)
    with ops.use_impl("fast"), pytest.raises(ops.FastPathUnavailable, match="factor"):
        ohem_cross_entropy_upsampled(small, t2)
    with ops.use_impl("auto"):
        torch.testing.assert_close(ohem_cross_entropy_upsampled(small, t2), ohem_cross_entropy_upsampled_ref(small, t2))


def test_opcheck_and_compile(device):
    import torch._dynamo

    logits, target = _fresh((1, 5, 3, 4), (12, 16), torch.float32, device)
    torch.library.opcheck(torch.ops.ifbf_fast.ohem_ce_up_fwd.default,
                          (logits.clone().requires_grad_(True), target, 0.75, 0.7, 255))
    _, losses, state, _ = K.ohem_ce_up_fwd(logits, target, 0.75, -1.0, 255)
    torch.library.opcheck(torch.ops.ifbf_fast.ohem_ce_up_bwd.default,
                          (torch.tensor(1.0, device=device), logits, target, losses, state))

    def step(x, t):
        return ohem_cross_entropy_upsampled(x * 2.0, t, 0.75) + 1.0

    torch._dynamo.reset()
    with ops.use_impl("fast"):
        explain = torch._dynamo.explain(step)(logits, target)
        assert explain.graph_break_count == 0 and explain.graph_count == 1, explain
        got, g_got = _run(torch.compile(step, fullgraph=True, backend="aot_eager"), logits, target)
    want, g_want = _run(lambda x, t: ohem_cross_entropy_upsampled_ref(x * 2.0, t, 0.75) + 1.0, logits, target)
    _check_loss(got, want, "compiled loss")
    _check_grad(g_got, g_want, torch.float32, "compiled grad")


def test_bench_helpers(device):
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_ohem_ce.py")
    spec = importlib.util.spec_from_file_location("bench_ohem_ce", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lr, lab = 4 * 19 * 219 * 219 * 2, 4 * 876 * 876 * 1          # uint8 labels, as the loaders give
    assert bench.bytes_moved_upsampled((4, 19, 219, 219), (876, 876), torch.bfloat16) == lr + lab
    assert bench.bytes_moved_upsampled((4, 19, 219, 219), (876, 876), torch.bfloat16, backward=True) == 3 * lr + 2 * lab
    outs = []
    for provider in bench.UP_PROVIDERS[::2] + ("fast_fused",):    # reference, fast_unfused, fast_fused
        torch.manual_seed(5)
        outs.append(bench.make_upsampled_case(provider, "fwd_bwd", (1, 19, 3, 4), (12, 16), torch.float32,
                                              device=device.type)())
    for other in outs[1:]:
        for got, want in zip(other, outs[0]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
