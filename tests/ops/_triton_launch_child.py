"""Run by tests/ops/test_triton_launch.py in a fresh process without TRITON_INTERPRET: the package's
compiled Triton kernels launch on CPU tensors through Triton's real CUDA launcher over the stand-in
libcuda (ifbf_fast/utils/fake_cuda.py), once by Triton's own path and once by the bound launches of
kernels/_launch.py, and every launch is compared. Prints one JSON object (read by the test).

Nothing runs on a device: the stand-in records what the launcher hands the driver.
"""

from __future__ import annotations

import json
import os
import struct
import sys

os.environ.pop("TRITON_INTERPRET", None)

_FMT = {"i1": "<B", "u1": "<B", "i8": "<b", "u8": "<B", "i16": "<h", "u16": "<H", "i32": "<i", "u32": "<I",
        "i64": "<q", "u64": "<Q", "fp32": "<f", "f32": "<f", "fp64": "<d", "f64": "<d"}


def _driver_params(entry) -> list:
    """The values the driver received, one per non-constexpr argument (pointers as integers)."""
    data = entry["driver"]["params"]
    out, off = [], 0
    for ty in entry["types"]:
        if ty == "constexpr":
            continue
        fmt = "<Q" if ty.startswith("*") else _FMT[ty]
        size = struct.calcsize(fmt)
        out.append(struct.unpack_from(fmt, data, off)[0])
        off += size
    return out


def _expected_params(entry) -> list:
    """What the driver should have received for the arguments of the launcher call."""
    import torch
    out = []
    for ty, a in zip(entry["types"], entry["call"]["args"]):
        if ty == "constexpr":
            continue
        if isinstance(a, torch.Tensor):
            out.append(a.data_ptr())
        elif ty in ("fp32", "f32"):
            out.append(struct.unpack("<f", struct.pack("<f", a))[0])
        else:
            out.append(int(a))
    return out


def _describe(a):
    import torch
    if isinstance(a, torch.Tensor):
        return ("tensor", str(a.dtype), tuple(a.shape), tuple(a.stride()), a.data_ptr() & 15)
    return (type(a).__name__, a)


def _compare(ref: list, got: list) -> list:
    """Differences between Triton's launches (``ref``) and the bound ones (``got``), as strings."""
    problems = []
    if len(ref) != len(got):
        return [f"{len(ref)} launches by Triton's path, {len(got)} bound"]
    for i, (r, g) in enumerate(zip(ref, got)):
        rc, gc = r["call"], g["call"]
        if rc["head"] != gc["head"] or rc["packed"] != gc["packed"]:
            problems.append(f"launch {i}: grid/stream/function/flags/metadata {rc['head']} {rc['packed']} != "
                            f"{gc['head']} {gc['packed']}")
        if gc["metadata"] is not None or gc["hooks"] != (None, None):
            problems.append(f"launch {i}: the bound launch passed launch metadata or hooks")
        for hook in rc["hooks"]:
            if hook is not None and getattr(hook, "calls", None):
                problems.append(f"launch {i}: Triton's path had launch hooks registered")
        if rc["scratch"] != (None, None) or gc["scratch"] != (None, None):
            problems.append(f"launch {i}: scratch buffers passed")
        if rc["annotations"] is not gc["annotations"] or rc["signature"] != gc["signature"]:
            problems.append(f"launch {i}: argument annotations or kernel signature differ")
        ra, ga = rc["args"], gc["args"]
        if len(ra) != len(ga) or len(ra) != len(r["types"]):
            problems.append(f"launch {i}: {len(ra)} arguments by Triton's path, {len(ga)} bound, "
                            f"{len(r['types'])} in the signature")
            continue
        for j, (x, y) in enumerate(zip(ra, ga)):
            if _describe(x) != _describe(y):
                problems.append(f"launch {i} argument {j}: {_describe(x)} != {_describe(y)}")
        rd, gd = r["driver"], g["driver"]
        for field in ("grid", "block", "shared", "function", "stream"):
            if rd[field] != gd[field]:
                problems.append(f"launch {i}: driver {field} {rd[field]} != {gd[field]}")
        for label, e in (("Triton's path", r), ("bound", g)):
            if _driver_params(e) != _expected_params(e):
                problems.append(f"launch {i} ({label}): the driver's parameters {_driver_params(e)} are not "
                                f"the call's {_expected_params(e)}")
    return problems


def main() -> None:
    import torch
    from ifbf_fast.utils.fake_cuda import fake_cuda

    report = {}
    with fake_cuda(log=True) as fc:
        from triton.runtime import jit
        from ifbf_fast.kernels import _launch, fbf, ohem_ce, ohem_ce_upsampled

        report["supported"] = _launch.SUPPORTED
        triton_runs = [0]
        original = jit.JITFunction.run

        def counted(self, *args, **kwargs):
            triton_runs[0] += 1
            return original(self, *args, **kwargs)

        jit.JITFunction.run = counted
        torch.manual_seed(0)

        def fbf_case(dtype, channels_last, grad_stats, offset=0):
            n, c0, c1, h, w = 2, 24, 40, 9, 7
            base_h = torch.randn(n * c0 * h * w + offset, dtype=dtype)
            high = base_h[offset:].view(n, c0, h, w)
            low = torch.randn(n, c1, h, w, dtype=dtype)
            if channels_last:
                high = high.contiguous(memory_format=torch.channels_last)
                low = low.contiguous(memory_format=torch.channels_last)
            weight = torch.randn(c0 + c1, c0 + c1)
            bias = torch.randn(c0 + c1)
            gs = torch.randn(2, n, c0 + c1) if grad_stats else None

            def run():
                out, stats, plans = fbf.fwd(high, low, weight, bias, True)
                fbf.bwd(torch.ones_like(out), high, low, weight, stats, gs, bias.dtype, plans)
            return run

        def ohem_case(dtype, keep, upsampled=False):
            n, c, h, w = 2, 19, 12, 10
            if upsampled:
                logits = torch.randn(n, c, h // 2, w // 2, dtype=dtype)
            else:
                logits = torch.randn(n, c, h, w, dtype=dtype)
            target = torch.randint(0, c, (n, h, w), dtype=torch.uint8)
            fwd, bwd = ((ohem_ce_upsampled.ohem_ce_up_fwd, ohem_ce_upsampled.ohem_ce_up_bwd) if upsampled
                        else (ohem_ce.ohem_ce_fwd, ohem_ce.ohem_ce_bwd))

            def run():
                loss, losses, state, _bad = fwd(logits, target, keep[0], 0.7, 255)
                bwd(torch.ones((), dtype=torch.float32), logits, target, losses, state)
            return run

        def ohem_x4_case(dtype):
            # the x4 backward with the sm_90 register cap in its launch options (maxnreg), as on an H200
            n, c, h, w = 2, 19, 16, 12
            logits = torch.randn(n, c, h // 4, w // 4, dtype=dtype)
            target = torch.randint(0, c, (n, h, w), dtype=torch.uint8)
            assert ohem_ce_upsampled.backward_x4((h // 4, w // 4), (h, w), c, dtype, 90)["maxnreg"]

            def run():
                arch, ohem_ce_upsampled._arch = ohem_ce_upsampled._arch, lambda t: 90
                try:
                    _loss, losses, state, _bad = ohem_ce_upsampled.ohem_ce_up_fwd(logits, target, 0.75, 0.7, 255)
                    ohem_ce_upsampled.ohem_ce_up_bwd(torch.ones((), dtype=torch.float32), logits, target, losses,
                                                     state)
                finally:
                    ohem_ce_upsampled._arch = arch
                plans = [m[-1] for m in ohem_ce_upsampled._UP_BWD_META.values()
                         if m[-1].kernel is ohem_ce_upsampled._ohem_ce_up_bwd_x4_kernel]
                assert plans and all(p.opts.get("maxnreg") for p in plans), "the x4 plan lost its register cap"
            return run

        keep = [0.75]
        cases = {
            "fbf_nchw_bf16": fbf_case(torch.bfloat16, False, False),
            "fbf_channels_last_fp32_grad_stats": fbf_case(torch.float32, True, True),
            "fbf_unaligned_fp16": fbf_case(torch.float16, False, False, offset=3),
            "ohem_bf16": ohem_case(torch.bfloat16, keep),
            "ohem_up_fp16": ohem_case(torch.float16, keep, upsampled=True),
            "ohem_up_x4_bf16_maxnreg": ohem_x4_case(torch.bfloat16),
        }
        for name, run in cases.items():
            _launch.set_enabled(False)
            fc.log.clear()
            triton_runs[0] = 0
            run()
            ref, ref_runs = list(fc.log), triton_runs[0]
            _launch.set_enabled(True)
            _launch.clear()
            triton_runs[0] = 0
            run()                             # binds (through Triton's path)
            bind_runs = triton_runs[0]
            fc.log.clear()
            triton_runs[0] = 0
            run()
            got, got_runs = list(fc.log), triton_runs[0]
            report[name] = {"launches": len(ref), "triton_runs": ref_runs, "bind_runs": bind_runs,
                            "bound_runs": got_runs, "problems": _compare(ref, got)}

        # One plan, inputs whose alignment changes from call to call (a view 3 fp16 elements in is not
        # 16-byte aligned, 8 elements in is): Triton specialises on it, so must the bound launches.
        aligned, misaligned, realigned = (fbf_case(torch.float16, False, False, offset=k) for k in (0, 3, 8))
        _launch.clear()
        aligned()
        steps = {}
        for label, run in (("aligned", aligned), ("misaligned", misaligned), ("misaligned_again", misaligned),
                           ("realigned", realigned), ("aligned_again", aligned)):
            triton_runs[0] = 0
            fc.log.clear()
            run()
            steps[label] = {"triton_runs": triton_runs[0],
                            "functions": [e["driver"]["function"] for e in fc.log]}
        _launch.set_enabled(False)
        for label, run in (("misaligned_by_triton", misaligned), ("aligned_by_triton", aligned)):
            fc.log.clear()
            run()
            steps[label] = {"functions": [e["driver"]["function"] for e in fc.log]}
        _launch.set_enabled(True)
        report["alignment"] = steps

        # A launch hook (what a profiler registers) sends every launch through Triton's path, so the hook
        # sees each one; removed, the bound launches resume.
        from triton import knobs
        seen = []
        hook = seen.append
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            triton_runs[0] = 0
            cases["fbf_nchw_bf16"]()
            hooked = {"triton_runs": triton_runs[0], "hook_calls": len(seen)}
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        cases["fbf_nchw_bf16"]()              # binds (nothing was bound while the hook was there)
        triton_runs[0] = 0
        cases["fbf_nchw_bf16"]()
        hooked["after_removal_runs"] = triton_runs[0]
        report["hooks"] = hooked

        # A per-call scalar that changes (the keep ratio's bits): a new binding, then bound again.
        run = cases["ohem_bf16"]
        keep[0] = 0.5
        triton_runs[0] = 0
        fc.log.clear()
        run()
        first = triton_runs[0]
        triton_runs[0] = 0
        run()
        report["ohem_new_keep_ratio"] = {"first_runs": first, "second_runs": triton_runs[0],
                                         "launches": len(fc.log)}

        # The network's shapes (IFBFNet-R101, crop 876, batch 4, bf16) with the H200's launch plans (the
        # FBF reduce splits for 132 SMs): every launch compiles, loads and is accepted by the driver.
        fbf._target_programs = lambda device_index: fbf.REDUCE_PROGRAMS_PER_SM * fbf.SM_COUNT_H200
        fbf._PLANS.clear()
        network = {}

        def attempt(name, fn, expected, planned=None):
            launched, refused = fc.launches, fc.refused
            fc.log.clear()
            try:
                fn()
                error = None
            except Exception as exc:      # reported, not raised: the test names the case
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
            network[name] = {"launches": fc.launches - launched, "refused": fc.refused - refused,
                             "expected": expected, "error": error,
                             # (programs, threads per program) as the driver received them, and as planned
                             "driver": [[e["driver"]["grid"][0] * e["driver"]["grid"][1] * e["driver"]["grid"][2],
                                         e["driver"]["block"][0]] for e in fc.log],
                             "planned": planned}

        for fbf_name, (ch, cl) in {"fbf1": (256, 64), "fbf2": (256, 128)}.items():
            for layout in ("nchw", "channels_last"):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                high = torch.empty(4, ch, 219, 219, dtype=torch.bfloat16, memory_format=fmt)
                low = torch.empty(4, cl, 219, 219, dtype=torch.bfloat16, memory_format=fmt)
                weight, bias = torch.zeros(ch + cl, ch + cl, 1, 1), torch.zeros(ch + cl)
                grad = torch.empty(4, ch + cl, 219, 219, dtype=torch.bfloat16, memory_format=fmt)

                def run(high=high, low=low, weight=weight, bias=bias, grad=grad):
                    out, stats, plans = fbf.fwd(high, low, weight, bias, True)
                    fbf.bwd(grad, high, low, weight, stats, None, bias.dtype, plans)
                pf = fbf.plan_fwd(high, low, weight, device_index=0)
                pb = fbf.plan_bwd(grad, high, low, weight, device_index=0)
                planned = [[lc.grid, 32 * lc.num_warps] for lc in (pf.reduce, pf.scale, pb.reduce, pb.scale)]
                attempt(f"{fbf_name}_{layout}_219", run, 4, planned)
        target = torch.zeros(4, 876, 876, dtype=torch.uint8)
        one = torch.ones((), dtype=torch.float32)
        for variant, shape, fwd, bwd in (
                ("plain", (4, 19, 876, 876), ohem_ce.ohem_ce_fwd, ohem_ce.ohem_ce_bwd),
                ("fused", (4, 19, 219, 219), ohem_ce_upsampled.ohem_ce_up_fwd, ohem_ce_upsampled.ohem_ce_up_bwd)):
            logits = torch.empty(shape, dtype=torch.bfloat16)

            def run(logits=logits, fwd=fwd, bwd=bwd):
                _loss, losses, state, _bad = fwd(logits, target, 0.75, -1.0, 255)
                bwd(one, logits, target, losses, state)
            attempt(f"ohem_{variant}_876", run, 3)

        # The stand-in refuses what the driver would: a grid beyond 65,535 in y.
        bad = _launch.PlannedLaunch(fbf._fbf_scale_kernel, (1, 70000), 8, {"num_warps": 4})
        last = cases["fbf_nchw_bf16"]
        fc.log.clear()
        last()
        args = fc.log[-1]["call"]["args"]
        attempt("grid_y_70000", lambda: bad(tuple(args)), 0)
        report["network"] = network

        # The launch counter pauses the bound launches: every launch goes through its patched run.
        from ifbf_fast.utils.launches import count_launches
        with count_launches() as count:
            cases["fbf_nchw_bf16"]()
        report["counted"] = count.triton
        jit.JITFunction.run = original
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
