"""FBF benchmarks (pytest-benchmark): reference (eager), torch.compile(reference), fast (Triton).

    python -m pytest bench/bench_fbf.py --benchmark-columns=median,iqr,rounds

The network's shapes (DESIGN section 1): batch 4, FBF1 = 256 + 64 and FBF2 = 256 + 128 channels, at
219 x 219 (876 / 4, the training crop) and 256 x 512 (full-size Cityscapes / 4); bf16 and fp32; NCHW and
channels_last; forward and forward+backward. The providers of one case share a group so that they
print side by side. Each result's ``extra_info`` holds the bytes the op must move (``bytes_moved``), the
achieved GB/s at the median time and the peak memory the call allocates beyond its inputs.
``test_copy_bandwidth`` measures the card's copy bandwidth in the same run, the yardstick for GB/s.

For the GPU report script: ``bytes_moved(shape, dtype, backward)`` and ``make_case(...)`` (the callable
that each benchmark times) are importable; nothing here runs at import but the kernels' import below.

``test_fbf_host`` (runs on the CPU): host microseconds per fwd+bwd call with every Triton launch stubbed
(``ifbf_fast.utils.launches``), fast beside the eager reference in the same run, launch counts in
``extra_info``. Without CUDA the fast path needs the Triton interpreter for CPU tensors, and the kernels
decide at import whether they are interpreted: the host case imports them with TRITON_INTERPRET=1 set for
the import only, and only when there is no CUDA device (so no GPU bench can ever time the interpreter;
bench/conftest.py still refuses TRITON_INTERPRET in the environment), see ``_host_case_kernels``. With
CUDA the host case uses CUDA tensors, the Triton launches stubbed the same way. The reference's time
includes its (small) CPU compute; the fast path's stubbed kernels compute nothing. The stub replaces
``JITFunction.run`` whole, so Triton's per-launch binding is not in these figures:
``bench/launch_host.py`` times the same calls through Triton's real launch path (no GPU needed).

    python -m pytest bench/bench_fbf.py --benchmark-only -k host
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Sequence

import pytest
import torch

from ifbf_fast import ops
from ifbf_fast.utils.launches import count_launches, stub_triton
from triton.runtime.interpreter import InterpretedFunction

OPS = importlib.import_module("ifbf_fast.ops.fbf")   # the module (ifbf_fast.ops.fbf is the function)


def _host_case_kernels():
    """The FBF kernels module for the host case, or a reason to skip.

    Without CUDA the kernels are imported interpreted (TRITON_INTERPRET=1 for the import only), and the
    module's INTERPRETER flag, which makes the fast path accept CPU tensors, is left off outside the
    host case: later CPU benches in the session (the train step under "auto") keep the reference FBF.
    """
    if torch.cuda.is_available():
        return importlib.import_module("ifbf_fast.kernels.fbf"), None
    if "ifbf_fast.kernels.fbf" in sys.modules:
        kernels = sys.modules["ifbf_fast.kernels.fbf"]
        if not isinstance(kernels._fbf_reduce_kernel, InterpretedFunction):
            return None, "the FBF kernels were imported compiled in this process; no CPU fast path"
        return kernels, None
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        kernels = importlib.import_module("ifbf_fast.kernels.fbf")
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = saved
    kernels.INTERPRETER = saved not in (None, "", "0")
    return kernels, None

BATCH = 4
FBFS = {"fbf1": (256, 64), "fbf2": (256, 128)}
SIZES = {"219x219": (219, 219), "256x512": (256, 512)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("nchw", "channels_last")
PROVIDERS = ("reference", "compiled_reference", "fast")
PASSES = ("fwd", "fwd_bwd")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="FBF benchmarks time CUDA kernels; no CUDA device here")


def bytes_moved(shape: Sequence[int], dtype: torch.dtype, backward: bool = False) -> int:
    """Bytes the fused op must move for an output of ``shape`` = (N, C, H, W) (DESIGN section 2).

    Forward: reads x twice (channel means, then the re-weighting) and writes out once: 3 x-sizes.
    ``backward=True`` counts forward + backward, the backward adding 4 x-sizes: grad_out and x read
    for sum_hw(grad_out * x), grad_out read again and grad_high/grad_low written: 7 x-sizes in all.
    The (N, C) and (C, C) terms (weight, gates, partial sums) are left out: < 0.1% at these shapes.
    """
    n, c, h, w = shape
    x_bytes = n * c * h * w * torch.empty((), dtype=dtype).element_size()
    return x_bytes * (7 if backward else 3)


_compiled_ref = None


def _provider_fn(provider: str) -> Callable:
    global _compiled_ref
    if provider == "reference":
        return OPS.fbf_ref
    if provider == "compiled_reference":
        if _compiled_ref is None:
            # One static graph per case: 32 cases would pass the default recompile limit and the later
            # ones would silently run eager.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 256)
            _compiled_ref = torch.compile(OPS.fbf_ref, dynamic=False)
        return _compiled_ref
    if provider == "fast":
        def fast(*args):
            with ops.use_impl("fast"):
                return ops.fbf(*args)
        return fast
    if provider == "fast_set":            # the switch set by the caller (host bench: no context per call)
        return ops.fbf
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def make_case(provider: str, pass_: str, n: int, ch: int, cl: int, h: int, w: int, dtype: torch.dtype,
              layout: str = "nchw", device: str = "cuda") -> Callable[[], object]:
    """The callable a benchmark times: one forward (``pass_="fwd"``) or forward+backward
    (``"fwd_bwd"``, gradients of all four inputs via autograd.grad, so nothing accumulates into .grad)
    on fresh random inputs (never zeros). The weight is a conv's (C, C, 1, 1) and weight and bias are
    fp32 whatever the activations' dtype, as the model's parameters are under autocast.
    """
    c = ch + cl
    high = torch.randn(n, ch, h, w, device=device, dtype=dtype)
    low = torch.randn(n, cl, h, w, device=device, dtype=dtype)
    if layout == "channels_last":
        high, low = (t.contiguous(memory_format=torch.channels_last) for t in (high, low))
    weight = torch.randn(c, c, 1, 1, device=device) / c ** 0.5
    bias = torch.randn(c, device=device)
    fn = _provider_fn(provider)
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(high, low, weight, bias)
        return run
    inputs = [t.requires_grad_() for t in (high, low, weight, bias)]
    grad = torch.randn(n, c, h, w, device=device, dtype=dtype)
    if layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)

    def run_bwd():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, grad)
    return run_bwd


@needs_cuda
@pytest.mark.benchmark(group="fbf", warmup=False)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("fbf", list(FBFS))
@pytest.mark.parametrize("pass_", PASSES)
def test_fbf(benchmark, pass_, fbf, size, dtype, layout, provider):
    ch, cl = FBFS[fbf]
    h, w = SIZES[size]
    from conftest import peak_bytes, synced     # bench/conftest.py (bench/ is on sys.path under pytest bench)
    torch.manual_seed(0)
    run = synced(make_case(provider, pass_, BATCH, ch, cl, h, w, DTYPES[dtype], layout))
    for _ in range(3):      # compile (torch.compile, Triton) and warm the allocator outside the timing
        run()
    peak = peak_bytes(run, torch.device("cuda"))
    benchmark.group = f"fbf {pass_} {fbf} {size} {dtype} {layout}"
    benchmark(run)
    nbytes = bytes_moved((BATCH, ch + cl, h, w), DTYPES[dtype], backward=pass_ == "fwd_bwd")
    median = benchmark.stats["median"]
    benchmark.extra_info.update(
        provider=provider, bytes_moved=nbytes, gb_per_s=nbytes / median / 1e9, median_ms=median * 1e3,
        peak_bytes=peak, device=torch.cuda.get_device_name())


@needs_cuda
@pytest.mark.benchmark(group="copy bandwidth", warmup=False)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_copy_bandwidth(benchmark, dtype):
    """dst.copy_(src) on a tensor the size of FBF2's output at 256x512: the card's practical bandwidth."""
    src = torch.randn(BATCH, 384, 256, 512, device="cuda", dtype=DTYPES[dtype])
    dst = torch.empty_like(src)
    from conftest import synced
    run = synced(lambda: dst.copy_(src))
    for _ in range(3):
        run()
    benchmark(run)
    nbytes = 2 * src.numel() * src.element_size()
    benchmark.extra_info.update(bytes_moved=nbytes, gb_per_s=nbytes / benchmark.stats["median"] / 1e9,
                                device=torch.cuda.get_device_name())


# --- host time per call (CPU; Triton launches stubbed) -------------------------------------------------

HOST_SHAPE = (2, 16, 8, 48, 48)       # N, Ch, Cl, H, W: small, the host cost does not depend on it


def _floor_forward(high, low, weight, bias):
    n, ch, h, w = high.shape
    return high.new_empty((n, ch + low.shape[1], h, w)), (high, low, weight), None


def _floor_backward(grad, high, low, weight, state):
    return (torch.empty_like(high), torch.empty_like(low), torch.empty_like(weight),
            weight.new_empty(weight.shape[0]))


def _floor_apply(high, low, weight, bias):
    """FBF's signature with no work on the fast path's own route (the C++ launcher node,
    csrc/launcher_node.cpp): the outputs allocated, nothing computed. Its fwd+bwd is what the autograd
    engine and the node cost (the "autograd_floor" provider): the fast path's host time minus this is
    the part the launchers and the op's checks cost."""
    from ifbf_fast.ops._ext import launcher_apply
    return launcher_apply("FBFFloorBackward", _floor_forward, _floor_backward, 4, high, low, weight, bias)


def _floor_case(layout: str) -> Callable[[], object]:
    n, ch, cl, h, w = HOST_SHAPE
    high, low = torch.randn(n, ch, h, w), torch.randn(n, cl, h, w)
    if layout == "channels_last":
        high, low = (t.contiguous(memory_format=torch.channels_last) for t in (high, low))
    inputs = [t.requires_grad_() for t in (high, low, torch.randn(ch + cl, ch + cl, 1, 1), torch.randn(ch + cl))]
    grad = torch.randn(n, ch + cl, h, w)

    def run():
        return torch.autograd.grad(_floor_apply(*inputs), inputs, grad)
    return run


@pytest.mark.benchmark(group="fbf host", warmup=True)
@pytest.mark.parametrize("provider", ("reference", "fast", "autograd_floor"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fbf_host(benchmark, monkeypatch, layout, provider):
    """Host microseconds of one fwd+bwd (``torch.autograd.grad`` of all four inputs) with the Triton
    launches stubbed: the part of the call a GPU cannot hide when the host is the slower side."""
    kernels, reason = _host_case_kernels()
    if reason:
        pytest.skip(reason)
    cpu = not torch.cuda.is_available()
    if cpu:
        monkeypatch.setattr(kernels, "INTERPRETER", True)     # CPU tensors take the (stubbed) fast path
    n, ch, cl, h, w = HOST_SHAPE
    torch.manual_seed(0)
    if provider == "autograd_floor":
        run = _floor_case(layout)
    else:
        run = make_case("reference" if provider == "reference" else "fast_set", "fwd_bwd", n, ch, cl, h, w,
                        torch.float32, layout, "cpu" if cpu else "cuda")
    # One intra-op thread: the reference's CPU ops on these small tensors otherwise fan out to threads
    # that, on a shared 2-core machine, made its timings swing 300x between runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ops.use_impl("fast" if provider == "fast" else "reference"):
            with stub_triton():
                run()                   # the first call allocates (and zeroes, once) the workspace
            with count_launches(stub_triton=True) as count:
                run()
            with stub_triton():
                benchmark.pedantic(run, rounds=200, iterations=1, warmup_rounds=20)
    finally:
        torch.set_num_threads(threads)
    stats = benchmark.stats.stats
    benchmark.extra_info.update(provider=provider, device="cpu" if cpu else "cuda", host_us_min=stats.min * 1e6,
                                host_us_median=stats.median * 1e6, launches=count.total,
                                triton_launches=count.triton, launches_by_name=dict(count.by_name))
