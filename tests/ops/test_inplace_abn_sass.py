"""InPlace-ABN's CUDA kernels read ahead of time in the extension's sm_90 SASS (no GPU needed).

``cuobjdump`` (shipped inside the triton package) disassembles the sm_90 code of the built
``ifbf_fast._C`` once per session; for every vectorised instantiation (16-byte accesses: fp32, fp16,
bf16) of the reduce and map kernels in both layouts, every activation and both index widths, the tests
fail on a scalar hot loop (fewer 128-bit global loads than the 4 the kernel issues per thread, or, for a
map, fewer 128-bit stores than its accesses per tensor), on local-memory spills (STL/LDL, LOCAL > 0), and
on a register count above what the blocks per SM of its launch plan allow (csrc/inplace_abn_plan.h,
blocks_per_sm: the waves the launch-configuration tests assume), and on fewer than plan::kLoads = 4
128-bit loads in flight per thread: issued before the first instruction that reads any of their results
(the work in flight that test_inplace_abn_bytes.py assumes from the plans, read here from the code).

Skips, saying why, when the extension holds no sm_90 code: built where nvcc was absent (or with
IFBF_BUILD_CUDA=0); CI builds it wherever nvcc exists.
"""
import importlib
import os
import re
import shutil
import subprocess

import pytest
import torch

from ifbf_fast.utils.sass import cuobjdump_path, loads_in_flight, memory_opcodes

A = importlib.import_module("ifbf_fast.ops.inplace_abn")   # the module (ifbf_fast.ops.inplace_abn is also the op)

_C = pytest.importorskip("ifbf_fast._C")

KERNELS = ("reduce_ncs", "reduce_nsc", "map_ncs", "map_nsc")
FUNCTORS = {"StatsRed": 1, "BackwardRed": 2, "ForwardMap": 1, "BackwardMap": 2}   # tensors read
DTYPES = {"BFloat16": 2, "Half": 2, "float": 4}
REGISTERS_PER_SM = 65536
THREADS = 256


def _run(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=300).stdout


@pytest.fixture(scope="module")
def sm90():
    """{mangled kernel name: (Counter of SASS opcodes, resource usage dict, SASS text)} of the sm_90 code."""
    tool = cuobjdump_path()
    if tool is None:
        pytest.skip("no cuobjdump (it ships with triton under backends/nvidia/bin)")
    so = _C.__file__
    if "sm_90" not in _run(tool, "-lelf", so):
        nvcc = shutil.which("nvcc")
        pytest.skip(f"{os.path.basename(so)} holds no sm_90 CUDA code: "
                    + ("nvcc is absent, so the CUDA kernels were not built" if nvcc is None else
                       f"it was built without its CUDA kernels although nvcc is at {nvcc} "
                       "(IFBF_BUILD_CUDA=0?); rebuild with pip install --no-build-isolation -e ."))
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", _run(tool, "-arch", "sm_90", "-res-usage", so)):
        usage[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", fields)}
    ops, bodies = {}, {}
    for block in re.split(r"\n\s*Function : ", _run(tool, "-arch", "sm_90", "-sass", so))[1:]:
        name, body = block.split("\n", 1)
        if "ifbf" in name:
            ops[name.strip()] = memory_opcodes(body)
            bodies[name.strip()] = body
    return {name: (ops[name], usage.get(name, {}), bodies[name]) for name in ops}


def _blocks_per_sm():
    kinds = {}
    for cl in (False, True):
        for m in A.launch_model((2, 64, 9, 9), torch.float32, cl):
            kinds[m["kind"]] = m["blocks_per_sm"]
    return kinds


def _parse(name):
    kernel = re.search(r"(reduce_ncs|reduce_nsc|map_ncs|map_nsc|combine)_kernel", name)
    if kernel is None:
        return None
    functor = re.search("|".join(FUNCTORS), name)
    dtype = next((d for d in ("BFloat16", "Half") if d in name), "float")
    vec = re.search(r"Li(\d+)E", name)
    return kernel.group(1), functor.group(0) if functor else None, dtype, int(vec.group(1)) if vec else None


def _vectorised(sm90):
    found = {}
    for name, (ops, usage, body) in sm90.items():
        parsed = _parse(name)
        if parsed and parsed[0] in KERNELS and parsed[3] * DTYPES[parsed[2]] == 16:
            found[name] = (parsed, ops, usage, body)
    return found


def test_every_kernel_family_has_vectorised_code(sm90):
    seen = {(k, f, d) for (k, f, d, _), _, _, _ in _vectorised(sm90).values()}
    want = {(k, f, d) for k in KERNELS for f in FUNCTORS for d in DTYPES
            if (f.endswith("Red")) == k.startswith("reduce")}
    assert want <= seen, sorted(want - seen)


def test_hot_loops_use_128_bit_accesses(sm90):
    bad = []
    for name, ((kernel, functor, dtype, vec), ops, _, _) in _vectorised(sm90).items():
        tensors = FUNCTORS[functor]
        ldg = sum(n for op, n in ops.items() if op.startswith("LDG") and ".128" in op)
        stg = sum(n for op, n in ops.items() if op.startswith("STG") and ".128" in op)
        if ldg < 4 or (kernel.startswith("map") and stg < 4 // tensors):
            bad.append((kernel, functor, dtype, ldg, stg, name))
    assert not bad, bad


def test_no_spills_and_registers_fit_the_planned_occupancy(sm90):
    per_sm = _blocks_per_sm()
    bad = []
    for name, (ops, usage, _body) in sm90.items():
        parsed = _parse(name)
        if parsed is None:
            continue
        kernel = parsed[0]
        cap = REGISTERS_PER_SM // (THREADS * per_sm[kernel])
        spills = sum(n for op, n in ops.items() if op[:3] in ("STL", "LDL"))
        if spills or usage.get("LOCAL", 0) or usage.get("REG", 0) > cap:
            bad.append((kernel, parsed[1], parsed[2], usage.get("REG"), cap, usage.get("LOCAL"), spills))
    assert not bad, bad


def test_hot_loops_keep_four_loads_in_flight(sm90):
    """Every vectorised reduce and map issues plan::kLoads = 4 independent 16-byte loads (4 of x, or 2
    each of y and dy) before it uses the first: the compiler kept the unrolled loads together."""
    from collections import defaultdict
    seen = defaultdict(list)
    for (kernel, functor, dtype, _vec), _ops, _usage, body in _vectorised(sm90).values():
        seen[(kernel, functor, dtype)].append(loads_in_flight(body))
    bad = {k: v for k, v in seen.items() if min(v) < 4}
    assert seen and not bad, bad


# launch_model's phase names -> (kernel family, functor) of the instantiations it launches
PHASES = {"statistics_reduce": "StatsRed", "backward_reduce": "BackwardRed", "forward_map": "ForwardMap",
          "backward_map": "BackwardMap"}


def test_network_launches_keep_enough_bytes_in_flight_on_an_h200(sm90):
    """Little's law from the compiled code (ifbf_fast.utils.sass), at every InPlace-ABN of the network
    (test_inplace_abn_bytes.py NETWORK, batches 2 and 4, both layouts, bf16 and fp32): the resident blocks
    of the vectorised kernel (its SASS registers, the grid the plan gives each SM) x 256 threads x the
    16-byte loads each thread has in flight keep at least the H200's share of 3 MB per SM."""
    from ifbf_fast.utils import sass
    from .test_inplace_abn_bytes import BATCHES, NETWORK
    families = {}
    for (kernel, functor, dtype, _vec), _ops, usage, body in _vectorised(sm90).values():
        f = families.setdefault((kernel, functor, dtype), {"regs": 0, "loads": 99})
        f["regs"] = max(f["regs"], usage.get("REG", 0))
        f["loads"] = min(f["loads"], loads_in_flight(body))
    need = sass.H200_BYTES_IN_FLIGHT // sass.H200_SMS
    short, worst = [], None
    for label, (c, side) in NETWORK.items():
        for batch in BATCHES:
            for channels_last in (False, True):
                for dtype, dname in ((torch.bfloat16, "BFloat16"), (torch.float32, "float")):
                    for m in A.launch_model((batch, c, side, side), dtype, channels_last):
                        if m["name"] not in PHASES or m["vec"] * (2 if dname == "BFloat16" else 4) != 16:
                            continue
                        kernel = ("reduce" if "reduce" in m["name"] else "map") + ("_nsc" if channels_last else "_ncs")
                        f = families[(kernel, PHASES[m["name"]], dname)]
                        programs = m["grid"][0] * m["grid"][1]
                        threads = m["block"][0] * m["block"][1]
                        got = sass.bytes_in_flight_per_sm(threads // 32, f["regs"], f["loads"], programs)
                        row = (got, f"{label} x{batch} {'nhwc' if channels_last else 'nchw'} {dname} {m['name']}: "
                                    f"{programs} programs, {f['regs']} registers, {f['loads']} loads in flight, "
                                    f"{got / 1024:.1f} KiB per SM")
                        worst = min(worst, row) if worst else row
                        if got < need:
                            short.append(row[1])
    print(f"\nleast in flight: {worst[1]}")
    assert not short, f"below {need / 1024:.1f} KiB per SM:\n" + "\n".join(short)
