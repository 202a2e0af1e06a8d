"""OHEM cross-entropy benchmarks (pytest-benchmark): reference (topk), torch.compile(reference), fast.

    python -m pytest bench/bench_ohem_ce.py --benchmark-columns=median,iqr,rounds

The training loss's shape (DESIGN section 3): batch 4 x 19 classes x 876 x 876 (the crop), bf16 and
fp32 logits, NCHW and channels_last (the CUDA default of a model that upsamples its own logits), uint8
labels (the loaders' dtype, read by the kernels as they are) with about 10% ignored pixels (255),
keep_ratio 0.75, without and with the ``thresh=0.7`` union; forward and forward+backward. Without CUDA
these skip.

``test_host_ohem_ce`` (CPU, any machine): the host time of one fwd+bwd with every Triton launch
stubbed (counted, not run), fast beside the reference and beside an empty autograd step (the
engine's own floor), with the launch counts in ``extra_info``. It needs no TRITON_INTERPRET in the
environment (bench/conftest.py refuses it for the GPU benches): the fast path's availability probe
is told so only while the case runs, as ``memory_account.fast_paths_assumed`` does, and the stubbed
launches never compile or interpret a kernel. The providers of one case share a group so that
they print side by side. Each result's ``extra_info`` holds the minimal bytes the op must move
(``bytes_moved``), the bytes the fast kernels actually move (``fast_path_bytes``), the GB/s achieved
at the median time against ``bytes_moved``, and the peak memory the call allocates beyond its inputs.

For the GPU report script: ``bytes_moved(...)``, ``fast_path_bytes(...)`` and ``make_case(...)`` are
importable; nothing here runs at import. Without CUDA every benchmark skips, saying so.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Optional, Sequence

import pytest
import torch

from ifbf_fast import ops

OPS = importlib.import_module("ifbf_fast.ops.ohem_ce")
OPS_UP = importlib.import_module("ifbf_fast.ops.ohem_ce_upsampled")

SHAPE = (4, 19, 876, 876)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
THRESH = {"topk": None, "thresh0.7": 0.7}
PROVIDERS = ("reference", "compiled_reference", "fast")
PASSES = ("fwd", "fwd_bwd")
LAYOUTS = ("nchw", "channels_last")
IGNORE_FRAC = 0.1

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="OHEM benchmarks time CUDA kernels; no CUDA device here")


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_moved(shape: Sequence[int], logits_dtype: torch.dtype, target_dtype: torch.dtype = torch.uint8,
                backward: bool = False) -> int:
    """Minimal bytes the OHEM loss must move for logits of ``shape`` = (N, C, H, W).

    Forward: the logits and the labels read once (any exact selection needs every loss, hence every
    logit); ``target_dtype`` defaults to the loaders' uint8. ``backward=True`` counts forward +
    backward: the backward reads the logits and labels again (the softmax is recomputed, nothing of
    size (N, C, H, W) is saved) and writes grad_logits once. The O(1) scalars are left out. This is
    the yardstick for GB/s.
    """
    n, c, h, w = shape
    pixels = n * h * w
    one_pass = pixels * (c * _size(logits_dtype) + _size(target_dtype))
    if not backward:
        return one_pass
    return 2 * one_pass + pixels * c * _size(logits_dtype)


def fast_path_bytes(shape: Sequence[int], logits_dtype: torch.dtype, target_dtype: torch.dtype = torch.uint8,
                    backward: bool = False) -> int:
    """DRAM bytes the fast kernels move, from the bytes model next to their launchers
    (``kernels/ohem_ce.py: bytes_model``): ``bytes_moved`` plus the fp32 per-pixel loss buffer, written
    by the forward and read by the select pass (8 bytes per pixel), and read once more by the backward
    (4 bytes per pixel). The histogram atomics and the O(1) scratch stay in L2 and are left out."""
    from ifbf_fast.kernels import ohem_ce as kernels

    launches = kernels.bytes_model(shape, logits_dtype, target_dtype)["launches"]
    if backward:
        return sum(launches.values())
    return launches["_ohem_ce_fwd_kernel"] + launches["_ohem_ce_select_kernel"]


_compiled_ref = None


def _provider_fn(provider: str) -> Callable:
    global _compiled_ref
    if provider == "reference":
        return OPS.ohem_cross_entropy_ref
    if provider == "compiled_reference":
        if _compiled_ref is None:
            # The reference synchronises (.item(), data-dependent topk): torch.compile graph-breaks
            # around those, which is what a user of compile(reference) gets.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 64)
            _compiled_ref = torch.compile(OPS.ohem_cross_entropy_ref, dynamic=False)
        return _compiled_ref
    if provider == "fast":
        def fast(*args):
            with ops.use_impl("fast"):
                return ops.ohem_cross_entropy(*args)
        return fast
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def make_inputs(shape: Sequence[int], dtype: torch.dtype, device: str = "cuda", ignore_index: int = 255,
                channels_last: bool = False):
    """Logits as a network would give them (random, scale 3: losses spread over several octaves; NCHW or
    channels_last) and uint8 labels (the loaders' dtype) with ``IGNORE_FRAC`` of the pixels ignored;
    never zeros."""
    n, c, h, w = shape
    logits = (torch.randn(shape, device=device) * 3).to(dtype)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, c, (n, h, w), device=device, dtype=torch.uint8)
    target[torch.rand(n, h, w, device=device) < IGNORE_FRAC] = ignore_index
    return logits, target


def make_case(provider: str, pass_: str, shape: Sequence[int], dtype: torch.dtype,
              thresh: Optional[float] = None, keep_ratio: float = 0.75, device: str = "cuda",
              channels_last: bool = False) -> Callable:
    """The callable a benchmark times: the loss (``pass_="fwd"``, no grad) or loss + grad_logits via
    autograd.grad (``"fwd_bwd"``), on inputs made once here."""
    logits, target = make_inputs(shape, dtype, device, channels_last=channels_last)
    fn = _provider_fn(provider)
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(logits, target, keep_ratio, thresh)
        return run
    logits.requires_grad_()

    def run_bwd():
        loss = fn(logits, target, keep_ratio, thresh)
        return (loss.detach(),) + torch.autograd.grad(loss, [logits])
    return run_bwd


@needs_cuda
@pytest.mark.benchmark(group="ohem_ce", warmup=False)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("thresh", list(THRESH))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("pass_", PASSES)
def test_ohem_ce(benchmark, pass_, dtype, layout, thresh, provider):
    from conftest import peak_bytes, synced     # bench/conftest.py (bench/ is on sys.path under pytest bench)
    torch.manual_seed(0)
    run = synced(make_case(provider, pass_, SHAPE, DTYPES[dtype], THRESH[thresh],
                           channels_last=layout == "channels_last"))
    for _ in range(3):      # compile (torch.compile, Triton) and warm the allocator outside the timing
        run()
    peak = peak_bytes(run, torch.device("cuda"))
    benchmark.group = f"ohem_ce {pass_} {'x'.join(map(str, SHAPE))} {dtype} {layout} {thresh}"
    benchmark(run)
    backward = pass_ == "fwd_bwd"
    nbytes = bytes_moved(SHAPE, DTYPES[dtype], backward=backward)
    median = benchmark.stats["median"]
    benchmark.extra_info.update(
        provider=provider, bytes_moved=nbytes, fast_path_bytes=fast_path_bytes(SHAPE, DTYPES[dtype], backward=backward),
        gb_per_s=nbytes / median / 1e9, median_ms=median * 1e3, peak_bytes=peak, labels="uint8", layout=layout,
        device=torch.cuda.get_device_name())


# --- optional: the x4 bilinear upsampling fused into the loss ------------------------------------

LOWRES = (4, 19, 219, 219)            # the head's 1/4-resolution logits of an 876 x 876 crop
UP_SIZE = (876, 876)
UP_PROVIDERS = ("reference", "compiled_reference", "fast_unfused", "fast_fused")


def bytes_moved_upsampled(lowres_shape: Sequence[int], size: Sequence[int], logits_dtype: torch.dtype,
                          target_dtype: torch.dtype = torch.uint8, backward: bool = False) -> int:
    """Minimal bytes of upsample + OHEM when fused: the low-resolution logits and the full-size labels
    read once (forward); the backward reads both again and writes the low-resolution gradient. The
    same count is the yardstick for every provider (the unfused ones also write and re-read the
    full-size logits and their gradient: ``bytes_moved`` at full size on top)."""
    n, c, h, w = lowres_shape
    logits = n * c * h * w * _size(logits_dtype)
    labels = n * size[0] * size[1] * _size(target_dtype)
    if not backward:
        return logits + labels
    return 2 * (logits + labels) + logits


def _upsampled_fn(provider: str) -> Callable:
    global _compiled_up_ref
    if provider == "reference":
        return OPS_UP.ohem_cross_entropy_upsampled_ref
    if provider == "compiled_reference":
        if _compiled_up_ref is None:
            _compiled_up_ref = torch.compile(OPS_UP.ohem_cross_entropy_upsampled_ref, dynamic=False)
        return _compiled_up_ref
    if provider == "fast_unfused":
        def unfused(x, t, *args):
            up = torch.nn.functional.interpolate(x, size=tuple(t.shape[-2:]), mode="bilinear", align_corners=False)
            with ops.use_impl("fast"):
                return ops.ohem_cross_entropy(up, t, *args)
        return unfused
    if provider == "fast_fused":
        def fused(*args):
            with ops.use_impl("fast"):
                return OPS_UP.ohem_cross_entropy_upsampled(*args)
        return fused
    raise ValueError(f"unknown provider {provider!r}; expected one of {UP_PROVIDERS}")


_compiled_up_ref = None


def make_upsampled_case(provider: str, pass_: str, lowres_shape: Sequence[int], size: Sequence[int],
                        dtype: torch.dtype, thresh: Optional[float] = None, keep_ratio: float = 0.75,
                        device: str = "cuda") -> Callable:
    """Like ``make_case`` for low-resolution logits upsampled (bilinear) to the labels' ``size``."""
    n, c, _, _ = lowres_shape
    logits = (torch.randn(lowres_shape, device=device) * 3).to(dtype)
    target = torch.randint(0, c, (n,) + tuple(size), device=device, dtype=torch.uint8)
    target[torch.rand(target.shape, device=device) < IGNORE_FRAC] = 255
    fn = _upsampled_fn(provider)
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(logits, target, keep_ratio, thresh)
        return run
    logits.requires_grad_()

    def run_bwd():
        loss = fn(logits, target, keep_ratio, thresh)
        return (loss.detach(),) + torch.autograd.grad(loss, [logits])
    return run_bwd


@needs_cuda
@pytest.mark.benchmark(group="ohem_ce_upsampled", warmup=False)
@pytest.mark.parametrize("provider", UP_PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("pass_", PASSES)
def test_ohem_ce_upsampled(benchmark, pass_, dtype, provider):
    from conftest import peak_bytes, synced     # bench/conftest.py (bench/ is on sys.path under pytest bench)
    torch.manual_seed(0)
    run = synced(make_upsampled_case(provider, pass_, LOWRES, UP_SIZE, DTYPES[dtype]))
    for _ in range(3):
        run()
    peak = peak_bytes(run, torch.device("cuda"))
    benchmark.group = f"ohem_ce_upsampled {pass_} {'x'.join(map(str, LOWRES))}->{UP_SIZE[0]}x{UP_SIZE[1]} {dtype}"
    benchmark(run)
    nbytes = bytes_moved_upsampled(LOWRES, UP_SIZE, DTYPES[dtype], backward=pass_ == "fwd_bwd")
    median = benchmark.stats["median"]
    benchmark.extra_info.update(
        provider=provider, bytes_moved=nbytes, gb_per_s=nbytes / median / 1e9, median_ms=median * 1e3,
        peak_bytes=peak, labels="uint8", device=torch.cuda.get_device_name())


# --- host time per call on the CPU, Triton launches stubbed (issue 13.2) ------------------------------

HOST_SHAPES = {"tiny": (1, 19, 8, 8), "network": SHAPE}
HOST_PROVIDERS = ("reference", "fast", "autograd_floor")


@contextlib.contextmanager
def host_mode():
    """Triton launches stubbed and the fast path's CPU probe satisfied, for the duration only."""
    from ifbf_fast.utils.launches import stub_triton

    importlib.import_module("ifbf_fast.kernels.ohem_ce_upsampled")     # import-time mode left as it is
    kernels = importlib.import_module("ifbf_fast.kernels.ohem_ce")
    saved, saved_flag = os.environ.get("TRITON_INTERPRET"), kernels.INTERPRETER
    os.environ["TRITON_INTERPRET"] = "1"
    kernels.INTERPRETER = True            # the availability probe reads the module's flag
    try:
        with stub_triton():
            yield
    finally:
        kernels.INTERPRETER = saved_flag
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def make_host_case(provider: str, variant: str, shape: Sequence[int]) -> Callable:
    """One fwd+bwd on CPU tensors as a training step issues it (loss, then autograd.grad): ``variant``
    "plain" (logits at ``shape``) or "fused" (logits at 1/4 of it, upsampled inside the loss)."""
    n, c, h, w = shape
    low = (n, c, max(h // 4, 1), max(w // 4, 1))
    logits = (torch.randn(low if variant == "fused" else shape) * 3).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, c, (n, h, w), dtype=torch.uint8)
    if provider == "autograd_floor":      # the engine's own cost: one tiny op and its backward
        leaf = torch.zeros(4, requires_grad=True)

        def floor():
            return torch.autograd.grad(leaf.sum(), [leaf])
        return floor
    op = ops.ohem_cross_entropy_upsampled if variant == "fused" else ops.ohem_cross_entropy
    impl = "reference" if provider == "reference" else "fast"

    def run():
        with ops.use_impl(impl):
            loss = op(logits, target, 0.75, None)
        return torch.autograd.grad(loss, [logits])
    return run


@pytest.mark.benchmark(group="ohem_ce host", warmup=False)
@pytest.mark.parametrize("provider", HOST_PROVIDERS)
@pytest.mark.parametrize("size", list(HOST_SHAPES))
@pytest.mark.parametrize("variant", ["plain", "fused"])
def test_host_ohem_ce(benchmark, variant, size, provider):
    """Host microseconds of one fwd+bwd (min and median in extra_info) and its device launches."""
    from ifbf_fast.utils.launches import count_launches

    if provider == "reference" and size == "network":
        pytest.skip("the reference computes on the CPU: at the network shape that is not host time")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    run = make_host_case(provider, variant, HOST_SHAPES[size])
    with host_mode():
        for _ in range(3):
            run()
        with count_launches(stub_triton=True) as launched:
            run()
        benchmark.group = f"ohem_ce host {variant} {'x'.join(map(str, HOST_SHAPES[size]))}"
        benchmark.pedantic(run, rounds=200, iterations=1, warmup_rounds=5)
    stats = benchmark.stats.stats
    benchmark.extra_info.update(provider=provider, host_us_min=stats.min * 1e6, host_us_median=stats.median * 1e6,
                                launches=launched.total, launches_by_name=dict(launched.by_name),
                                device="cpu (Triton stubbed)")
