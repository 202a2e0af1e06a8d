"""The C++/CUDA InPlace-ABN(-Sync) against ``inplace_abn_ref`` (the specification).

Tolerance (flash-attention's rule, tests/ops/_compare.py ``TOLERANCE["inplace_abn"]``): with the
reference in float64 as the truth, ``err(fast, truth) <= 2 * err(ref in the same dtype, truth) + atol``.
Freshly allocated outputs are poisoned with NaN (``fill_uninitialized_memory``) so that an element a
kernel forgets to write fails.
On a GPU machine, ``IFBF_TEST_GPU=1`` runs the same tests on CUDA tensors (the ``device`` fixture).
"""
import os
import shutil
import subprocess
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ifbf_fast.ops import inplace_abn, inplace_abn_ref, use_impl
from tests._multiproc import spawn_ranks
from tests.ops._compare import compare, largest_error, poisoned

_ext = pytest.importorskip("ifbf_fast.ops._ext", reason="ifbf_fast._C is not built")
from ifbf_fast.ops.inplace_abn import inplace_abn_fast  # noqa: E402

ops = torch.ops.ifbf_fast
ACTS = ("leaky_relu", "elu", "identity")
OP_NAMES = ("inplace_abn", "inplace_abn_backward", "inplace_abn_statistics", "inplace_abn_forward",
            "inplace_abn_backward_reduce", "inplace_abn_backward_dx", "inplace_abn_running_update")
TIMEOUT_S = 150


@pytest.fixture(autouse=True)
def _poison_empty():
    """Every torch.empty* (C++ at::empty included) comes back filled with NaN during the test."""
    with poisoned():
        yield


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if layout == "sliced":  # non-dense view: every other column of a wider tensor
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def _run(fn, x, w, b, dy, training=True, act="leaky_relu", slope=0.01, rm=None, rv=None, **kw):
    """y, dx, dw, db and the running statistics of one call with fresh leaves."""
    x = x.detach().clone().requires_grad_(True) if x.is_contiguous() else x.detach().requires_grad_(True)
    w = None if w is None else w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    c = x.shape[1]
    pd = torch.float64 if x.dtype == torch.float64 else torch.float32
    rm = torch.zeros(c, device=x.device, dtype=pd) if rm is None else rm.clone()
    rv = torch.ones(c, device=x.device, dtype=pd) if rv is None else rv.clone()
    y = fn(x, w, b, rm, rv, training, 0.1, 1e-5, act, slope, **kw)
    (y * dy.to(y.device, y.dtype)).sum().backward()     # dy may be made on the CPU
    return {"y": y.detach(), "dx": x.grad, "dw": None if w is None else w.grad,
            "db": None if b is None else b.grad, "rm": rm, "rv": rv}


def _max_err(a, b):
    """(largest |a - b|, its index)."""
    err, where, _, _ = largest_error(a, b)
    return err, where


def _compare(fast, ref, truth, dtype, extra_atol=0.0):
    """tests/ops/_compare.py's rule ``TOLERANCE["inplace_abn"]``: ``ref`` is the reference in ``dtype``,
    ``truth`` in float64."""
    compare("inplace_abn", fast, truth, dtype, lowp=ref, extra_atol=extra_atol)


def _ref_in_dtype(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, slope):
    """The specification's formula computed in x's own dtype (flash-attention's ``upcast=False``).

    ``inplace_abn_ref`` upcasts to fp32 internally, so in fp16/bf16 it shows none of the rounding that
    storing y in low precision implies; this is the low-precision reference of the tolerance rule, and
    in float64 the truth. ``test_ref_in_dtype_is_the_spec`` ties it to ``inplace_abn_ref``.
    """
    dt = x.dtype
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    if training:
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach().view(-1).to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var.detach().view(-1) * n / (n - 1)).to(running_var.dtype),
                                                alpha=momentum)
    else:
        mean, var = running_mean.to(dt).view(shape), running_var.to(dt).view(shape)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * (weight.to(dt).abs() + eps).view(shape)
    z = (x - mean) * scale
    if bias is not None:
        z = z + bias.to(dt).view(shape)
    return {"leaky_relu": lambda: F.leaky_relu(z, slope), "elu": lambda: F.elu(z), "identity": lambda: z}[activation]()


def _check_against_reference(x, w, b, dtype, act="leaky_relu", slope=0.01, training=True, dy=None,
                             extra_atol=0.0, rm=None, rv=None):
    xl = x.to(dtype)
    dy = torch.randn(x.shape, device=x.device) if dy is None else dy
    dyl = dy.to(dtype)
    kw = dict(training=training, act=act, slope=slope, rm=rm, rv=rv)
    fast = _run(inplace_abn_fast, xl, w, b, dyl, **kw)
    ref = _run(_ref_in_dtype, xl, w, b, dyl, **kw)
    to64 = (lambda t: None if t is None else t.double())
    if x.device.type == "cpu":
        truth = _run(_ref_in_dtype, to64(xl), to64(w), to64(b), dyl.double(), training=training, act=act,
                     slope=slope, rm=to64(rm), rv=to64(rv))
    else:  # no float64 kernels on CUDA; the fp32 formula is the truth there
        truth = _run(_ref_in_dtype, xl.float(), w, b, dyl.float(), **kw)
    assert fast["y"].dtype == dtype and fast["y"].shape == x.shape
    _compare(fast, ref, truth, dtype, extra_atol)
    return fast


@pytest.mark.parametrize("act", ACTS)
def test_ref_in_dtype_is_the_spec(act):
    x = torch.randn(4, 3, 5, 6) * 2 + 1
    w, b = torch.randn(3), torch.randn(3)
    dy = torch.randn(x.shape)
    for training in (True, False):
        rm, rv = torch.randn(3), torch.rand(3) + 0.5
        a = _run(inplace_abn_ref, x, w, b, dy, training=training, act=act, slope=0.1, rm=rm, rv=rv)
        e = _run(_ref_in_dtype, x.double(), w.double(), b.double(), dy.double(), training=training, act=act,
                 slope=0.1, rm=rm.double(), rv=rv.double())
        for k in a:
            torch.testing.assert_close(a[k].double(), e[k], rtol=1e-4, atol=1e-5, msg=k)


def _weights(c, device):
    """Weights of either sign with |w| in [0.5, 1.5]. Backward rebuilds x-hat = (z - b) / (|w| + eps) from
    the stored y, so y's rounding is amplified by 1 / (|w| + eps): inherent to InPlace-ABN, and in
    fp16/bf16 larger than the reference's own error once |w| << 1 (test_small_slope_and_near_zero_...)."""
    sign = torch.where(torch.rand(c, device=device) < 0.5, -1.0, 1.0)
    return sign * (0.5 + torch.rand(c, device=device))


def _dtypes(device):
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if device.type == "cpu" else [])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("act", ACTS)
def test_matches_reference(device, act, layout):
    for dtype in _dtypes(device):
        x = torch.randn(3, 6, 5, 7, device=device) * 1.5 + 0.3
        x = _layout(x.to(dtype), layout)
        w = _weights(6, device)
        b = torch.randn(6, device=device) * 0.5
        fast = _check_against_reference(x, w, b, dtype, act=act)
        if layout == "channels_last":
            assert fast["y"].is_contiguous(memory_format=torch.channels_last)
        for training in (False,):
            rm, rv = torch.randn(6, device=device) * 0.1, torch.rand(6, device=device) + 0.5
            _check_against_reference(x, w, b, dtype, act=act, training=training, rm=rm, rv=rv)


@pytest.mark.parametrize("shape", [(2, 3), (5, 1, 3), (1, 4, 1, 1 + 16), (2, 3, 2, 3, 4), (4, 8, 1, 1),
                                   (2, 16, 3, 5), (1, 2, 257, 3)])
def test_odd_shapes(device, shape):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(shape, device=device)
        c = shape[1]
        for layout in ("contiguous", "channels_last") if len(shape) in (4, 5) else ("contiguous",):
            _check_against_reference(_layout(x.to(dtype), layout), _weights(c, device),
                                     torch.randn(c, device=device), dtype, act="elu")


def test_small_slope_and_near_zero_negative_weights(device):
    # |w| + eps ~ 1e-3 .. 1e-5 with zero bias keeps y's relative precision (a bias >> |w| would leave
    # x-hat to the bias's ulp / |w|: the method's limit, not the kernels')
    w = torch.tensor([-1e-3, 1e-4, 0.0, -2.0, 0.5, -0.05], device=device)
    b = torch.tensor([0.0, 0.0, 0.0, 1.0, -1.0, 0.3], device=device)
    x = torch.randn(4, 6, 5, 5, device=device)
    for dtype in _dtypes(device):
        if dtype in (torch.float32, torch.float64):
            _check_against_reference(x, w, b, dtype, act="leaky_relu", slope=0.001)
            _check_against_reference(x, w, b, dtype, act="elu")
            continue
        # fp16/bf16: y = act(x-hat * (|w| + eps) + b) keeps x-hat only to ulp(y) / (|w| + eps), so the
        # gradients of these channels are limited by the method itself (x is not kept); the forward
        # and the running statistics are still held to the rule.
        fast = _run(inplace_abn_fast, x.to(dtype), w, b, torch.ones(x.shape, dtype=dtype), act="leaky_relu",
                    slope=0.001)
        ref = _run(_ref_in_dtype, x.to(dtype), w, b, torch.ones(x.shape, dtype=dtype), act="leaky_relu",
                   slope=0.001)
        truth = _run(_ref_in_dtype, x.to(dtype).double(), w.double(), b.double(), torch.ones(x.shape).double(),
                     act="leaky_relu", slope=0.001)
        keep = ("y", "rm", "rv")
        _compare({k: fast[k] for k in keep}, {k: ref[k] for k in keep}, {k: truth[k] for k in keep}, dtype)


def test_affine_off(device):
    x = torch.randn(3, 4, 6, 2, device=device)
    for w, b in ((None, None), (torch.randn(4, device=device), None), (None, torch.randn(4, device=device))):
        _check_against_reference(x, w, b, torch.float32, act="leaky_relu", slope=0.2)


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(act):
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    for training in (True, False):
        for cl in (False, True):
            xx = x.detach().contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            xx.requires_grad_(True)
            assert torch.autograd.gradcheck(
                lambda x, w, b: inplace_abn_fast(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, act, 0.1),
                (xx, w, b))


def test_running_statistics_unbiased_and_eval(device):
    x = torch.randn(5, 3, 4, 4, device=device) * 3 + 2
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    inplace_abn_fast(x, None, None, rm, rv, True, 0.3, 1e-5, "identity", 0.01)
    xd = x.double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(rm.double(), 0.3 * xd.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), 0.7 + 0.3 * xd.var(1, unbiased=True), rtol=1e-5, atol=1e-6)
    y = inplace_abn_fast(x, None, None, rm, rv, False, 0.3, 1e-5, "identity", 0.01)
    expect = (x - rm.view(1, 3, 1, 1)) / (rv.view(1, 3, 1, 1) + 1e-5).sqrt()
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


def test_public_entry_routes_to_fast_path():
    x = torch.randn(2, 3, 4, 4)
    with use_impl("fast"):
        a = inplace_abn(x, None, None, None, None, True)
    torch.testing.assert_close(a, inplace_abn_ref(x, None, None, None, None, True), rtol=1e-5, atol=1e-5)


def test_readable_errors():
    x = torch.randn(2, 3, 4)
    m, v = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="slope must be > 0"):
        ops.inplace_abn_forward(x, m, v, None, None, 1e-5, "leaky_relu", 0.0)
    with pytest.raises(ValueError, match="activation must be"):
        ops.inplace_abn_forward(x, m, v, None, None, 1e-5, "relu", 0.01)
    with pytest.raises(ValueError, match="weight is not compatible with x"):
        ops.inplace_abn_forward(x, m, v, torch.ones(4), None, 1e-5, "elu", 0.01)
    with pytest.raises(ValueError, match="mean is not compatible with x"):
        ops.inplace_abn_forward(x, m.half(), v, None, None, 1e-5, "elu", 0.01)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.inplace_abn_statistics(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="dy is not compatible with y"):
        ops.inplace_abn_backward_reduce(x, x[:1], None, None, 1e-5, "elu", 0.01)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ops.inplace_abn_backward_dx(x, x, v.float(), None, None, None, None, 0.0, "elu", 0.01)
    with pytest.raises(ValueError, match="running_var is not compatible with x"):
        ops.inplace_abn(x, None, None, rm, rv.double(), None, True, 0.1, 1e-5, "elu", 0.01)
    with pytest.raises(ValueError, match="momentum must be in"):
        ops.inplace_abn(x, None, None, rm, rv, None, True, 1.5, 1e-5, "elu", 0.01)
    with pytest.raises(ValueError, match="num_batches_tracked must be a one-element int64 tensor"):
        ops.inplace_abn(x, None, None, rm, rv, torch.zeros(()), True, 0.1, 1e-5, "elu", 0.01)
    with pytest.raises(ValueError, match="num_batches_tracked must be a one-element int64 tensor"):
        inplace_abn_ref(x, None, None, rm, rv, True, num_batches_tracked=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="var is not compatible with running_mean"):
        ops.inplace_abn_running_update(m, v[:2], torch.ones(1, dtype=torch.float64), rm, rv, None, 0.1)
    with pytest.raises(ValueError, match="invstd is not compatible with x"):
        ops.inplace_abn_backward(x, x, v, None, None, True, False, 1e-5, "elu", 0.01)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        inplace_abn_fast(torch.randn(1, 3, 1, 1), None, None, None, None, True)
    with pytest.raises(ValueError, match="slope must be > 0"):
        inplace_abn_fast(x, None, None, None, None, True, slope=-0.1)
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        inplace_abn_fast(x, None, None, None, None, False)


# Defined only by the C++ library itself: std::locale::classic(), std::ostream::_M_insert<double>,
# std::ios_base::Init::Init().
_LIBSTDCXX_MARKERS = ("_ZNSt6locale7classicEv", "_ZNSo9_M_insertIdEERSoT_", "_ZNSt8ios_base4InitC1Ev")


def test_extension_links_the_shared_libstdcxx():
    """_C.so must use the process's libstdc++, not carry a copy of its own: a toolchain that linked it
    statically (a GPU machine's /opt/gcc/bin/g++) gave a library whose first error message, a double
    formatted by TORCH_CHECK, crashed the process (setup.py links -lstdc++ by name against that)."""
    from ifbf_fast import _C
    nm, readelf = shutil.which("nm"), shutil.which("readelf")
    if not (nm and readelf):
        pytest.skip("binutils (nm, readelf) not installed")
    dynamic = subprocess.run([readelf, "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in dynamic, f"{_C.__file__} does not load the shared libstdc++:\n{dynamic}"
    symbols = subprocess.run([nm, "--defined-only", _C.__file__], capture_output=True, text=True).stdout
    copied = [m for m in _LIBSTDCXX_MARKERS if m in symbols]
    assert not copied, f"{_C.__file__} holds a static copy of libstdc++ (defines {copied})"


@pytest.mark.parametrize("key", ["CPU", "CUDA"])
def test_every_op_has_a_kernel(key):
    """CPU kernels always; CUDA kernels wherever the extension was built with nvcc (CI, GPU machines)."""
    if key == "CUDA" and not _ext.has_cuda_kernels():
        pytest.skip("ifbf_fast._C was built without its CUDA kernels (no nvcc / CPU-only torch)")
    for op in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ifbf_fast::{op}", key), (op, key)


def _opcheck_samples(device):
    out = []
    for dtype in _dtypes(device):
        for x in (torch.randn(2, 3, 4, 5, device=device, dtype=dtype),
                  torch.randn(2, 3, 4, 5, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last),
                  torch.randn(2, 3, 4, 10, device=device, dtype=dtype)[..., ::2], torch.randn(4, 3, device=device,
                                                                                            dtype=dtype)):
            out.append(x)
    return out


def test_opcheck_every_op(device):
    """opcheck (schema, fake kernel, autograd registration, AOT dispatch) of every op: every activation and
    layout in fp32, every other dtype on the contiguous 4-D sample with leaky_relu (the registrations do
    not depend on the dtype; values are the comparison tests' job); the fused op with BatchNorm2d's
    counter (mutated in training), the running update with and without it. 141 opchecks, ~30 s on the CPU."""
    for x in _opcheck_samples(device):
        full = x.dtype == torch.float32
        if not full and not (x.dim() == 4 and x.is_contiguous()):
            continue
        acts = ACTS if full else ("leaky_relu",)
        pd = torch.float64 if x.dtype == torch.float64 else torch.float32
        c = x.shape[1]
        m, v = torch.randn(c, device=device, dtype=torch.float64), torch.rand(c, device=device, dtype=torch.float64) + 0.5
        w, b = torch.randn(c, device=device, dtype=pd), torch.randn(c, device=device, dtype=pd)
        md, mx = torch.randn(c, device=device, dtype=pd), torch.randn(c, device=device, dtype=pd)
        rm, rv = torch.randn(c, device=device, dtype=pd), torch.rand(c, device=device, dtype=pd) + 0.5
        torch.library.opcheck(ops.inplace_abn_statistics.default, (x,))
        if x.dim() == 4 and x.is_contiguous():   # the sync path's running update: per channel, layout-free
            n = torch.full((1,), 40.0, device=device, dtype=torch.float64)
            for nbt in (torch.tensor(3, device=device), None):
                torch.library.opcheck(ops.inplace_abn_running_update.default,
                                      (m, v, n, rm.clone(), rv.clone(), nbt, 0.1))
        for act in acts:
            torch.library.opcheck(ops.inplace_abn_forward.default, (x, m, v, w, b, 1e-5, act, 0.1))
            y = ops.inplace_abn_forward(x, m, v, w, b, 1e-5, act, 0.1)
            dy = torch.randn_like(x)
            torch.library.opcheck(ops.inplace_abn_backward_reduce.default, (y, dy, w, b, 1e-5, act, 0.1))
            torch.library.opcheck(ops.inplace_abn_backward_dx.default, (y, dy, v.to(pd), w, b, md, mx, 1e-5, act,
                                                                        0.1))
            for training in (True, False):
                wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
                xg = x.detach().clone().requires_grad_(True) if x.is_contiguous() else x.detach().requires_grad_(True)
                nbt = torch.tensor(5, device=device)     # BatchNorm2d's 0-d int64 counter, mutated in training
                torch.library.opcheck(ops.inplace_abn.default, (xg, wg, bg, rm.clone(), rv.clone(), nbt, training,
                                                                0.1, 1e-5, act, 0.1))
                torch.library.opcheck(ops.inplace_abn_backward.default, (y, dy, v.to(pd), w, b, training, True, 1e-5,
                                                                         act, 0.1))
        torch.library.opcheck(ops.inplace_abn_backward_dx.default,
                              (x, x, v.to(pd), None, None, None, None, 1e-5, "identity", 0.1))
        torch.library.opcheck(ops.inplace_abn.default, (x, None, None, rm.clone(), rv.clone(), None, True, 0.1, 1e-5,
                                                        "identity", 0.1))
        torch.library.opcheck(ops.inplace_abn_backward.default, (x, x, v.to(pd), None, None, False, False, 1e-5, "elu",
                                                                 0.1))


def test_gradient_with_other_strides_than_y(device):
    """dy arriving channels-last, sliced or broadcast (as from .sum()) for an NCHW y, and vice versa."""
    x = torch.randn(2, 4, 5, 6, device=device)
    m, v = torch.randn(4, device=device, dtype=torch.float64), torch.rand(4, device=device, dtype=torch.float64) + 0.5
    md, mx = torch.randn(4, device=device), torch.randn(4, device=device)
    vs = v.float()  # the backward ops take the saved invstd in the parameter dtype
    w, b = _weights(4, device), torch.randn(4, device=device)
    for y_layout in ("contiguous", "channels_last"):
        y = ops.inplace_abn_forward(_layout(x, y_layout), m, v, w, b, 1e-5, "leaky_relu", 0.1)
        dy = torch.randn(x.shape, device=device)
        want_r = ops.inplace_abn_backward_reduce(y, dy.contiguous(), w, b, 1e-5, "leaky_relu", 0.1)
        want = ops.inplace_abn_backward_dx(y, dy.contiguous(), vs, w, b, md, mx, 1e-5, "leaky_relu", 0.1)
        want_f = ops.inplace_abn_backward(y, dy.contiguous(), vs, w, b, True, True, 1e-5, "leaky_relu", 0.1)
        for other in (_layout(dy, "channels_last"), _layout(dy, "sliced"), _layout(dy, "contiguous")):
            for got, exp in zip(ops.inplace_abn_backward_reduce(y, other, w, b, 1e-5, "leaky_relu", 0.1), want_r):
                torch.testing.assert_close(got, exp)
            torch.testing.assert_close(ops.inplace_abn_backward_dx(y, other, vs, w, b, md, mx, 1e-5, "leaky_relu", 0.1),
                                       want)
            for got, exp in zip(ops.inplace_abn_backward(y, other, vs, w, b, True, True, 1e-5, "leaky_relu", 0.1),
                                want_f):
                torch.testing.assert_close(got, exp)
        ones = torch.ones((), device=device).expand(x.shape)  # stride 0 everywhere
        torch.testing.assert_close(ops.inplace_abn_backward_dx(y, ones, vs, w, b, md, mx, 1e-5, "identity", 0.1),
                                   ops.inplace_abn_backward_dx(y, ones.contiguous(), vs, w, b, md, mx, 1e-5, "identity",
                                                               0.1))


def _saved_bytes(fn, x, exclude):
    """Bytes of the distinct storages saved for backward, not counting parameters and buffers."""
    seen = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values()), seen


def test_saved_for_backward_at_most_half_of_batchnorm_leaky_relu():
    x = torch.randn(4, 32, 24, 24, requires_grad=True)
    bn = nn.BatchNorm2d(32)
    ref_bytes, _ = _saved_bytes(lambda t: F.leaky_relu(bn(t), 0.01), x, list(bn.parameters()) + list(bn.buffers()))
    w, b = nn.Parameter(torch.ones(32)), nn.Parameter(torch.zeros(32))
    rm, rv = torch.zeros(32), torch.ones(32)
    out = {}

    def abn(t):
        out["y"] = inplace_abn_fast(t, w, b, rm, rv, True, 0.1, 1e-5, "leaky_relu", 0.01)
        return out["y"]

    fast_bytes, seen = _saved_bytes(abn, x, [w, b, rm, rv])
    assert x.untyped_storage().data_ptr() not in seen, "backward must not keep x"
    assert out["y"].untyped_storage().data_ptr() in seen
    assert fast_bytes <= ref_bytes / 2, f"saved {fast_bytes} B vs BatchNorm2d + LeakyReLU {ref_bytes} B"


class _ConvABN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.weight, self.bias = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))
        self.register_buffer("nbt", torch.tensor(0))

    def forward(self, x):
        with use_impl("fast"):
            return inplace_abn(self.conv(x), self.weight, self.bias, self.rm, self.rv, self.training, 0.1, 1e-5,
                               "leaky_relu", 0.01, num_batches_tracked=self.nbt)


def test_torch_compile_conv_abn_zero_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, compiled = _ConvABN(), _ConvABN()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 9, 7)
    explain = torch._dynamo.explain(_ConvABN())(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    ye, yc = eager(x), fn(x)
    torch.testing.assert_close(yc, ye)
    ye.square().sum().backward()
    yc.square().sum().backward()
    for (n, pe), (_, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(compiled.rv, eager.rv)
    assert int(compiled.nbt) == int(eager.nbt) == 1   # the mutated counter survives functionalization
    torch._dynamo.reset()


# --- two processes over gloo ---------------------------------------------------------------------

def _dist_worker(rank, port, sizes, x_all, w, b, dy_all, out_dir, compile_too):
    import torch.distributed as dist

    from ifbf_fast.utils.dist import exit_worker, local_group
    with local_group(rank, 2, port, timeout_s=60):
        start = sum(sizes[:rank])
        x = x_all[start:start + sizes[rank]]
        dy = dy_all[start:start + sizes[rank]]
        res = {}
        runs = [("eager", inplace_abn_fast)]
        if compile_too:
            runs.append(("compiled", torch.compile(inplace_abn_fast, backend="aot_eager", fullgraph=True)))
        # Issue 17.10: no "autograd kernel was not registered" and no deprecated-collective warning.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name, fn in runs:
                counter = torch.tensor(7)   # BatchNorm2d's num_batches_tracked: + 1 by the running update
                r = _run(fn, x, w, b, dy, act="leaky_relu", slope=0.05, group=dist.group.WORLD,
                         num_batches_tracked=counter)
                r["num_batches_tracked"] = int(counter)
                res[name] = r
        res["warnings"] = [str(m.message) for m in caught
                           if "autograd kernel" in str(m.message) or "deprecated" in str(m.message)]
        # The same union-too-small error on both ranks (no rank waits for the other).
        try:
            inplace_abn_fast(torch.randn(1 - rank, 2, 1, 1, dtype=x.dtype), None, None, None, None, True,
                             group=dist.group.WORLD)
            res["small_union_error"] = None
        except ValueError as exc:
            res["small_union_error"] = str(exc)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    exit_worker()


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("sizes", [(3, 1), (4, 0)])
def test_sync_two_processes_equal_union_batch(tmp_path, sizes):
    c = 5
    x_all = (torch.randn(sum(sizes), c, 3, 4, dtype=torch.float64) * 2 + 0.5)
    dy_all = torch.randn_like(x_all)
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    compile_too = sizes == (3, 1)
    spawn_ranks(_dist_worker, (sizes, x_all, w, b, dy_all, str(tmp_path), compile_too),
                timeout_s=TIMEOUT_S - 20, what="the synchronised InPlace-ABN")

    single = _run(inplace_abn_ref, x_all, w, b, dy_all, act="leaky_relu", slope=0.05,
                  rm=torch.zeros(c, dtype=torch.float64), rv=torch.ones(c, dtype=torch.float64))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for p in parts:
        assert p["small_union_error"] is not None and "more than 1 value" in p["small_union_error"]
        assert p["warnings"] == [], p["warnings"]
    for name in ("eager", "compiled") if compile_too else ("eager",):
        ranks = [p[name] for p in parts]
        # the reference computes in fp32 even for fp64 inputs, the fast path in fp64: fp32 tolerances
        tol = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), single["y"], **tol)
        torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), single["dx"], **tol)
        # weight / bias gradients are per rank (DDP all-reduces them): their sum is the union's
        torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], single["dw"], **tol)
        torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], single["db"], **tol)
        for r in ranks:
            assert r["num_batches_tracked"] == 8
            torch.testing.assert_close(r["rm"], single["rm"], **tol)
            torch.testing.assert_close(r["rv"], single["rv"], **tol)

