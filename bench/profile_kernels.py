"""Where the time of each fast op goes: per-kernel device time, launches and host time per call.

    python bench/profile_kernels.py                     # on a GPU: the benches' network shapes
    python bench/profile_kernels.py --out DIR           # also write DIR/kernel_profile.{json,md}
    python bench/profile_kernels.py --smoke             # tiny CPU cases: checks the pipeline only

The benches (bench/bench_*.py) give one median per provider. This says why: for each case and provider
(the fast path, its reference, and cuDNN's BatchNorm + LeakyReLU next to InPlace-ABN) it records, per
forward+backward call,

* ``wall_ms``: synchronised wall time (the benches' number);
* ``host_ms``: the time until the call returns to Python, the device still running (what the CPU
  spends issuing the work: if it is close to ``wall_ms``, the call is bound by the host, not the GPU);
* ``device_ms`` and ``launches``: the sum of the kernels' device times and their count (torch.profiler);
* ``graph_ms``: the device time by replaying a CUDA graph of the call (no host work between kernels);
* ``counted_launches``: kernels launched per call counted at dispatch (``ifbf_fast.utils.launches``);
* the kernels that take the most device time.

The fast Triton ops run a second time as ``<provider>_triton_launch``: every launch through Triton's
``JITFunction.run`` instead of the launches bound once per plan (``kernels/_launch.py``), so the
host time that binding saves on the card's host shows in the same run.

The callables are the benches' own (``make_case`` of each bench file), on the same shapes, so a row
here explains a row of the results table. ``gpu_report.py`` runs this as its ``kernel_profile``
stage and puts the markdown under the results table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOP_KERNELS = 6


def _cases(device: str, smoke: bool) -> Dict[str, Dict[str, Callable[[], Callable[[], object]]]]:
    """case -> provider -> builder of the step (built lazily: a GPU case allocates its inputs)."""
    import bench_fbf as F
    import bench_inplace_abn as A
    import bench_ohem_ce as O

    bf16 = torch.bfloat16
    if smoke:       # the pipeline on the CPU: reference FBF/OHEM, C++ ABN
        return {
            "fbf tiny": {"reference": lambda: F.make_case("reference", "fwd_bwd", 2, 8, 4, 6, 7, torch.float32,
                                                          device=device)},
            "ohem tiny": {"reference": lambda: O.make_case("reference", "fwd_bwd", (2, 5, 6, 7), torch.float32,
                                                           device=device)},
            "abn tiny": {p: (lambda p=p: A.make_case(p, 2, 8, 6, 7, torch.float32, "nchw", device)[0])
                         for p in ("bn_act", "fast")},
        }
    n, (ch, cl) = F.BATCH, F.FBFS["fbf2"]
    cases: Dict[str, Dict[str, Callable]] = {
        "fbf fbf2 219x219 bf16 nchw": {
            p: (lambda p=p: F.make_case(p, "fwd_bwd", n, ch, cl, 219, 219, bf16, "nchw", device))
            for p in ("reference", "fast")},
        "ohem_ce 4x19x876x876 bf16": {
            p: (lambda p=p: O.make_case(p, "fwd_bwd", O.SHAPE, bf16, device=device)) for p in ("reference", "fast")},
        "ohem_ce 4x19x876x876 bf16 channels_last": {
            p: (lambda p=p: O.make_case(p, "fwd_bwd", O.SHAPE, bf16, device=device, channels_last=True))
            for p in ("reference", "fast")},
        "ohem_ce_upsampled 4x19x219x219->876x876 bf16": {
            p: (lambda p=p: O.make_upsampled_case(p, "fwd_bwd", O.LOWRES, O.UP_SIZE, bf16, device=device))
            for p in ("fast_unfused", "fast_fused")},
    }
    # The fast Triton ops once more with every launch through JITFunction.run: the host time the bound
    # launches of kernels/_launch.py save, on this card's host, in the same run.
    for case, fast in (("fbf fbf2 219x219 bf16 nchw", "fast"), ("ohem_ce 4x19x876x876 bf16", "fast"),
                       ("ohem_ce_upsampled 4x19x219x219->876x876 bf16", "fast_fused")):
        cases[case][f"{fast}_triton_launch"] = _triton_launch_path(cases[case][fast])
    for layer in ("layer1", "layer3"):
        c, h, w = A.GPU_LAYERS[layer]
        cases[f"abn {layer} bf16 channels_last"] = {
            p: (lambda p=p, c=c, h=h, w=w: A.make_case(p, A.BATCH, c, h, w, bf16, "channels_last", device)[0])
            for p in ("bn_act", "fast")}
    return cases


def _triton_launch_path(build: Callable[[], Callable[[], object]]) -> Callable[[], Callable[[], object]]:
    """The builder of ``build``'s step with the bound Triton launches off for the duration of each call."""
    def builder():
        from ifbf_fast.kernels import _launch
        step = build()

        def run():
            _launch.set_enabled(False)
            try:
                return step()
            finally:
                _launch.set_enabled(True)
        return run
    return builder


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _device_time_us(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def graph_replay_ms(step: Callable[[], object], reps: int = 20) -> Optional[float]:
    """Device time of ``step()`` per call by replaying a CUDA graph of it: no host work at all between
    the kernels, so this is what the GPU needs when the host keeps up. ``None`` where ``step`` cannot be
    captured (a host read, a CPU tensor, an allocation the graph pool refuses)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):          # warm-up on a side stream, as torch.cuda.graph requires
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    except Exception:                           # not capturable: the other columns still stand
        torch.cuda.synchronize()
        return None


def counted_launches(step: Callable[[], object]) -> int:
    """Device kernels one call launches, counted at dispatch (ifbf_fast.utils.launches; the same on
    any machine)."""
    from ifbf_fast.utils.launches import count_launches
    with count_launches() as count:
        step()
    return count.total


def profile_step(step: Callable[[], object], device: str, iters: int = 10, warmup: int = 3) -> Dict[str, object]:
    """Wall, host and per-kernel device time of ``step()`` per call (see the module docstring), the
    device time by CUDA-graph replay on a GPU, and the launches counted at dispatch."""
    for _ in range(warmup):
        step()
    counted = counted_launches(step)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    wall = (time.perf_counter() - t0) / iters
    host = []
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        step()
        host.append(time.perf_counter() - t)
    _sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        _sync(device)
    rows = []
    for evt in prof.key_averages():
        on_device = device == "cuda" and evt.device_type == torch.autograd.DeviceType.CUDA
        # On the CPU there are no kernels: the aten ops' own CPU time stands in (the --smoke pipeline).
        us = _device_time_us(evt) if on_device else (float(evt.self_cpu_time_total) if device != "cuda" and
                                                      evt.key.startswith("aten::") else 0.0)
        if us > 0:
            rows.append({"kernel": evt.key, "us_per_call": us / iters, "count_per_call": evt.count / iters})
    rows.sort(key=lambda r: -r["us_per_call"])
    return {"wall_ms": wall * 1e3, "host_ms": sorted(host)[len(host) // 2] * 1e3,
            "device_ms": sum(r["us_per_call"] for r in rows) / 1e3,
            "graph_ms": graph_replay_ms(step) if device == "cuda" else None,
            "launches": sum(r["count_per_call"] for r in rows), "counted_launches": counted,
            "kernels": rows[:TOP_KERNELS]}


def run(device: str, smoke: bool = False, iters: int = 10, only: Optional[List[str]] = None) -> List[Dict[str, object]]:
    results = []
    for case, providers in _cases(device, smoke).items():
        if only and not any(o in case for o in only):
            continue
        for provider, build in providers.items():
            try:
                res = profile_step(build(), device, iters)
            except Exception as exc:          # one broken case must not cost the others their rows
                res = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            results.append(dict(res, case=case, provider=provider))
            if device == "cuda":
                torch.cuda.empty_cache()
    return results


def _short(name: str, width: int = 60) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= width else name[:width - 3] + "..."


def markdown(results: List[Dict[str, object]]) -> str:
    lines = ["| case | provider | wall ms | host ms | device ms | graph ms | launches | counted | "
             "top kernels (us per call) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['provider']} | error: {_short(str(r['error']), 100)} | | | | | | |")
            continue
        top = "; ".join(f"{_short(k['kernel'], 48)} {k['us_per_call']:,.0f}"
                        + (f" x{k['count_per_call']:g}" if k["count_per_call"] != 1 else "")
                        for k in r["kernels"][:3])
        graph = "" if r.get("graph_ms") is None else f"{r['graph_ms']:,.3f}"
        lines.append(f"| {r['case']} | {r['provider']} | {r['wall_ms']:,.3f} | {r['host_ms']:,.3f} | "
                     f"{r['device_ms']:,.3f} | {graph} | {r['launches']:g} | {r.get('counted_launches', '')} | "
                     f"{top} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Per-kernel device time, launches and host time of the fast ops.")
    p.add_argument("--out", type=Path, help="write kernel_profile.json and kernel_profile.md here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU cases (checks the pipeline, measures nothing)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--only", nargs="+", help="cases whose name contains one of these")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        p.error("no CUDA device: the network-shape cases need a GPU (use --smoke to check the pipeline)")
    results = run(device, args.smoke, args.iters, args.only)
    table = markdown(results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_profile.json").write_text(json.dumps({"device": device, "rows": results}, indent=1) + "\n")
        (args.out / "kernel_profile.md").write_text(table + "\n")
    print(table)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
