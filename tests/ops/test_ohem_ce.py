"""The fused Triton OHEM cross-entropy against its reference (under the interpreter unless IFBF_TEST_GPU=1).

Values are compared whatever the ties; gradients only on inputs whose k-th largest loss is separated
from its neighbours (the reference's ``topk`` picks arbitrary tied pixels), except in the tie test,
which checks the documented tie-symmetric weights. Ahead-of-time compile of every launched kernel
configuration lives in test_ohem_ce_aot.py. Every buffer allocated during a test is poisoned with NaN
(the ``poison`` fixture); comparisons and tolerances are tests/ops/_compare.py's (``TOLERANCE["ohem_ce"]``).
"""
import math
import struct

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ifbf_fast import ops
from ifbf_fast.kernels import ohem_ce as K
from ifbf_fast.kernels import ohem_ce_select as S
from ifbf_fast.ops import ohem_ce as O
from ifbf_fast.ops.ohem_ce import num_kept, ohem_cross_entropy_fast, ohem_cross_entropy_ref

from ._compare import DTYPES, assert_close, check, compare, run

pytestmark = pytest.mark.usefixtures("poison")


def _inputs(shape, dtype, device, ignore_frac=0.2, scale=2.0, ignore_index=255):
    n, c, h, w = shape
    logits = (torch.randn(shape) * scale).to(dtype).to(device)
    target = torch.randint(0, c, (n, h, w))
    target[torch.rand(n, h, w) < ignore_frac] = ignore_index
    return logits, target.to(device)


def _run(fn, logits, target, *args, grad_out=1.0, **kwargs):
    """(loss, grad_logits) of one call on a fresh leaf (a view keeps its strides)."""
    r = run(fn, (logits, target) + args, grad_out, {0: "grad_logits"}, out_name="loss", **kwargs)
    return r["loss"], r["grad_logits"]


def _check_loss(got, want, what="loss"):
    check("ohem_ce", "loss", got, want, torch.float32, what=what)


def _check_grad(got, want, dtype, what="grad_logits"):
    check("ohem_ce", "grad_logits", got, want, dtype, what=what)


def _ref_losses(logits, target, ignore_index=255):
    valid = target != ignore_index
    logp = torch.log_softmax(logits.float(), 1)
    loss = -logp.gather(1, torch.where(valid, target, 0).long().unsqueeze(1)).squeeze(1)
    return loss[valid]


def _separated_at_kth(logits, target, keep_ratio, ignore_index=255, gap=1e-4):
    losses = _ref_losses(logits, target, ignore_index).sort(descending=True).values
    k = num_kept(losses.numel(), keep_ratio)
    if k == 0 or k == losses.numel():
        return True
    return bool(losses[k - 1] - losses[k] > gap * max(1.0, float(losses[k - 1])))


def _check_against_ref(logits, target, keep_ratio=0.75, thresh=None, dtype=None, grad_out=1.0):
    dtype = dtype or logits.dtype
    got, g_got = _run(ohem_cross_entropy_fast, logits, target, keep_ratio, thresh, grad_out=grad_out)
    want, g_want = _run(ohem_cross_entropy_ref, logits, target, keep_ratio, thresh, grad_out=grad_out)
    assert got.dtype == torch.float32 and got.shape == ()
    assert g_got.dtype == logits.dtype and g_got.shape == logits.shape
    compare("ohem_ce", {"loss": got, "grad_logits": g_got}, {"loss": want, "grad_logits": g_want}, dtype)


def _fresh_separated(shape, dtype, device, keep_ratio, thresh=None, **kw):
    for _ in range(20):
        logits, target = _inputs(shape, dtype, device, **kw)
        if shape[1] == 1:          # every loss is 0 and every gradient 0: ties are harmless
            return logits, target
        if _separated_at_kth(logits, target, keep_ratio) and (
                thresh is None or _separated_at_kth_value(logits, target, -math.log(thresh))):
            return logits, target
    raise RuntimeError("no input without near-ties in 20 draws")


def _separated_at_kth_value(logits, target, cut, gap=1e-4):
    losses = _ref_losses(logits, target)
    return bool(((losses - cut).abs() > gap).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 19, 7, 13), (1, 1, 5, 3), (3, 5, 1, 1), (1, 4, 1, 37)], ids=str)
@pytest.mark.parametrize("keep_ratio", [0.75, 0.3])
def test_matches_reference(device, dtype, shape, keep_ratio):
    logits, target = _fresh_separated(shape, dtype, device, keep_ratio)
    _check_against_ref(logits, target, keep_ratio, grad_out=0.37)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("thresh", [0.7, 1e-4, 1.0])
def test_thresh_union(device, dtype, thresh):
    # keep_ratio 0.3 with thresh 0.7: the hard set outnumbers k (it is kept whole); 1e-4: it does not.
    logits, target = _fresh_separated((2, 19, 7, 13), dtype, device, 0.3, thresh=thresh, scale=3.0)
    _check_against_ref(logits, target, 0.3, thresh)


def test_thresh_both_regimes_are_exercised(device):
    logits, target = _inputs((2, 19, 7, 13), torch.float32, device, scale=3.0)
    losses = _ref_losses(logits, target)
    k = num_kept(losses.numel(), 0.3)
    assert int((losses > -math.log(0.7)).sum()) >= k > int((losses > -math.log(1e-4)).sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keep_all_is_plain_cross_entropy(device, dtype):
    logits, target = _inputs((2, 19, 7, 13), dtype, device)
    got, g_got = _run(ohem_cross_entropy_fast, logits, target, 1.0)
    want, g_want = _run(lambda x, t: F.cross_entropy(x.float(), t, ignore_index=255), logits, target)
    _check_loss(got, want, "loss")
    _check_grad(g_got, g_want, dtype, "grad_logits")
    _check_against_ref(logits, target, 1.0)


@pytest.mark.parametrize("n_valid", [1, 2, 3])
@pytest.mark.parametrize("keep_ratio", [0.75, 0.01, 1.0])
def test_tiny_valid_sets(device, n_valid, keep_ratio):
    logits, target = _inputs((1, 19, 4, 5), torch.float32, device, ignore_frac=0.0)
    keep = torch.randperm(20)[:n_valid]                         # valid pixels anywhere in the image
    flat = torch.full((20,), 255, dtype=torch.long)
    flat[keep] = torch.randint(0, 19, (n_valid,))
    target = flat.view(1, 4, 5).to(device)
    if _separated_at_kth(logits, target, keep_ratio):
        _check_against_ref(logits, target, keep_ratio)
    else:
        _check_loss(ohem_cross_entropy_fast(logits, target, keep_ratio),
                    ohem_cross_entropy_ref(logits, target, keep_ratio))


@pytest.mark.parametrize("shape", [(2, 19, 7, 13), (0, 19, 3, 3), (2, 19, 0, 5)], ids=str)
@pytest.mark.parametrize("thresh", [None, 0.7])
def test_all_ignored_gives_zero_and_zero_grads(device, shape, thresh):
    logits = torch.randn(shape, device=device) * 100
    target = torch.full((shape[0],) + shape[2:], 255, dtype=torch.long, device=device)
    loss, grad = _run(ohem_cross_entropy_fast, logits, target, 0.75, thresh)
    assert float(loss) == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert float(ohem_cross_entropy_ref(logits, target, 0.75, thresh)) == 0.0


@pytest.mark.parametrize("keep_ratio", [0.75, 0.5, 0.05])
def test_equal_losses_value_matches_whatever_the_tie(device, keep_ratio):
    # Every pixel has the same loss log(C): the k-th value is tied with all others.
    logits = torch.zeros(2, 19, 7, 13, device=device)
    target = torch.randint(0, 19, (2, 7, 13), device=device)
    _check_loss(ohem_cross_entropy_fast(logits, target, keep_ratio), ohem_cross_entropy_ref(logits, target, keep_ratio))
    _check_loss(ohem_cross_entropy_fast(logits, target, keep_ratio), torch.tensor(math.log(19), device=device),
                "loss vs log(19)")


def test_ties_at_kth_value_and_tie_symmetric_gradient(device):
    # 12 valid pixels: 4 clearly hard, 6 tied at the same loss, 2 easy; k = ceil(0.5 * 12) = 6,
    # so the top 6 take all 4 hard pixels and 2 of the 6 tied ones.
    c = 5
    logits = torch.randn(1, c, 3, 5, device=device)
    target = torch.zeros(1, 3, 5, dtype=torch.long, device=device)
    row = torch.tensor([0.0, 1.0, -1.0, 0.5, 2.0], device=device)
    tied = [4, 5, 6, 7, 8, 9]
    flat_logits = logits.view(c, 15)
    for p in tied:
        flat_logits[:, p] = row                                # identical rows and labels: equal losses
    for p in range(4):
        flat_logits[:, p] = torch.tensor([-6.0, 1.0, 2.0, 0.0, 0.0]) + p   # loss ~ 8: hard
    for p in (10, 11):
        flat_logits[:, p] = torch.tensor([6.0, 0.0, 0.0, 0.0, 0.0])        # loss ~ 0: easy
    target.view(-1)[12:] = 255
    loss, grad = _run(ohem_cross_entropy_fast, logits, target, 0.5)
    _check_loss(loss, ohem_cross_entropy_ref(logits, target, 0.5))
    prob = torch.softmax(logits.view(c, 15).t(), 1)
    onehot = F.one_hot(target.view(-1).clamp_max(c - 1), c).float()
    weight = torch.zeros(15, device=device)
    weight[:4] = 1.0
    weight[tied] = 2.0 / 6.0                                   # (k - n_greater) / n_tied
    expected = ((prob - onehot) * weight[:, None] / 6.0).t().reshape(1, c, 3, 5)
    assert_close(grad, expected, "tie-symmetric grad", atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_large_logits_stay_finite(device, dtype):
    logits = (torch.randn(2, 19, 7, 13) * 1e4).clamp(-6e4, 6e4).to(dtype).to(device)
    target = torch.randint(0, 19, (2, 7, 13), device=device)
    loss, grad = _run(ohem_cross_entropy_fast, logits, target, 0.75)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ohem_cross_entropy_ref(logits, target), atol=1e-2, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted_target"])
def test_layouts(device, dtype, layout):
    logits, target = _fresh_separated((2, 19, 7, 26), dtype, device, 0.75)
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        logits, target = logits[:, :, :, ::2], target[:, :, ::2]       # non-contiguous, H x W not dense
    else:
        target = target.transpose(1, 2).contiguous().transpose(1, 2)    # target with swapped strides
    if not _separated_at_kth(logits, target, 0.75):
        pytest.skip("slice drew a near-tie at the k-th value")
    if layout == "permuted_target":
        # The reference itself cannot take this target (zeros_like keeps its strides, then view(-1)):
        # compare with the same labels laid out contiguously.
        got, g_got = _run(ohem_cross_entropy_fast, logits, target)
        want, g_want = _run(ohem_cross_entropy_ref, logits, target.contiguous())
        _check_loss(got, want, "loss")
        _check_grad(g_got, g_want, dtype, "grad_logits")
        return
    _check_against_ref(logits, target, 0.75)
    if layout == "channels_last":
        _, grad = _run(ohem_cross_entropy_fast, logits, target)
        assert grad.is_contiguous(memory_format=torch.channels_last)



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,packed", [("channels_last", True), ("every_other_image", True),
                                           ("class_slice", False), ("one_class", False)])
def test_channels_last_packed_rows_and_the_strided_path(device, dtype, layout, packed):
    """Packed channels_last logits (each pixel's classes contiguous, pixel after pixel) take the flat
    load and store regrouped by a gather (kernels/ohem_ce.py ``_ohem_ce_packed_load``), at any batch
    stride; odd H*W (279 pixels: two full 128-pixel tiles and a partial one). A class slice of a wider
    channels_last tensor (pixel stride 24, not C) and a single class take the strided tile loads."""
    n, c = (2, 1) if layout == "one_class" else (2, 19)
    shape = (2 * n if layout == "every_other_image" else n, 24 if layout == "class_slice" else c, 9, 31)
    logits, target = _fresh_separated(shape, dtype, device, 0.75)
    logits = logits.contiguous(memory_format=torch.channels_last)
    if layout == "every_other_image":
        logits, target = logits[::2], target[::2]
    elif layout == "class_slice":
        logits = logits[:, :c]
        target = target.clamp(max=c - 1).where(target != 255, 255)
        if not _separated_at_kth(logits, target, 0.75):
            pytest.skip("slice drew a near-tie at the k-th value")
    assert bool(K._packed_classes(logits)) == packed
    _check_against_ref(logits, target, 0.75, grad_out=0.37)
    _, grad = _run(ohem_cross_entropy_fast, logits, target)
    assert grad.stride() == torch.empty_like(logits).stride()

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_grad_element_written(device, layout):
    logits, target = _inputs((2, 19, 7, 13), torch.float32, device)
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    _, losses, state, _ = K.ohem_ce_fwd(logits, target, 0.75, -1.0, 255)
    poisoned = torch.full_like(logits, float("nan"))
    out = K.ohem_ce_bwd(torch.tensor(1.0, device=device), logits, target, losses, state, poisoned)
    assert out is poisoned and not torch.isnan(out).any()
    _, want = _run(ohem_cross_entropy_ref, logits, target)
    if _separated_at_kth(logits, target, 0.75):
        _check_grad(out, want, torch.float32, "grad_logits")


@pytest.mark.parametrize("n_valid,keep_ratio", [(25, 0.28), (50, 0.56), (25, 0.6), (50, 0.54), (3, 1 / 3),
                                                (49, 0.1), (64, 0.75), (1, 1e-300)])
def test_device_k_matches_num_kept(device, n_valid, keep_ratio):
    # fp64 rounding matters: 0.28 * 25 = 7.000000000000001 (k = 8, not the rational 7), while in fp32
    # 0.6 * 25 = 15.000001 (k would be 16, not 15). k must follow num_kept exactly.
    logits = torch.randn(1, 3, 8, 8, device=device)
    target = torch.full((1, 8, 8), 255, dtype=torch.long, device=device)
    target.view(-1)[:n_valid] = torch.randint(0, 3, (n_valid,), device=device)
    _, _, state, _ = K.ohem_ce_fwd(logits, target, keep_ratio, -1.0, 255)
    inv_n = struct.unpack("<f", struct.pack("<i", int(state[K.STATE_INV_N])))[0]
    assert int(state[K.STATE_N_VALID]) == n_valid
    assert round(1.0 / inv_n) == num_kept(n_valid, keep_ratio) == int(state[K.STATE_K])



@pytest.mark.parametrize("keep_ratio", [0.75, 0.3])
def test_exact_kth_over_several_select_programs_and_every_chunk(device, keep_ratio):
    """The select pass over more than one program (12,871 losses: three full RED_BLOCKs and a partial
    one): the k-th largest of the forward's own loss buffer, bitwise, and the mean of the top k. Inputs
    are drawn until the losses that share the k-th's top 16 bits (the ones the second histogram counts)
    lie in every HIST_CHUNK of every full program, so that a chunk the second histogram skipped shows
    (logits of scale 0.02: the losses crowd around log 3, a few hundred per 1/256-octave bin)."""
    shape = (1, 3, 61, 211)
    pixels = shape[0] * shape[2] * shape[3]
    assert pixels > 3 * K.RED_BLOCK and K.RED_BLOCK % S.HIST_CHUNK == 0
    chunks = 3 * K.RED_BLOCK // S.HIST_CHUNK
    for _ in range(20):
        logits, target = _inputs(shape, torch.float32, device, scale=0.02)
        loss, losses, state, _ = K.ohem_ce_fwd(logits, target, keep_ratio, -1.0, 255)
        flat = losses.reshape(-1).cpu()
        valid = flat >= 0
        k = num_kept(int(valid.sum()), keep_ratio)
        top = flat[valid].topk(k).values
        kth_bits = int(top[-1].view(torch.int32))
        in_bin = (flat.view(torch.int32) >> 15) == (kth_bits >> 15)
        hit = in_bin[:chunks * S.HIST_CHUNK].view(chunks, S.HIST_CHUNK).any(1)
        if bool(hit.all()):
            break
    else:
        raise RuntimeError("no draw put the k-th's bin in every chunk in 20 draws")
    assert int(state[K.STATE_K]) == k and int(state[K.STATE_N_VALID]) == int(valid.sum())
    assert int(state[K.STATE_KTH]) == kth_bits
    want = top.double().sum() / k
    torch.testing.assert_close(loss.cpu().double(), want, rtol=2e-7, atol=0)

@pytest.mark.parametrize("keep_ratio", [0.2, 0.6, 0.8, 0.97])
def test_exact_kth_when_the_losses_span_many_exponents(device, keep_ratio):
    """The forward's last program finds the k-th's exponent by summing the fine histogram 256 bins per
    exponent, EXP_ROWS exponents at a time from the largest down (ohem_ce_select._ohem_ce_fwd_epilogue).
    Losses log(1 + 2 exp(-margin)) of margins from -80 to 30: from about 80 (exponent 133) down to
    2e-7 (105) and exact zeros (about 12%): the k-th lies in the first step of exponents (0.2: 132,
    0.6: 130), in the second (0.8: 117) or at zero, the scan's ninth and last step (0.97). The k-th
    largest of the forward's own loss buffer, bitwise, and the mean of the top k."""
    n, h, w = 2, 37, 53
    gen = torch.Generator().manual_seed(int(keep_ratio * 100))
    target = torch.randint(0, 3, (n, h, w), generator=gen)
    margin = torch.rand((n, h, w), generator=gen) * 110.0 - 80.0
    logits = torch.zeros(n, 3, h, w).scatter_(1, target[:, None], margin[:, None]).to(device)
    loss, losses, state, _ = K.ohem_ce_fwd(logits, target.to(device), keep_ratio, -1.0, 255)
    flat = losses.reshape(-1).cpu()
    exponents = flat.view(torch.int32) >> 23
    assert int(exponents.max()) - int(exponents[flat > 0].min()) > S.EXP_ROWS and bool((flat == 0).any())
    k = num_kept(flat.numel(), keep_ratio)
    top = flat.topk(k).values
    assert int(state[K.STATE_K]) == k and int(state[K.STATE_N_VALID]) == flat.numel()
    assert int(state[K.STATE_KTH]) == int(top[-1].view(torch.int32))
    if keep_ratio == 0.97:
        assert float(top[-1]) == 0.0
    torch.testing.assert_close(loss.cpu().double(), top.double().sum() / k, rtol=2e-7, atol=0)


def test_bad_labels_poison_the_result_and_can_raise(device):
    logits, target = _inputs((2, 19, 7, 13), torch.float32, device)
    for bad in (19, -3, 2 ** 40 + 1):            # 2**40 + 1 must not wrap to a valid class id
        t = target.clone()
        t[1, 3, 4] = bad
        for thresh in (None, 0.99):              # with 0.99 the hard set holds >= k pixels
            loss, grad = _run(ohem_cross_entropy_fast, logits, t, 0.75, thresh)
            assert torch.isnan(loss) and torch.isnan(grad).all()
        with pytest.raises(ValueError, match=f"label {bad}"):
            ohem_cross_entropy_ref(logits, t)
        O.set_label_check(True)
        try:
            with pytest.raises(ValueError, match=f"label {bad}"):
                ohem_cross_entropy_fast(logits, t)
        finally:
            O.set_label_check(None)


@pytest.mark.parametrize("variant", ["plain", "fused"])
def test_bad_uint8_labels_give_the_same_error(device, variant):
    """The loaders' uint8 labels: 19 and 254 (>= C, not 255) raise the reference's one-line error and,
    with the opt-in check, the fast path's; without it they poison the fast result."""
    from ifbf_fast.ops.ohem_ce_upsampled import ohem_cross_entropy_upsampled_fast, ohem_cross_entropy_upsampled_ref
    fast, ref = ((ohem_cross_entropy_upsampled_fast, ohem_cross_entropy_upsampled_ref) if variant == "fused"
                 else (ohem_cross_entropy_fast, ohem_cross_entropy_ref))
    logits, target = _inputs((2, 19, 3, 4) if variant == "fused" else (2, 19, 5, 6), torch.float32, device)
    if variant == "fused":
        target = torch.randint(0, 19, (2, 12, 16), device=device)
    target = target.to(torch.uint8)
    for bad in (19, 254):
        t = target.clone()
        t[1, 3, 4] = bad
        msg = rf"ohem_cross_entropy: target holds label {bad}, outside \[0, 19\) and not ignore_index=255"
        with pytest.raises(ValueError, match=msg):
            ref(logits, t)
        O.set_label_check(True)
        try:
            with pytest.raises(ValueError, match=msg):
                fast(logits, t)
        finally:
            O.set_label_check(None)
        assert torch.isnan(fast(logits, t))


def test_nan_logits_poison_the_result(device):
    logits, target = _inputs((1, 19, 7, 13), torch.float32, device, ignore_frac=0.0)
    logits[0, :, 2, 2] = float("nan")
    loss, grad = _run(ohem_cross_entropy_fast, logits, target, 0.75)
    assert torch.isnan(loss) and torch.isnan(grad).all()


def test_non_finite_logits_of_an_ignored_pixel_act_as_in_the_reference(device):
    """NaN or inf logits where the label is ignore_index: the loss is the reference's (that pixel
    takes no part), and so is the gradient: NaN at that pixel's classes (the reference's log-softmax
    backward multiplies its exp by a zero gradient), finite and matching elsewhere. The backward's
    softmax comes from the forward's log-sum-exp only where a pixel is kept."""
    for bad in (float("nan"), float("inf")):
        logits, target = _inputs((2, 19, 7, 13), torch.float32, device, ignore_frac=0.0)
        target[1, 3, 5] = 255
        logits[1, :, 3, 5] = bad
        loss, grad = _run(ohem_cross_entropy_fast, logits, target, 0.75)
        want_loss, want_grad = _run(ohem_cross_entropy_ref, logits, target, 0.75)
        _check_loss(loss, want_loss)
        nan = torch.isnan(want_grad)
        assert torch.equal(torch.isnan(grad), nan) and bool(nan[1, :, 3, 5].all()) and int(nan.sum()) == 19
        _check_grad(grad[~nan], want_grad[~nan], torch.float32)


def test_switch_routes_to_the_fast_path(device):
    from ifbf_fast.utils.launches import count_launches

    logits, target = _inputs((1, 19, 7, 13), torch.float32, device)
    for impl, expect_fast in (("fast", True), ("auto", True), ("reference", False)):
        # Eager calls run the launchers under the C++ launcher node (not the custom op): the Triton
        # launches show which path ran.
        with ops.use_impl(impl), count_launches() as seen:
            loss = ops.ohem_cross_entropy(logits, target)
        assert (seen.by_name["triton:_ohem_ce_fwd_kernel"] == 1) == expect_fast, impl
        _check_loss(loss, ohem_cross_entropy_ref(logits, target))
    with ops.use_impl("fast"), pytest.raises(ops.FastPathUnavailable, match="float64"):
        ops.ohem_cross_entropy(logits.double(), target)
    with ops.use_impl("auto"):        # fp64 logits: the reference, not an error
        torch.testing.assert_close(ops.ohem_cross_entropy(logits.double(), target),
                                   ohem_cross_entropy_ref(logits.double(), target))


# aten ops whose output shape depends on the data, or that copy a value to the host.
_SYNCING = ("nonzero", "masked_select", "_local_scalar_dense", "item", "topk", "sort", "unique",
            "masked_scatter", "argwhere")


def test_no_host_sync_or_data_dependent_shapes(device):
    logits, target = _inputs((2, 19, 7, 13), torch.bfloat16, device)
    x = logits.clone().requires_grad_(True)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    from ifbf_fast.utils.launches import count_launches, forbid_host_reads

    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with Record(), count_launches() as launched, forbid_host_reads():
            loss = ohem_cross_entropy_fast(x, target, 0.75, 0.7)
            loss.backward()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert launched.by_name["triton:_ohem_ce_fwd_kernel"] == 1 and launched.by_name["triton:_ohem_ce_bwd_kernel"] == 1
    assert launched.host_reads == 0
    bad = [s for s in seen if s.split(".")[0] in _SYNCING]
    assert not bad, f"host-synchronising or data-dependent ops on the fast path: {bad}"
    # The spy works: the reference does trip it.
    seen.clear()
    with Record():
        ohem_cross_entropy_ref(logits, target)
    assert any(s.split(".")[0] in _SYNCING for s in seen)


def test_opcheck(device):
    logits, target = _inputs((2, 5, 3, 4), torch.float32, device)
    x = logits.requires_grad_(True)
    torch.library.opcheck(torch.ops.ifbf_fast.ohem_ce_fwd.default, (x, target, 0.75, 0.7, 255))
    torch.library.opcheck(torch.ops.ifbf_fast.ohem_ce_fwd.default,
                          (x.detach().contiguous(memory_format=torch.channels_last), target, 0.5, -1.0, 255))
    for lg in (logits.detach(), logits.detach().contiguous(memory_format=torch.channels_last)):   # packed rows too
        _, losses, state, _ = K.ohem_ce_fwd(lg, target, 0.75, -1.0, 255)
        torch.library.opcheck(torch.ops.ifbf_fast.ohem_ce_bwd.default,
                              (torch.tensor(1.0, device=device), lg, target, losses, state))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_no_graph_breaks(device, backend):
    import torch._dynamo

    logits, target = _fresh_separated((2, 19, 7, 13), torch.float32, device, 0.75)

    def step(x, t):
        return ops.ohem_cross_entropy(x * 1.5, t, 0.75, 0.7) * 2.0

    torch._dynamo.reset()
    with ops.use_impl("fast"):
        explain = torch._dynamo.explain(step)(logits, target)
        assert explain.graph_break_count == 0 and explain.graph_count == 1, explain
        compiled = torch.compile(step, fullgraph=True, backend=backend)
        loss, grad = _run(compiled, logits, target)
        want, g_want = _run(step, logits, target)
    _check_loss(loss, want, "compiled loss")
    _check_grad(grad, g_want, torch.float32, "compiled grad")
    ref, g_ref = _run(lambda x, t: ohem_cross_entropy_ref(x * 1.5, t, 0.75, 0.7) * 2.0, logits, target)
    _check_loss(loss, ref, "compiled loss vs reference")
    _check_grad(grad, g_ref, torch.float32, "compiled grad vs reference")


def test_bench_helpers_count_bytes_and_run(device):
    """bench/bench_ohem_ce.py's byte counts and its timed callables (reference and fast; tiny shapes)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_ohem_ce.py")
    spec = importlib.util.spec_from_file_location("bench_ohem_ce", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pixels = 4 * 876 * 876
    assert bench.bytes_moved((4, 19, 876, 876), torch.bfloat16) == pixels * (19 * 2 + 1)     # uint8 labels
    assert bench.bytes_moved((4, 19, 876, 876), torch.bfloat16, torch.int64) == pixels * (19 * 2 + 8)
    assert bench.bytes_moved((4, 19, 876, 876), torch.float32, backward=True) == pixels * (2 * (19 * 4 + 1) + 19 * 4)
    assert bench.fast_path_bytes((1, 3, 2, 5), torch.float32, torch.uint8) == 10 * (3 * 4 + 1) + 10 * 8
    assert bench.fast_path_bytes((1, 3, 2, 5), torch.float32, torch.uint8, backward=True) == \
        10 * (2 * (3 * 4 + 1) + 12) + 10 * 12
    for pass_ in bench.PASSES:
        results = []
        for provider in ("reference", "fast"):
            torch.manual_seed(3)   # same inputs for both
            results.append(bench.make_case(provider, pass_, (1, 19, 5, 6), torch.float32, 0.7, 0.75, device.type)())
        ref, fast = ([r] if pass_ == "fwd" else list(r) for r in results)
        for f, r in zip(fast, ref):
            torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-4)


def test_under_autocast_grad_in_logits_dtype(device):
    # A bf16 conv output under autocast feeds the loss as is; the gradient flows back in bf16.
    conv = torch.nn.Conv2d(8, 19, 1).to(device)
    feats = torch.randn(2, 8, 7, 13, device=device)
    target = torch.randint(0, 19, (2, 7, 13), device=device)
    seen = {}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = conv(feats)
        logits.register_hook(lambda g: seen.update(dtype=g.dtype))
        loss = ohem_cross_entropy_fast(logits, target)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert seen["dtype"] == torch.bfloat16 and torch.isfinite(conv.weight.grad).all()
    _check_loss(loss, ohem_cross_entropy_ref(logits.detach(), target))


def test_saves_nothing_of_logits_size_beyond_the_logits(device):
    logits, target = _inputs((2, 19, 7, 13), torch.bfloat16, device)
    x = logits.clone().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ohem_cross_entropy_fast(x, target)
    n, c, h, w = x.shape
    assert any(t.data_ptr() == x.data_ptr() for t in saved)          # the input itself, no copy
    extra = [t for t in saved if t.data_ptr() != x.data_ptr() and t.data_ptr() != target.data_ptr()]
    assert sum(t.numel() * t.element_size() for t in extra) <= 4 * n * h * w + 4 * K.STATE_SIZE
    assert all(t.numel() <= n * h * w or t.numel() == K.STATE_SIZE for t in extra)
