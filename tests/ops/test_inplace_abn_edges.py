"""InPlace-ABN at the edges: launches per call, running buffers written in place, no autograd or
deprecation warnings, and statistics that do not overflow (issues 13.1, 17.9, 17.10). Same tolerance
rule and NaN-poisoned outputs as test_inplace_abn.py, whose helpers it uses."""
import pytest
import torch

from ifbf_fast.ops import use_impl

pytest.importorskip("ifbf_fast.ops._ext", reason="ifbf_fast._C is not built")
from tests.ops.test_inplace_abn import (OP_NAMES, _max_err, _poison_empty, _ref_in_dtype, _run,  # noqa: E402,F401
                                        _weights, inplace_abn_fast, ops)


def test_one_process_fwd_bwd_is_at_most_6_launches():
    """Issue 13.1: forward + backward of the InPlaceABN module on one process, counter included, is two
    C++ ops of 3 CUDA kernels each, no aten glue (no count fill, no running-statistics ops, no sign or
    dW/db ops, and no ``num_batches_tracked.add_(1)``: the op increments it in its statistics combine)."""
    from ifbf_fast.nn import InPlaceABN
    from ifbf_fast.utils.launches import count_launches
    for training in (True, False):
        m = InPlaceABN(8).train(training)
        with torch.no_grad():
            m.weight.normal_()
            m.bias.normal_()
        x = torch.randn(2, 8, 5, 7, requires_grad=True)
        dy = torch.randn(x.shape)
        with use_impl("fast"), count_launches() as count:
            y = m(x)
            torch.autograd.grad(y, (x, m.weight, m.bias), dy)
        assert count.total <= 6, str(count)
        assert set(count.by_name) == {"native:ifbf_fast::inplace_abn", "native:ifbf_fast::inplace_abn_backward"}, \
            str(count)
        assert int(m.num_batches_tracked) == int(training)


@pytest.mark.parametrize("cls", ["InPlaceABN", "InPlaceABNSync", "ABN"])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_num_batches_tracked_counts_like_batchnorm(device, cls, impl):
    """BatchNorm2d's counter: + 1 per training forward, nothing in evaluation, on the fast op (CPU kernel;
    on a GPU machine the CUDA combine kernel) and on the reference; running statistics as BatchNorm2d's."""
    import ifbf_fast.nn as inn
    m = getattr(inn, cls)(6, activation="identity").to(device)
    bn = torch.nn.BatchNorm2d(6).to(device)
    with torch.no_grad():   # ABN's scale is |w| + eps: positive weights make it BatchNorm2d's w + eps
        m.weight.uniform_(0.5, 1.5)
        bn.weight.copy_(m.weight + m.eps)
    m.num_batches_tracked.fill_(3)   # counts on from a loaded checkpoint's value
    bn.num_batches_tracked.fill_(3)
    with use_impl(impl):
        for k, training in enumerate((True, True, False, True, False, False, True)):
            m.train(training)
            bn.train(training)
            x = torch.randn(3, 6, 4, 5, device=device) * 2 + 1
            torch.testing.assert_close(m(x), bn(x), rtol=1e-4, atol=1e-4)
            assert m.num_batches_tracked.dtype == torch.int64 and m.num_batches_tracked.dim() == 0
            assert int(m.num_batches_tracked) == int(bn.num_batches_tracked), (k, training)
    assert int(m.num_batches_tracked) == 3 + 4
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)


def test_running_update_primitive(device):
    """The synchronised path's update from the union statistics (one kernel on CUDA): both lerps with
    the unbiased variance (saturated at the float max), the counter + 1 (or no counter)."""
    c, n = 5, 37.0
    mean = torch.randn(c, dtype=torch.float64, device=device)
    var = torch.rand(c, dtype=torch.float64, device=device) + 0.5
    var[-1] = 1e39                                  # beyond float32: running_var saturates, stays finite
    count = torch.full((1,), n, dtype=torch.float64, device=device)
    rm0, rv0 = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    for counter in (torch.tensor(4, device=device), None):
        rm, rv = rm0.clone(), rv0.clone()
        ops.inplace_abn_running_update(mean, var, count, rm, rv, counter, 0.2)
        torch.testing.assert_close(rm.double(), 0.8 * rm0.double() + 0.2 * mean)
        expect = (0.8 * rv0.double() + 0.2 * var * n / (n - 1)).clamp(max=torch.finfo(torch.float32).max)
        torch.testing.assert_close(rv.double(), expect)
        assert counter is None or int(counter) == 5


def test_skipped_step_restores_num_batches_tracked():
    """engine/step.py FlatBuffers: every buffer is a view of one flat tensor per dtype, so the op's
    in-place increment lands in the flat int64 storage and a restore of a skipped step takes it back."""
    from ifbf_fast.engine.step import FlatBuffers
    from ifbf_fast.nn import InPlaceABN
    model = torch.nn.Sequential(InPlaceABN(4), InPlaceABN(4)).train()
    flat = FlatBuffers(model)
    counters = [m.num_batches_tracked for m in model]
    (ints,) = [f for f in flat.flats if f.dtype == torch.int64]
    assert all(c._base is ints for c in counters)
    x = torch.randn(2, 4, 3, 3)
    with use_impl("fast"):
        model(x)                                   # a good step
        assert ints.tolist() == [1, 1]
        flat.snapshot()
        model(x)                                   # a step found non-finite: restored
        assert ints.tolist() == [2, 2]
        flat.restore_where(torch.tensor(True))
        assert ints.tolist() == [1, 1] and [int(c) for c in counters] == [1, 1]
        model(x)                                   # the next good step counts on
        flat.restore_where(torch.tensor(False))
    assert [int(c) for c in counters] == [2, 2]
    assert sorted(model.state_dict()) == sorted(torch.nn.Sequential(torch.nn.BatchNorm2d(4),
                                                                     torch.nn.BatchNorm2d(4)).state_dict())


def test_running_statistics_written_in_place_into_views_of_one_buffer():
    """The trainer keeps every norm buffer as a view of one flat tensor: the op must write into the
    tensors it is given, never rebind or copy them."""
    from ifbf_fast.nn import InPlaceABN
    m = InPlaceABN(4)
    flat = torch.cat([m.running_mean, m.running_var])
    m.running_mean, m.running_var = flat[:4], flat[4:]
    ptrs = (m.running_mean.data_ptr(), m.running_var.data_ptr())
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    with use_impl("fast"):
        m(x)
    assert (m.running_mean.data_ptr(), m.running_var.data_ptr()) == ptrs
    assert m.running_mean._base is flat and m.running_var._base is flat
    xd = x.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(flat[:4].double(), 0.1 * xd.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat[4:].double(), 0.9 + 0.1 * xd.var(1), rtol=1e-5, atol=1e-6)


def test_buffers_in_another_dtype_are_updated():
    x = torch.randn(3, 4, 5, 5)
    rm, rv = torch.zeros(4, dtype=torch.float16), torch.ones(4, dtype=torch.float16)
    inplace_abn_fast(x, None, None, rm, rv, True, 0.5, 1e-5, "identity", 0.01)
    xd = x.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(rm.double(), 0.5 * xd.mean(1), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(rv.double(), 0.5 + 0.5 * xd.var(1), rtol=2e-3, atol=2e-3)


def test_primitives_have_autograd_kernels_and_warn_nothing():
    """Issue 17.10: torch warned that ifbf_fast::abn_statistics had no autograd kernel while a graph went
    through it. Every op now has one (the primitives' outputs are non-differentiable)."""
    import warnings
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    for op in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ifbf_fast::{op}", "Autograd"), op
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, var, count = ops.inplace_abn_statistics(x)
        assert not (mean.requires_grad or var.requires_grad)
        y = inplace_abn_fast(x, None, None, None, None, True)
        y.sum().backward()
        assert x.grad is not None


def _extreme_case(dtype, scale, offset, device):
    torch.manual_seed(0)
    lim = torch.finfo(dtype).max * 0.98
    x = (torch.randn(4, 3, 6, 7, device=device, dtype=torch.float64) * scale + offset).clamp(-lim, lim).to(dtype)
    assert x.isfinite().all()
    w, b = _weights(3, device), torch.randn(3, device=device)
    dy = torch.randn(x.shape, device=device).to(dtype)
    fast = _run(inplace_abn_fast, x, w, b, dy, act="leaky_relu", slope=0.1)
    truth = _run(_ref_in_dtype, x.double(), w.double(), b.double(), dy.double(), act="leaky_relu", slope=0.1,
                 rm=torch.zeros(3, dtype=torch.float64, device=device), rv=torch.ones(3, dtype=torch.float64,
                                                                                      device=device))
    return x, fast, truth


@pytest.mark.parametrize("dtype, scale, offset", [
    (torch.float32, 1e20, 0.0), (torch.float32, 1e20, 3e20), (torch.float32, 3e19, 1e21),
    (torch.bfloat16, 1e38, 0.0), (torch.bfloat16, 5e37, 2e38), (torch.bfloat16, 1e37, -3e38)])
def test_statistics_do_not_overflow_where_float64_stays_finite(device, dtype, scale, offset):
    """Issue 17.9: bf16 near 3e38 and fp32 near 1e20 used to give NaN and running_var = inf silently
    (fp32 Welford squares overflowed). y and every gradient now match the float64 truth; the running
    variance, which a float32 buffer cannot hold here, saturates at the float32 max (documented in
    ifbf_fast/ops/inplace_abn.py)."""
    x, fast, truth = _extreme_case(dtype, scale, offset, device)
    rel = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for k in ("y", "dx", "dw", "db", "rm"):
        assert fast[k].isfinite().all(), f"{k}: not finite"
        err, where = _max_err(fast[k], truth[k])
        ref = truth[k].abs().max().item()
        assert err <= rel * ref + 1e-30, f"{k}: max error {err:.3g} at {where} vs max |truth| {ref:.3g}"
    fmax = torch.finfo(torch.float32).max
    want_rv = truth["rv"].clamp(max=fmax).float()
    assert fast["rv"].isfinite().all()
    torch.testing.assert_close(fast["rv"], want_rv, rtol=1e-4, atol=0)
    # evaluation with the saturated buffers stays finite too
    y_eval = inplace_abn_fast(x, None, None, fast["rm"], fast["rv"], False)
    assert y_eval.isfinite().all()
