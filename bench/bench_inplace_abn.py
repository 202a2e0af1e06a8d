"""InPlace-ABN benchmarks (pytest-benchmark): BatchNorm2d + leaky_relu (cuDNN / ATen), the reference
``inplace_abn_ref``, ``torch.compile(inplace_abn_ref)`` and the fast C++/CUDA path, forward+backward.

    python -m pytest bench/bench_inplace_abn.py --benchmark-columns=median,iqr,rounds

GPU: the ABN layers of ResNet-101 at the training crop 876 x 876, batch 4 (stem 438^2 x 64, layer1
219^2 x 256, layer2 110^2 x 512, layer3 55^2 x 1024, layer4 at output stride 16 55^2 x 2048), bf16 and
fp32, NCHW and channels_last; skipped with a reason where CUDA is absent. CPU: the C++ CPU kernels at
reduced shapes (fp32), so that ``pytest bench/bench_inplace_abn.py`` measures something here in well
under a minute (torch.compile is left out on the CPU: its C++ code generation alone takes longer).

The providers of one case share a benchmark group, so they print side by side. ``extra_info``:
``saved_bytes`` (activation bytes kept for backward, parameters and buffers not counted),
``bytes_moved`` (the minimum traffic of the fused algorithm, the same count for every provider: the
forward reads x twice and writes y, the backward reads y and dy twice and writes dx: 8 x-sizes),
``fast_path_bytes`` (what the CUDA launches move by their bytes model, csrc/inplace_abn_plan.h),
``gb_per_s`` at the median time, and on CUDA ``peak_bytes`` (allocated beyond the inputs).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

from ifbf_fast.ops.inplace_abn import inplace_abn_ref

BATCH = 4
GPU_LAYERS: Dict[str, Tuple[int, int, int]] = {  # name: (C, H, W) at crop 876
    "stem": (64, 438, 438), "layer1": (256, 219, 219), "layer2": (512, 110, 110),
    "layer3": (1024, 55, 55), "layer4": (2048, 55, 55)}
CPU_LAYERS: Dict[str, Tuple[int, int, int]] = {"small": (64, 56, 56), "deep": (256, 14, 14)}
GPU_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("nchw", "channels_last")
GPU_PROVIDERS = ("bn_act", "reference", "compiled_reference", "fast")
CPU_PROVIDERS = ("bn_act", "reference", "fast")
SLOPE, EPS, MOMENTUM = 0.01, 1e-5, 0.1

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the CUDA benchmarks need a CUDA device; none here")


def bytes_moved(n: int, c: int, h: int, w: int, dtype: torch.dtype) -> int:
    """Minimum bytes of fused forward+backward: 3 x-sizes forward, 5 backward (module docstring;
    ``ifbf_fast.ops.inplace_abn.min_bytes``, csrc/inplace_abn_plan.h)."""
    return 8 * n * c * h * w * torch.empty((), dtype=dtype).element_size()


def fast_path_bytes(n: int, c: int, h: int, w: int, dtype: torch.dtype, layout: str) -> int:
    """What the CUDA launches move by their bytes model (partial states and per-channel terms included)."""
    from ifbf_fast.ops.inplace_abn import launch_model
    return sum(m["read"] + m["written"] for m in launch_model((n, c, h, w), dtype, layout == "channels_last"))


def _bn_act(x, w, b, rm, rv):
    return F.leaky_relu(F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS), SLOPE)


def _reference(x, w, b, rm, rv):
    return inplace_abn_ref(x, w, b, rm, rv, True, MOMENTUM, EPS, "leaky_relu", SLOPE)


def _fast(x, w, b, rm, rv):
    from ifbf_fast.ops.inplace_abn import inplace_abn_fast
    return inplace_abn_fast(x, w, b, rm, rv, True, MOMENTUM, EPS, "leaky_relu", SLOPE)


_compiled = None


def provider_fn(provider: str) -> Callable:
    global _compiled
    if provider == "bn_act":
        return _bn_act
    if provider == "reference":
        return _reference
    if provider == "compiled_reference":
        if _compiled is None:
            for name in ("recompile_limit", "cache_size_limit"):  # one static graph per case
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 256)
            _compiled = torch.compile(_reference, dynamic=False)
        return _compiled
    if provider == "fast":
        return _fast
    raise ValueError(f"unknown provider {provider!r}")


def make_case(provider: str, n: int, c: int, h: int, w: int, dtype: torch.dtype, layout: str, device: str):
    """(step, tensors): ``step()`` runs forward+backward once (autograd.grad: nothing accumulates)."""
    fn = provider_fn(provider)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, h, w, device=device, dtype=dtype, generator=gen) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn(x.shape, device=device, dtype=dtype, generator=gen).to(memory_format=(
        torch.channels_last if layout == "channels_last" else torch.contiguous_format))
    # BatchNorm2d under autocast keeps fp32 parameters for low-precision x; cuDNN wants them matched
    pdt = dtype if provider == "bn_act" and device == "cpu" else torch.float32
    wt = (torch.rand(c, device=device, dtype=pdt) + 0.5).requires_grad_(True)
    bt = torch.randn(c, device=device, dtype=pdt).requires_grad_(True)
    rm, rv = torch.zeros(c, device=device, dtype=pdt), torch.ones(c, device=device, dtype=pdt)

    def step():
        y = fn(x, wt, bt, rm, rv)
        return torch.autograd.grad(y, (x, wt, bt), dy)

    return step, (x, wt, bt, rm, rv)


def saved_bytes(provider: str, n, c, h, w, dtype, layout, device) -> int:
    """Activation bytes saved for backward by one call (distinct storages, parameters/buffers excluded)."""
    step, (x, wt, bt, rm, rv) = make_case(provider, n, c, h, w, dtype, layout, device)
    skip = {t.untyped_storage().data_ptr() for t in (wt, bt, rm, rv)}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        provider_fn(provider)(x, wt, bt, rm, rv)
    return sum(seen.values())


def _run(benchmark, provider, name, c, h, w, dtype, layout, device, rounds, warmup):
    n = BATCH if device == "cuda" else 2
    step, _ = make_case(provider, n, c, h, w, dtype, layout, device)
    if device == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
        for _ in range(warmup):
            timed()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        timed()
        benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        timed = step
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    moved = bytes_moved(n, c, h, w, dtype)
    benchmark.extra_info.update({
        "provider": provider, "layer": name, "shape": [n, c, h, w], "dtype": str(dtype), "layout": layout,
        "saved_bytes": saved_bytes(provider, n, c, h, w, dtype, layout, device), "bytes_moved": moved,
        "fast_path_bytes": fast_path_bytes(n, c, h, w, dtype, layout),
        "gb_per_s": moved / benchmark.stats.stats.median / 1e9})


@needs_cuda
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(GPU_DTYPES), ids=list(GPU_DTYPES))
@pytest.mark.parametrize("layer", list(GPU_LAYERS))
def test_gpu_fwd_bwd(benchmark, layer, dtype, layout, provider):
    benchmark.group = f"abn-cuda-{layer}-{dtype}-{layout}"
    c, h, w = GPU_LAYERS[layer]
    _run(benchmark, provider, layer, c, h, w, GPU_DTYPES[dtype], layout, "cuda", rounds=20, warmup=3)


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layer", list(CPU_LAYERS))
def test_cpu_fwd_bwd(benchmark, layer, layout, provider):
    benchmark.group = f"abn-cpu-{layer}-fp32-{layout}"
    c, h, w = CPU_LAYERS[layer]
    _run(benchmark, provider, layer, c, h, w, torch.float32, layout, "cpu", rounds=5, warmup=1)


# --- host cost: the modules at a shape where compute is negligible ------------------------------------

HOST_SHAPE = (2, 16, 8, 8)
HOST_PROVIDERS = ("bn_act_module", "inplace_abn_module")


def _module_step(provider: str):
    """forward+backward of one norm-act module in training (BatchNormAct2d, or InPlaceABN on its fast
    path) at HOST_SHAPE, as a training step calls it: the implementation is chosen once for the run
    (here the default ``auto``), not per call, so no ``use_impl`` context is timed. The InPlaceABN step is
    checked once to take the fast C++ op (and to count BatchNorm2d's counter inside it): a bench of the
    reference by accident raises."""
    from ifbf_fast.nn import BatchNormAct2d, InPlaceABN
    from ifbf_fast.ops import get_impl
    from ifbf_fast.utils.launches import count_launches
    m = (BatchNormAct2d if provider == "bn_act_module" else InPlaceABN)(HOST_SHAPE[1])
    x = torch.randn(HOST_SHAPE, requires_grad=True)
    dy = torch.randn(HOST_SHAPE)
    params = [x] + list(m.parameters())

    def step():
        y = m(x)
        return torch.autograd.grad(y, params, dy)

    if provider == "inplace_abn_module":
        with count_launches() as count:
            step()
        if set(count.by_name) != {"native:ifbf_fast::inplace_abn", "native:ifbf_fast::inplace_abn_backward"}:
            raise RuntimeError(f"bench_inplace_abn: the InPlaceABN module did not take the fast path alone under "
                               f"impl={get_impl()!r} (saw {count}); build ifbf_fast._C and leave IFBF_IMPL unset")
    return step


@pytest.mark.parametrize("provider", HOST_PROVIDERS)
def test_cpu_module_host_time(benchmark, provider):
    """Host time per module fwd+bwd (issue 13.2: InPlaceABN no more than BatchNorm2d + LeakyReLU). Both
    modules' ``host_us`` (utils.launches.host_time_us, minimum of 200) are measured in this same run and
    recorded, with the launch counts. One intra-op thread: at this shape the work is dispatch, and ATen's
    thread pool on a busy machine made BatchNorm2d's CPU kernel wait for a second core (24 ms instead of
    0.14 ms per step on the shared 2-core development machine), which is not host dispatch cost."""
    from ifbf_fast.utils.launches import count_launches, host_time_us
    benchmark.group = "abn-cpu-host-module"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = _module_step(provider)
        benchmark.pedantic(step, rounds=200, warmup_rounds=20, iterations=1)
        host = {p: host_time_us(_module_step(p), repeat=200, warmup=20) for p in HOST_PROVIDERS}
    finally:
        torch.set_num_threads(threads)
    with count_launches() as count:
        step()
    benchmark.extra_info.update({"provider": provider, "shape": list(HOST_SHAPE), "launches": count.total,
                                 "host_us": host[provider], "host_us_same_run": host})
