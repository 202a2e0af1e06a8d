"""What the fused OHEM costs besides its arithmetic, checked without a GPU: device launches per call,
no fill and no host read, the per-device scratch left as the next call needs it, the per-call state
written fully, the label dtypes taken without a copy, the eager (C++ launcher node) and compiled
(custom op) paths, the bytes model against what the launches touch, and enough programs per launch.

Counts and sizes do not depend on the machine (the launches are stubbed at the network's shapes).
"""
import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ifbf_fast import ops
from ifbf_fast.kernels import ohem_ce as K
from ifbf_fast.kernels import ohem_ce_select as S
from ifbf_fast.kernels import ohem_ce_upsampled as KU
from ifbf_fast.ops.ohem_ce import ohem_cross_entropy_fast, ohem_cross_entropy_ref
from ifbf_fast.ops.ohem_ce_upsampled import ohem_cross_entropy_upsampled_fast
from ifbf_fast.utils.launches import count_launches, forbid_host_reads

from .test_ohem_ce import _check_grad, _check_loss, _fresh_separated, _run

NETWORK = (4, 19, 876, 876)
NETWORK_LOWRES = (4, 19, 219, 219)
SMS = 132                               # H100 / H200
MAX_LAUNCHES = 4                        # fwd + bwd, autograd's ones_like for the loss's gradient included


def _fwd_bwd(op, logits, target, **kw):
    x = logits.detach().requires_grad_(True)
    with ops.use_impl("fast"):
        loss = op(x, target, 0.75, None, **kw)
    return torch.autograd.grad(loss, [x])


def _network_inputs(lowres: bool, target_dtype=torch.uint8):
    logits = torch.empty(NETWORK_LOWRES if lowres else NETWORK, dtype=torch.bfloat16)
    target = torch.zeros(NETWORK[:1] + NETWORK[2:], dtype=target_dtype)
    return logits, target


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int64], ids=str)
@pytest.mark.parametrize("variant", ["plain", "fused"])
def test_launches_per_fwd_bwd_at_the_network_shape(variant, target_dtype):
    op = ops.ohem_cross_entropy_upsampled if variant == "fused" else ops.ohem_cross_entropy
    logits, target = _network_inputs(variant == "fused", target_dtype)
    with count_launches(stub_triton=True):
        _fwd_bwd(op, logits, target)             # first call: allocates the per-device scratch (a zero fill)
    with count_launches(stub_triton=True) as seen:
        _fwd_bwd(op, logits, target)
    assert seen.total <= MAX_LAUNCHES, str(seen)
    assert seen.triton == 3, str(seen)
    assert set(seen.by_name) - {"aten:ones_like"} == {n for n in seen.by_name if n.startswith("triton:")}, str(seen)
    assert seen.host_reads == 0


def _small(lowres: bool, dtype=torch.float32):
    if lowres:
        logits = torch.randn(2, 5, 3, 4) * 3
        target = torch.randint(0, 5, (2, 12, 16))
    else:
        logits = torch.randn(2, 5, 6, 7) * 3
        target = torch.randint(0, 5, (2, 6, 7))
    target[0, 0, :2] = 255
    return logits.to(dtype), target


@pytest.mark.parametrize("variant", ["plain", "fused"])
def test_no_host_read_no_fill_and_the_scratch_left_clean(variant):
    fast = ohem_cross_entropy_upsampled_fast if variant == "fused" else ohem_cross_entropy_fast
    logits, target = _small(variant == "fused")
    work = S.scratch(logits.device)
    bad = target.clone()
    bad[1, 1, 1] = 7
    cases = [(target, None), (target, 0.7), (bad, None), (torch.full_like(target, 255), 0.7)]
    for t, thresh in cases:
        x = logits.clone().requires_grad_(True)
        with count_launches() as seen, forbid_host_reads():
            fast(x, t, 0.75, thresh).backward()
        assert seen.host_reads == 0 and set(seen.by_name) == {
            "aten:ones_like", *(f"triton:{k}" for k in (K.bytes_model if variant == "plain" else
                                                         lambda *a: KU.bytes_model(a[0], (12, 16), a[1]))(
                (2, 5, 3, 4) if variant == "fused" else (2, 5, 6, 7), torch.float32)["launches"])}, str(seen)
        # The whole scratch is zero again: the first histogram and its exponent level (zeroed by the
        # select pass), the second histogram, the counters, tickets and digit (by its last program).
        assert not work.any(), (t is bad, thresh)


def test_empty_batch_runs_the_select_pass_alone():
    logits = torch.randn(0, 19, 3, 3)
    target = torch.zeros(0, 3, 3, dtype=torch.long)
    with count_launches() as seen:
        loss, losses, state, bad = K.ohem_ce_fwd(logits, target, 0.75, -1.0, 255)
    assert dict(seen.by_name) == {"triton:_ohem_ce_select_kernel": 1}
    assert float(loss) == 0.0 and float(bad) == 0.0 and int(state[K.STATE_N_VALID]) == 0


@contextlib.contextmanager
def _poisoned_empty(fill):
    # torch.empty and the Tensor methods the launchers allocate their per-call outputs with
    real, real_strided, real_like = torch.empty, torch.Tensor.new_empty_strided, torch.empty_like

    def poison(out):
        return out.fill_(fill if out.dtype.is_floating_point else -7)

    torch.empty = lambda *args, **kwargs: poison(real(*args, **kwargs))
    torch.Tensor.new_empty_strided = lambda self, *args, **kwargs: poison(real_strided(self, *args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: poison(real_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.Tensor.new_empty_strided, torch.empty_like = real, real_strided, real_like


@pytest.mark.parametrize("variant", ["plain", "fused"])
def test_per_call_outputs_written_fully(variant):
    # The state, loss, bad-label count and per-pixel losses are allocated uninitialised: two different
    # poisons must give the same outputs, bit for bit.
    fwd = KU.ohem_ce_up_fwd if variant == "fused" else K.ohem_ce_fwd
    logits, target = _small(variant == "fused")
    outs = []
    for fill in (float("nan"), 12345.0):
        with _poisoned_empty(fill):
            outs.append(fwd(logits, target, 0.5, 0.7, 255))
    for a, b in zip(*outs):
        assert torch.equal(a.view(torch.int32) if a.dtype == torch.float32 else a,
                           b.view(torch.int32) if b.dtype == torch.float32 else b)


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("variant", ["plain", "fused"])
def test_label_dtypes_without_a_conversion_copy(variant, target_dtype):
    fast = ohem_cross_entropy_upsampled_fast if variant == "fused" else ohem_cross_entropy_fast
    logits, target = _small(variant == "fused")
    want, g_want = _run(fast, logits, target.long())
    t = target.to(target_dtype)
    with count_launches() as seen:
        got, g_got = _run(fast, logits, t)
    assert not [n for n in seen.by_name if "copy" in n], str(seen)
    assert torch.equal(got, want) and torch.equal(g_got, g_want)


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int64], ids=str)
def test_bad_label_count_on_the_device(target_dtype):
    logits, target = _small(False)
    t = target.to(target_dtype)
    t[0, 3, 3] = 200                      # C = 5: bad; 255 is ignore_index
    t[1, 0, 0] = 5
    loss, _, state, bad = K.ohem_ce_fwd(logits, t, 0.75, -1.0, 255)
    assert bad.dtype == torch.float32 and bad.shape == () and float(bad) == 2.0
    assert int(state[K.STATE_N_BAD]) == 2 and torch.isnan(loss)
    if target_dtype == torch.int64:
        t[1, 0, 0] = -3
        assert float(K.ohem_ce_fwd(logits, t, 0.75, -1.0, 255)[3]) == 2.0
    t.fill_(255)
    assert float(K.ohem_ce_fwd(logits, t, 0.75, -1.0, 255)[3]) == 0.0


@pytest.mark.parametrize("variant", ["plain", "fused"])
def test_bitwise_deterministic(variant):
    fast = ohem_cross_entropy_upsampled_fast if variant == "fused" else ohem_cross_entropy_fast
    logits, target = _small(variant == "fused", torch.bfloat16)
    a, ga = _run(fast, logits, target, 0.6, 0.8)
    b, gb = _run(fast, logits, target, 0.6, 0.8)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32)) and torch.equal(ga.view(torch.int16), gb.view(torch.int16))


def test_eager_calls_bypass_the_custom_op_compiled_calls_use_it():
    import torch._dynamo

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    logits, target = _fresh_separated((2, 19, 7, 13), torch.float32, torch.device("cpu"), 0.75)
    with Record():
        _run(ohem_cross_entropy_fast, logits, target)
    assert not [s for s in seen if "ifbf_fast" in s], seen

    def step(x, t):
        return ohem_cross_entropy_fast(x, t, 0.75, 0.7)

    torch._dynamo.reset()
    explain = torch._dynamo.explain(step)(logits, target)
    assert explain.graph_break_count == 0
    assert "ohem_ce_fwd" in explain.graphs[0].code
    got, g_got = _run(torch.compile(step, fullgraph=True, backend="aot_eager"), logits, target)
    want, g_want = _run(step, logits, target)
    assert torch.equal(got, want)
    _check_grad(g_got, g_want, torch.float32, "compiled grad")


def test_fused_backward_owns_tiles_across_the_image():
    # Several owned tiles in both directions at factors that are not 4 (windows start inside the image).
    logits = torch.randn(1, 3, 10, 19) * 2
    target = torch.randint(0, 3, (1, 37, 81))
    target[0, :4] = 255
    assert KU.backward_tiling(10, 37)[0] < 10 and KU.backward_tiling(19, 81)[0] < 19
    x = logits.clone().requires_grad_(True)
    got = ohem_cross_entropy_upsampled_fast(x, target, 0.75)
    g_got, = torch.autograd.grad(got, [x])
    y = logits.clone().requires_grad_(True)
    want = ohem_cross_entropy_ref(torch.nn.functional.interpolate(y, size=(37, 81), mode="bilinear",
                                                                  align_corners=False), target)
    g_want, = torch.autograd.grad(want, [y])
    _check_loss(got, want, "loss")
    _check_grad(g_got, g_want, torch.float32, "grad_logits")


@pytest.mark.parametrize("size_in,size_out", [((219, 219), (876, 876)), ((256, 512), (1024, 2048)),
                                              ((4, 4), (13, 17)), ((10, 19), (37, 81)), ((3, 5), (100, 170))])
def test_backward_windows_hold_every_contributing_pixel(size_in, size_out):
    for axis in (0, 1):
        owned, window = KU.backward_tiling(size_in[axis], size_out[axis])
        scale = KU._f32(size_in[axis] / size_out[axis])
        for i0 in KU._source_rows(size_in[axis], size_out[axis], scale):
            i1 = torch.as_tensor(i0).clamp_max(size_in[axis] - 1)
            i1 = torch.minimum(i1 + 1, torch.tensor(size_in[axis] - 1))
            for r0 in range(0, size_in[axis], owned):
                last = min(r0 + owned, size_in[axis]) - 1
                hits = ((torch.as_tensor(i0) >= r0) & (torch.as_tensor(i0) <= last)) | ((i1 >= r0) & (i1 <= last))
                idx = hits.nonzero().flatten()
                assert int(idx[-1] - idx[0]) + 1 <= window
    if size_in == (219, 219):
        assert KU.backward_tiling(219, 876) == (7, 32)      # the network's x4: 7 x 7 owned, 32 x 32 windows


class _Recorder:
    """Stubbed Triton launches that record (kernel, programs, bytes of the tensor arguments)."""

    def __init__(self):
        self.launches = []

    @contextlib.contextmanager
    def patch(self):
        from triton.runtime import interpreter, jit
        classes = [c for c in (jit.JITFunction, interpreter.InterpretedFunction) if hasattr(c, "run")]
        saved = {c: c.run for c in classes}

        def run(fn, *args, grid=None, warmup=False, **kwargs):
            name = getattr(getattr(fn, "fn", None), "__name__", None) or fn.__name__
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            big = sum(t.numel() * t.element_size() for t in tensors
                      if t.numel() * t.element_size() >= K.SMALL_BYTES)
            self.launches.append((name, math.prod(grid), big, kwargs.get("num_warps")))

        for c in classes:
            c.run = run
        try:
            yield self
        finally:
            for c, fn in saved.items():
                c.run = fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int64], ids=str)
@pytest.mark.parametrize("variant", ["plain", "fused"])
def test_bytes_model_and_programs_per_launch_at_the_network_shape(variant, target_dtype, dtype):
    op = ops.ohem_cross_entropy_upsampled if variant == "fused" else ops.ohem_cross_entropy
    logits, target = _network_inputs(variant == "fused", target_dtype)
    logits = logits.to(dtype)
    rec = _Recorder()
    with rec.patch():
        _fwd_bwd(op, logits, target)
    if variant == "fused":
        model = KU.bytes_model(NETWORK_LOWRES, NETWORK[2:], dtype, target_dtype)
    else:
        model = K.bytes_model(NETWORK, dtype, target_dtype)
    assert [r[0] for r in rec.launches] == list(model["launches"])
    for name, programs, nbytes, _ in rec.launches:
        # The tensors a launch is handed (each read or written once) are what the model counts.
        assert nbytes <= model["launches"][name], name
        # Issue 14.2: at least 2 waves on 132 SMs (each kernel here keeps one program per SM slot busy
        # with 4-8 warps; none relies on loads in flight of a single program).
        assert programs >= 2 * SMS, (name, programs)
    assert model["total"] <= 1.10 * model["minimum"], model
    print(f"\n{variant} {dtype} labels {target_dtype}: total {model['total'] / 1e6:.1f} MB, "
          f"minimum {model['minimum'] / 1e6:.1f} MB, L2 {sum(model['l2'].values()) / 1e6:.1f} MB, "
          f"programs {[r[1] for r in rec.launches]}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_uint8_labels_save_seven_bytes_per_pixel_and_read(dtype):
    """The training step's labels are the loaders' uint8 (tests/engine/test_step_labels.py): against
    int64, each variant reads them twice (forward and backward) at 1 byte per pixel instead of 8, i.e.
    2 x 7 x 4 x 876^2 = 43.0 MB less per fwd+bwd, in the launches' total and in the op's minimum."""
    pixels = NETWORK[0] * NETWORK[2] * NETWORK[3]
    models = {"plain": lambda t: K.bytes_model(NETWORK, dtype, t),
              "fused": lambda t: KU.bytes_model(NETWORK_LOWRES, NETWORK[2:], dtype, t)}
    for variant, model in models.items():
        narrow, wide = model(torch.uint8), model(torch.int64)
        assert wide["total"] - narrow["total"] == wide["minimum"] - narrow["minimum"] == 2 * 7 * pixels
        assert narrow["total"] <= 1.10 * narrow["minimum"]
        print(f"\n{variant} {dtype}: int64 labels {wide['total'] / 1e6:.1f} MB, uint8 {narrow['total'] / 1e6:.1f} MB "
              f"({100 * (1 - narrow['total'] / wide['total']):.0f}% less)")
