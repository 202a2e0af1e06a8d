"""Shared set-up of the benchmarks: collection, the device, the card's copy bandwidth, what each result records.

    python -m pytest bench --benchmark-only          # every bench on the device present
    python bench/gpu_report.py                       # the one-command GPU report (GPU.md section 4)

* The bench files are named ``bench_<stem>.py`` (STYLE.md), which pytest's default ``test_*.py`` pattern
  does not collect; ``pytest_collect_file`` below collects them when ``bench`` is passed as a folder
  (``testpaths`` in pyproject.toml stays ``tests``, so a plain ``pytest`` never runs a benchmark).
* Benchmarks time compiled kernels: ``TRITON_INTERPRET`` (which tests/conftest.py sets for the tests)
  must not be on. It is refused with a usage error rather than silently timing the interpreter; run
  ``pytest bench`` on its own, not together with ``tests``.
* On a machine without CUDA the GPU-only benches skip with their reason; the CPU cases run.
* ``copy_bandwidth_gbps()`` measures the present GPU's copy bandwidth once per session (the yardstick
  for "% of bandwidth"); the JSON written by ``--benchmark-json`` gets it in ``machine_info`` and a
  ``pct_of_bandwidth`` next to every result's GB/s (``gb_per_s``; ``gbps`` in older files, whichever the bench
  records), so the older benches need no change.
* The ``perf`` fixture records GB/s, % of bandwidth and peak memory into ``benchmark.extra_info``.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memory_account, importable by the benches

from memory_account import LiveStorages  # noqa: E402

GB = 1e9
# Names of the GB/s entry in extra_info: every bench records "gb_per_s" (and peak memory as "peak_bytes");
# "gbps" is what bench_inplace_abn wrote before, kept readable for older --benchmark-json files.
GBPS_KEYS = ("gb_per_s", "gbps")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_configure(config):
    if _interpreting():
        raise pytest.UsageError(
            "bench: TRITON_INTERPRET is set (tests/conftest.py sets it for the tests, or the shell does); "
            "benchmarks must time compiled kernels: run `pytest bench --benchmark-only` on its own, without "
            "TRITON_INTERPRET")


def pytest_collect_file(file_path, parent):
    # Explicitly named files are collected by pytest itself; collecting them here too would run them twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# --- device and yardsticks ------------------------------------------------------------------------

def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: Optional[torch.device] = None) -> str:
    device = device or bench_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def _cuda_median_seconds(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> Optional[float]:
    """Practical bandwidth of the present GPU: ``dst.copy_(src)`` on ``nbytes`` of random bf16 (read +
    write counted), median of 20 warm runs; ``None`` without CUDA. Cached for the session."""
    if not torch.cuda.is_available():
        return None
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = _cuda_median_seconds(lambda: dst.copy_(src), reps=20)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds / GB


@functools.lru_cache(maxsize=None)
def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """Dense ``n x n`` matmul rate of the present GPU in TFLOP/s (median of 20 warm runs); ``None`` on CPU."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    seconds = _cuda_median_seconds(lambda: a @ b, reps=20)
    return 2 * n ** 3 / seconds / 1e12


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a CUDA synchronisation: what the benches time, so that the time is the work's."""
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory ``fn()`` allocates beyond what was live before: the CUDA allocator's peak on a GPU,
    the peak of live tensor storages (memory_account.LiveStorages) on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    tracker = LiveStorages()
    with tracker:
        fn()
    return tracker.peak


# --- recording --------------------------------------------------------------------------------------

class Perf:
    """``perf.record(benchmark, bytes_moved=..., peak_bytes=..., **extra)`` after ``benchmark(...)``:
    stores median time, GB/s against ``bytes_moved``, % of the measured copy bandwidth (GPU) and the peak."""

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def bandwidth_gbps(self) -> Optional[float]:
        return copy_bandwidth_gbps() if self.device.type == "cuda" else None

    def record(self, benchmark, bytes_moved: Optional[int] = None, peak_bytes: Optional[int] = None, **extra):
        median = benchmark.stats.stats.median
        info = {"device": device_name(self.device), "median_ms": median * 1e3}
        if bytes_moved is not None:
            info["bytes_moved"] = int(bytes_moved)
            info["gb_per_s"] = bytes_moved / median / GB
            if self.bandwidth_gbps:
                info["pct_of_bandwidth"] = 100.0 * info["gb_per_s"] / self.bandwidth_gbps
        if peak_bytes is not None:
            info["peak_bytes"] = int(peak_bytes)
        info.update(extra)
        benchmark.extra_info.update(info)
        return info


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def perf(device) -> Perf:
    return Perf(device)


# --- the JSON written by --benchmark-json -------------------------------------------------------------

def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["bench_device"] = device_name()
    if torch.cuda.is_available():
        machine_info["copy_bandwidth_gbps"] = copy_bandwidth_gbps()
    machine_info["torch"] = torch.__version__


def pytest_benchmark_update_json(config, benchmarks, output_json):
    bw = output_json.get("machine_info", {}).get("copy_bandwidth_gbps")
    if not bw:
        return
    for bench in output_json.get("benchmarks", []):
        info = bench.get("extra_info", {})
        gbps = next((info[k] for k in GBPS_KEYS if k in info), None)
        if gbps is not None and "pct_of_bandwidth" not in info:
            info["pct_of_bandwidth"] = 100.0 * gbps / bw
