"""FBF's host-side budget, checked on the CPU: launches per fwd+bwd at the network's shapes, the bytes
each launch moves against the op's minimum, the work in flight per launch on a 132-SM GPU, and which
route (the C++ launcher node in eager, the custom op under torch.compile) a call takes.

Launch counts use ``count_launches(stub_triton=True)`` at the network's shapes (the interpreter does not
run; the inputs are uninitialised ``torch.empty``, never touched); the values are checked at small shapes.
"""
import importlib

import pytest
import torch

from ifbf_fast import ops
from ifbf_fast.utils.launches import count_launches, stub_triton

K = importlib.import_module("ifbf_fast.kernels.fbf")
OPS = importlib.import_module("ifbf_fast.ops.fbf")

BATCH = 4
FBFS = {"fbf1": (256, 64), "fbf2": (256, 128)}
SIZES = {"219x219": (219, 219), "256x512": (256, 512)}
LAYOUTS = ("nchw", "channels_last")
MAX_LAUNCHES = 5


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _big_inputs(ch, cl, h, w, layout, device="cpu", dtype=torch.bfloat16):
    fmt = _fmt(layout)
    high = torch.empty(BATCH, ch, h, w, dtype=dtype, device=device, memory_format=fmt).requires_grad_()
    low = torch.empty(BATCH, cl, h, w, dtype=dtype, device=device, memory_format=fmt).requires_grad_()
    weight = torch.zeros(ch + cl, ch + cl, 1, 1, device=device).requires_grad_()
    bias = torch.zeros(ch + cl, device=device).requires_grad_()
    grad = torch.empty(BATCH, ch + cl, h, w, dtype=dtype, device=device, memory_format=fmt)
    return [high, low, weight, bias], grad


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("fbf", list(FBFS))
def test_fwd_bwd_launches_at_network_shapes(fbf, size, layout):
    inputs, grad = _big_inputs(*FBFS[fbf], *SIZES[size], layout)
    for route in ("eager", "custom_op"):
        fn = ops.fbf if route == "eager" else (lambda *a: OPS.fbf_fwd(*a)[0])
        with ops.use_impl("fast"), stub_triton():    # first call: allocates (and zeroes, once) the counter
            torch.autograd.grad(fn(*inputs), inputs, grad)
        with ops.use_impl("fast"), count_launches(stub_triton=True) as count:
            out = fn(*inputs)
            torch.autograd.grad(out, inputs, grad)
        assert count.total <= MAX_LAUNCHES, f"{route}: {count}"
        assert count.total == count.triton == 4, f"{route}: no torch op may launch a kernel: {count}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_four_launches_compute_the_reference(layout, device):
    """The same four launches, run by the interpreter on a small shape, give the reference's values."""
    torch.manual_seed(3)
    fmt = _fmt(layout)
    high = torch.randn(2, 6, 5, 7, device=device).contiguous(memory_format=fmt).requires_grad_()
    low = torch.randn(2, 4, 5, 7, device=device).contiguous(memory_format=fmt).requires_grad_()
    weight = (torch.randn(10, 10, 1, 1, device=device) / 3).requires_grad_()
    bias = torch.randn(10, device=device).requires_grad_()
    grad = torch.randn(2, 10, 5, 7, device=device)
    inputs = [high, low, weight, bias]
    with ops.use_impl("fast"), count_launches() as count:
        out = ops.fbf(*inputs)
        grads = torch.autograd.grad(out, inputs, grad)
    assert count.total == count.triton == 4, str(count)
    assert out.grad_fn.name() == "FBFBackward"
    ref = OPS.fbf_ref(*inputs)
    for a, b in zip((out,) + grads, (ref,) + torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.dim() < 4 or a.is_contiguous(memory_format=fmt)    # the inputs' layout, dense
    # every reduce left its sample counters at zero for the next launch
    for counter, _ in K._WORKSPACES.values():
        assert int(counter.abs().sum()) == 0


def test_routes_eager_function_inference_and_custom_op(device):
    """Eager with grad: the C++ launcher node; without grad: the launcher alone; subclasses (here a
    FakeTensor) and torch.compile: the custom op (tests/ops/test_fbf.py compiles it)."""
    high, low = torch.randn(1, 3, 4, 4, device=device), torch.randn(1, 2, 4, 4, device=device)
    weight, bias = torch.randn(5, 5, device=device, requires_grad=True), torch.randn(5, device=device)
    with ops.use_impl("fast"):
        assert ops.fbf(high, low, weight, bias).grad_fn.name() == "FBFBackward"
        with torch.no_grad():
            assert ops.fbf(high, low, weight, bias).grad_fn is None
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(t) for t in (high, low, weight, bias)]
            out = ops.fbf(*fake)
        assert out.shape == (1, 5, 4, 4) and "fbf_fwd" in str(out.grad_fn.name())


def test_double_backward_is_refused_by_name(device):
    high = torch.randn(1, 3, 4, 4, device=device, requires_grad=True)
    low, weight, bias = torch.randn(1, 2, 4, 4, device=device), torch.randn(5, 5, device=device), torch.randn(5, device=device)
    with ops.use_impl("fast"):
        out = ops.fbf(high, low, weight, bias)
        with pytest.raises(RuntimeError, match="no double backward"):
            torch.autograd.grad(out.sum(), high, create_graph=True)


# --- bytes moved -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("fbf", list(FBFS))
def test_bytes_model_within_10_percent_of_the_minimum(fbf, size, layout, monkeypatch):
    monkeypatch.setattr(K, "_SM_COUNT", {0: K.SM_COUNT_H200})
    (ch, cl), (h, w) = FBFS[fbf], SIZES[size]
    inputs, grad = _big_inputs(ch, cl, h, w, layout, device="meta")
    high, low, weight, _ = inputs
    total = sum(K.traffic_bytes(K.launch_bytes(p)) for p in (K.plan_fwd(high, low, weight, 0),
                                                              K.plan_bwd(grad, high, low, weight, 0)))
    minimum = K.min_bytes(BATCH, ch + cl, h, w, 2)
    assert minimum <= total <= 1.10 * minimum, f"{total / minimum:.4f} x the minimum"


class _Capture:
    """Replaces the interpreter's launch: records (kernel, {argument name: value}) and runs it."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpretedFunction
        self.launches, real = [], InterpretedFunction.run

        def run(fn, *args, grid=None, **kwargs):
            self.launches.append((fn.fn.__name__, dict(zip(fn.arg_names, args))))
            return real(fn, *args, grid=grid, **kwargs)
        monkeypatch.setattr(InterpretedFunction, "run", run)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grad_stats", [False, True])
def test_each_launch_moves_what_the_model_says(layout, grad_stats, device, monkeypatch):
    """The model's bytes per pointer argument are the sizes of the tensors the launcher passes; the
    pointer arguments the model leaves out are placeholders (one of the listed tensors again)."""
    fmt = _fmt(layout)
    high = torch.randn(2, 5, 6, 7, device=device, dtype=torch.float16).contiguous(memory_format=fmt)
    low = torch.randn(2, 3, 6, 7, device=device, dtype=torch.float16).contiguous(memory_format=fmt)
    weight, bias = torch.randn(8, 8, 1, 1, device=device), torch.randn(8, device=device)
    grad = torch.randn(2, 8, 6, 7, device=device, dtype=torch.float16).contiguous(memory_format=fmt)
    cap = _Capture(monkeypatch)
    out, stats = K.fbf_fwd(high, low, weight, bias)
    K.fbf_bwd(grad, high, low, weight, stats, torch.randn_like(stats) if grad_stats else None)
    plans = [K.plan_fwd(high, low, weight), K.plan_bwd(grad, high, low, weight)]
    models = [K.launch_bytes(p, grad_stats=grad_stats) for p in plans]
    expected = [m[name] for m in models for name in ("reduce", "scale")]
    assert [k for k, _ in cap.launches] == ["_fbf_reduce_kernel", "_fbf_scale_kernel"] * 2
    for (kernel, args), model in zip(cap.launches, expected):
        tensors = {a: v for a, v in args.items() if isinstance(v, torch.Tensor)}
        for arg, (nbytes, _) in model.items():
            t = tensors[arg]
            size = t.numel() * t.element_size()
            if arg in ("counter_ptr", "scratch_ptr") and t.dim() == 1 and t.numel() >= 64:
                assert size >= nbytes, (kernel, arg)     # the persistent workspace: at least the part used
            else:
                assert size == nbytes, (kernel, arg, size, nbytes)
        listed = [id(tensors[a]) for a in model]
        for arg, t in tensors.items():
            assert arg in model or id(t) in listed, f"{kernel}: {arg} is neither modelled nor a placeholder"


# --- work in flight ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("fbf", list(FBFS))
def test_every_launch_keeps_a_132_sm_gpu_busy(fbf, size, layout, dtype, monkeypatch):
    """Each launch at the network's shapes gives >= 2 waves on 132 SMs or keeps 4 independent 16-byte
    loads in flight per thread; the reduces run on >= 132 programs whatever N * C is."""
    monkeypatch.setattr(K, "_SM_COUNT", {0: K.SM_COUNT_H200})
    inputs, grad = _big_inputs(*FBFS[fbf], *SIZES[size], layout, device="meta", dtype=dtype)
    high, low, weight, _ = inputs
    for plan in (K.plan_fwd(high, low, weight, 0), K.plan_bwd(grad, high, low, weight, 0)):
        for launch in (plan.reduce, plan.scale):
            work = K.work_in_flight(launch, high.element_size())
            assert work["waves"] >= 2 or work["loads_per_thread"] >= 4, (launch.name, launch.path, work)
            if launch.name == "reduce":
                assert work["programs"] >= K.SM_COUNT_H200, work


def test_workspace_follows_the_current_stream(device):
    """One workspace per (device, stream, thread): the raw stream handle the launchers read is the
    current stream's (checked on a GPU; on the CPU the key's stream is 0)."""
    high, low = torch.randn(1, 3, 4, 4, device=device), torch.randn(1, 2, 4, 4, device=device)
    weight, bias = torch.randn(5, 5, device=device), torch.randn(5, device=device)
    with ops.use_impl("fast"):
        ops.fbf(high, low, weight, bias)
    index = high.get_device()
    streams = {key[1] for key in K._WORKSPACES if key[0] == index}
    if device.type != "cuda":
        assert streams == {0}
        return
    assert K._current_raw_stream(index) == torch.cuda.current_stream(index).cuda_stream
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        ops.fbf(high, low, weight, bias)
        assert K._current_raw_stream(index) == side.cuda_stream
    torch.cuda.synchronize(device)
    assert side.cuda_stream in {key[1] for key in K._WORKSPACES if key[0] == index}
