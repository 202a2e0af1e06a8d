"""Ahead-of-time compile of every FBF kernel configuration the launchers plan, for sm_80 and sm_90.

The specs are derived from the launch plans themselves (``kernels/fbf.py``: ``plan_fwd``/``plan_bwd`` on
meta tensors at the network's shapes and at the shapes that select the other paths), with the
specialisation a real launch gets: integer arguments equal to 1 become constants, arguments divisible by
16 are marked so, pointers are 16-byte aligned (allocator memory). The PTX must show 16-byte vector
accesses (``ld.global.v4`` / ``st.global.v4``) in every layout whose contiguous dimension allows them,
no spills, and few enough registers for the occupancy the launch assumes (``MIN_RESIDENT_WARPS``).
"""
import dataclasses
import importlib
import re

import pytest
import torch

from ifbf_fast.utils.triton_aot import KernelSpec, assert_compiles_cleanly, compile_kernels

K = importlib.import_module("ifbf_fast.kernels.fbf")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TT = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_FP32_PTRS = ("stats_ptr", "scratch_ptr", "gstats_ptr", "w_ptr", "b_ptr", "gw_ptr", "gb_ptr")
# Resident warps per SM the launches rely on (4 x 16 B in flight per thread: 32 KiB per SM at 16 warps),
# so registers per thread must stay <= 65536 / (16 * 32) = 128.
MIN_RESIDENT_WARPS = 16


def _meta(shape, dtype, layout):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _layout_inputs(layout, dtype):
    """(high, low, grad_out) for each layout the launchers distinguish."""
    n, ch, cl = 4, 256, 128
    if layout == "nchw":                       # 256 x 512: everything divisible by 16
        h, w = 256, 512
    elif layout in ("nchw_odd_hw", "channels_last"):   # 219 x 219: rows start unaligned
        h, w = 219, 219
    elif layout == "nchw_short_hw":
        h, w = 9, 9
    elif layout == "nchw_sliced_c":            # every other channel: hw contiguous, channels not dense
        high = torch.empty(n, 2 * ch, 64, 64, dtype=dtype, device="meta")[:, ::2]
        low = torch.empty(n, 2 * cl, 64, 64, dtype=dtype, device="meta")[:, ::2]
        return high, low, _meta((n, ch + cl, 64, 64), dtype, "nchw")
    elif layout == "generic":                  # h and w do not collapse
        high = torch.empty(n, ch, 20, 40, dtype=dtype, device="meta")[:, :, :, ::2]
        low = torch.empty(n, cl, 20, 40, dtype=dtype, device="meta")[:, :, :, ::2]
        return high, low, _meta((n, ch + cl, 20, 20), dtype, "nchw")
    mk = "channels_last" if layout == "channels_last" else "nchw"
    return _meta((n, ch, h, w), dtype, mk), _meta((n, cl, h, w), dtype, mk), _meta((n, ch + cl, h, w), dtype, mk)


LAYOUTS = {"nchw": "rows", "nchw_odd_hw": "rows", "nchw_sliced_c": "hw_major", "channels_last": "c_major",
           "nchw_short_hw": "c_major", "generic": "c_major"}
VECTORISED = ("nchw", "nchw_odd_hw", "nchw_sliced_c", "channels_last")


def _spec(launch, dtype, pointer_dtypes):
    kernel = K._fbf_reduce_kernel if launch.name == "reduce" else K._fbf_scale_kernel
    names = list(kernel.arg_names)
    n_ptr = sum(a.endswith("_ptr") for a in names)
    values = dict(zip(names[n_ptr:], launch.args))
    const_names = {a for a in names[n_ptr:] if a.isupper() and not a.startswith(("N", "C0", "C1", "HW", "W",
                                                                                   "SPLITS", "BLOCKS_PER"))}
    sig, const, div = {}, {}, []
    for a in names:
        if a.endswith("_ptr"):
            sig[a] = pointer_dtypes.get(a, "*fp32" if a in _FP32_PTRS else _TT[dtype])
            div.append(a)
        elif a in const_names:
            sig[a], const[a] = "constexpr", values[a]
        elif values[a] == 1:                    # Triton specialises integer arguments equal to 1
            sig[a], const[a] = "constexpr", 1
        else:
            sig[a] = "i32"
            if values[a] % 16 == 0:
                div.append(a)
    return KernelSpec(K.__name__, kernel.__name__, sig, const, tuple(div), num_warps=launch.num_warps)


def aot_specs():
    """(name, KernelSpec, Launch) for every kernel x dtype x layout x direction the launchers plan."""
    specs = []
    for dname, dtype in DTYPES.items():
        for layout, path in LAYOUTS.items():
            high, low, grad = _layout_inputs(layout, dtype)
            weight = torch.empty(384, 384, 1, 1, device="meta")
            for direction, plan in (("fwd", K.plan_fwd(high, low, weight, -1)),
                                    ("bwd", K.plan_bwd(grad, high, low, weight, -1))):
                assert plan.reduce.path == path, (layout, plan.reduce)
                for launch in (plan.reduce, plan.scale):
                    ptrs = {"counter_ptr": "*i32"}
                    specs.append((f"{direction}_{launch.name}/{dname}/{layout}/{launch.path}",
                                  _spec(launch, dtype, ptrs), launch))
    assert {launch.path for _, _, launch in specs} == set(K.BLOCK_CONFIGS)
    return specs


def test_size_arguments_of_one_compile():
    """On a GPU, Triton turns an integer argument equal to 1 into a compile-time constant (a plain Python
    int inside the kernel), so a method call on it such as ``C1.to(tl.int64)`` fails to compile for a
    part with one channel. Compile every kernel and layout with each size argument set to the constant 1
    (found on an H200 with triton 3.6; the interpreter never specialises)."""
    base = [(name, s) for name, s, _ in aot_specs() if "/float32/" in name]
    specs = []
    for name, spec in base:
        for size in ("N", "C0", "C1", "HW", "SPLITS"):
            if spec.signature.get(size) != "i32":
                continue
            sig, const = dict(spec.signature), dict(spec.constexprs)
            sig[size], const[size] = "constexpr", 1
            div = tuple(a for a in spec.divisible_by_16 if a != size)
            specs.append((f"{name} {size}=1", dataclasses.replace(spec, signature=sig, constexprs=const,
                                                                   divisible_by_16=div)))
    assert len(specs) >= 3 * len(base)
    results = compile_kernels([s for _, s in specs], archs=(90,))
    for (name, _), per_arch in zip(specs, results):
        assert per_arch and ".entry" in per_arch[0].ptx, name


def _loop_bodies(ptx: str):
    """The PTX between each loop label and its backward branch (the hot loops)."""
    bodies = []
    for m in re.finditer(r"^\$(L__BB\d+_\d+):", ptx, re.M):
        label = m.group(1)
        back = re.search(rf"bra(\.uni)?\s+\${label};", ptx[m.end():])
        if back:
            bodies.append(ptx[m.end():m.end() + back.start()])
    return bodies


@pytest.fixture(scope="module")
def compiled():
    """(specs, results) of every configuration compiled for sm_80 and sm_90, once per module."""
    specs = aot_specs()
    return specs, compile_kernels([dataclasses.replace(s, sass_archs=(90,)) if name.split("/")[2] in VECTORISED
                                   else s for name, s, _ in specs])


def _known_spill(name, r):
    """Triton 3.6's ptxas (not 3.7's or 3.8's) keeps one 64-bit pointer of the backward scale's
    parameter-gradient epilogue (``_param_grads``, the kernel's only loop; the scale itself is one tile
    per program) on the stack for sm_80 in fp16 / bf16 channels_last: 8-16 bytes at 32 registers.
    Not on sm_90; held to that size."""
    import triton
    return (triton.__version__.startswith("3.6.") and r.arch == 80 and name.startswith("bwd_scale/")
            and name.endswith("/channels_last/c_major") and "/float32/" not in name)


def test_every_kernel_configuration_compiles_vectorised_for_sm80_and_sm90(compiled):
    specs, results = compiled
    lines, failures = [], []
    for (name, _, launch), per_arch in zip(specs, results):
        assert [r.arch for r in per_arch] == [80, 90]
        assert_compiles_cleanly([r for r in per_arch if not _known_spill(name, r)])   # no spills, shared memory
        for r in per_arch:                                                              # within the card's
            if _known_spill(name, r):
                assert_compiles_cleanly([dataclasses.replace(r, spill_stores=0, spill_loads=0)])
                assert r.spill_stores <= 16 and r.spill_loads <= 16, f"{name} sm_80: {r.spills} B of spills"
        layout = name.split("/")[2]
        for r in per_arch:
            lines.append(f"{name:40s} sm_{r.arch} warps {r.num_warps} regs {r.registers:3d} spills {r.spills}")
            if r.registers > 65536 // (MIN_RESIDENT_WARPS * 32):
                failures.append(f"{name} sm_{r.arch}: {r.registers} registers cap residency below "
                                f"{MIN_RESIDENT_WARPS} warps per SM")
            if layout not in VECTORISED:
                continue
            # The hot loop of the reduce (the loop holding its x-sized loads) and the scale's body must
            # use 16-byte accesses; the reduce's scalar epilogue sits outside its loops.
            if launch.name == "reduce":
                hot = [b for b in _loop_bodies(r.ptx) if "ld.global" in b and "atom" not in b]
                vec = [b for b in hot if re.search(r"ld\.global(\.\w+)*\.v4", b)]
                if not vec:
                    failures.append(f"{name} sm_{r.arch}: no 16-byte loads in any hot loop")
            else:
                if not re.search(r"ld\.global(\.\w+)*\.v4", r.ptx) or not re.search(r"st\.global(\.\w+)*\.v4",
                                                                                     r.ptx):
                    failures.append(f"{name} sm_{r.arch}: scale without 16-byte loads and stores")
    print("\n".join(lines))
    assert not failures, "\n".join(failures)


def _h200_grid(name):
    """The H200's grid for the launch ``name`` (direction_kernel/dtype/layout/path) at its AOT shapes."""
    direction_kernel, dname, layout, _ = name.split("/")
    direction, kernel = direction_kernel.split("_")
    dtype = DTYPES[dname]
    high, low, grad = _layout_inputs(layout, dtype)
    weight = torch.empty(384, 384, 1, 1, device="meta")
    plan = K.plan_fwd(high, low, weight, 0) if direction == "fwd" else K.plan_bwd(grad, high, low, weight, 0)
    return getattr(plan, kernel).grid


def test_hot_kernels_keep_enough_bytes_in_flight_on_an_h200(compiled, monkeypatch):
    """Little's law from the compiled code: every vectorised reduce and scale keeps at least the H200's
    share of 3 MB per SM in flight (ifbf_fast.utils.sass): resident blocks (ptxas registers, warps, the
    H200 grid) x threads x the 16-byte loads each thread issues before it uses the first (SASS)."""
    from ifbf_fast.utils import sass
    if not sass.cuobjdump_path():
        pytest.skip("no cuobjdump (it ships with triton under backends/nvidia/bin)")
    monkeypatch.setattr(K, "_SM_COUNT", {0: K.SM_COUNT_H200})
    specs, results = compiled
    need = sass.H200_BYTES_IN_FLIGHT // sass.H200_SMS
    lines, short = [], []
    for (name, _, launch), per_arch in zip(specs, results):
        if name.split("/")[2] not in VECTORISED:
            continue
        r = next(r for r in per_arch if r.arch == 90)
        grid = _h200_grid(name)
        got = sass.bytes_in_flight_per_sm(r.num_warps, r.registers, r.loads_in_flight, grid, r.shared)
        lines.append(f"{name:45s} regs {r.registers:3d} warps {r.num_warps} loads in flight {r.loads_in_flight} "
                     f"grid {grid:6d}: {got / 1024:5.1f} KiB per SM")
        if got < need:
            short.append(lines[-1])
    print("\n".join(lines))
    assert not short, f"below {need / 1024:.1f} KiB per SM:\n" + "\n".join(short)
