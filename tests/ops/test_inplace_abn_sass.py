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
from collections import Counter

import pytest
import torch

A = importlib.import_module("ifbf_fast.ops.inplace_abn")   # the module (ifbf_fast.ops.inplace_abn is also the op)

_C = pytest.importorskip("ifbf_fast._C")

KERNELS = ("reduce_ncs", "reduce_nsc", "map_ncs", "map_nsc")
FUNCTORS = {"StatsRed": 1, "BackwardRed": 2, "ForwardMap": 1, "BackwardMap": 2}   # tensors read
DTYPES = {"BFloat16": 2, "Half": 2, "float": 4}
REGISTERS_PER_SM = 65536
THREADS = 256


def _cuobjdump():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def _run(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=300).stdout


@pytest.fixture(scope="module")
def sm90():
    """{mangled kernel name: (Counter of SASS opcodes, resource usage dict)} of the sm_90 code."""
    tool = _cuobjdump()
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
            ops[name.strip()] = Counter(re.findall(r"\b((?:LDG|STG|LDL|STL)(?:\.[A-Z0-9]+)*)", body))
            bodies[name.strip()] = body
    _BODIES.clear()
    _BODIES.update(bodies)
    return {name: (ops[name], usage.get(name, {})) for name in ops}


_BODIES = {}   # mangled name -> the function's SASS text, filled by the sm90 fixture with the rest
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def loads_in_flight(sass: str) -> int:
    """The most 128-bit global loads (LDG.*.128) issued back to back before an instruction reads one of
    their destination registers (4 per load) or uses one as an address: how many 16-byte loads each
    thread has in flight at once, in program order."""
    pending, count, best = set(), 0, 0
    for m in _INSTRUCTION.finditer(sass):
        op, operands = m.group(1), m.group(2).split(",")
        is_load = op.startswith("LDG") and ".128" in op
        # sources: every register operand, except the destination of an instruction that writes one
        first = 0 if op.startswith("ST") else 1
        sources = set()
        for text in operands[first:]:
            for reg, wide in re.findall(r"\bR(\d+)(\.64)?", text):
                sources.update((int(reg), int(reg) + 1) if wide else (int(reg),))
        if pending and sources & pending:
            best, pending, count = max(best, count), set(), 0
        if is_load:
            dest = int(re.match(r"\s*R(\d+)", operands[0]).group(1))
            pending |= set(range(dest, dest + 4))
            count += 1
    return max(best, count)


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
    for name, (ops, usage) in sm90.items():
        parsed = _parse(name)
        if parsed and parsed[0] in KERNELS and parsed[3] * DTYPES[parsed[2]] == 16:
            found[name] = (parsed, ops, usage)
    return found


def test_every_kernel_family_has_vectorised_code(sm90):
    seen = {(k, f, d) for (k, f, d, _), _, _ in _vectorised(sm90).values()}
    want = {(k, f, d) for k in KERNELS for f in FUNCTORS for d in DTYPES
            if (f.endswith("Red")) == k.startswith("reduce")}
    assert want <= seen, sorted(want - seen)


def test_hot_loops_use_128_bit_accesses(sm90):
    bad = []
    for name, ((kernel, functor, dtype, vec), ops, _) in _vectorised(sm90).items():
        tensors = FUNCTORS[functor]
        ldg = sum(n for op, n in ops.items() if op.startswith("LDG") and ".128" in op)
        stg = sum(n for op, n in ops.items() if op.startswith("STG") and ".128" in op)
        if ldg < 4 or (kernel.startswith("map") and stg < 4 // tensors):
            bad.append((kernel, functor, dtype, ldg, stg, name))
    assert not bad, bad


def test_no_spills_and_registers_fit_the_planned_occupancy(sm90):
    per_sm = _blocks_per_sm()
    bad = []
    for name, (ops, usage) in sm90.items():
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
    for name, ((kernel, functor, dtype, _vec), _ops, _usage) in _vectorised(sm90).items():
        seen[(kernel, functor, dtype)].append(loads_in_flight(_BODIES[name]))
    bad = {k: v for k, v in seen.items() if min(v) < 4}
    assert seen and not bad, bad


def test_loads_in_flight_reads_the_dependences():
    """The SASS reader counts loads up to their first use: load-use pairs give 1, a batch gives 4."""
    def ins(i, text):
        return f"        /*{i * 16:04x}*/                   {text} ;\n"
    batched = "".join(ins(i, f"LDG.E.128.CONSTANT R{12 + 4 * i}, desc[UR6][R2.64+0x{i * 512:x}]") for i in range(4))
    batched += ins(4, "PRMT R6, R12, 0x7632, R6") + ins(5, "FFMA R7, R16, R9, R10")
    assert loads_in_flight(batched) == 4
    serial = "".join(ins(2 * i, f"LDG.E.128 R12, desc[UR6][R2.64+0x{i * 512:x}]")
                     + ins(2 * i + 1, "FADD R40, R40, R13") for i in range(4))
    assert loads_in_flight(serial) == 1
    chased = ins(0, "LDG.E.128 R12, desc[UR6][R2.64]") + ins(1, "LDG.E.128 R16, desc[UR6][R12.64]")
    assert loads_in_flight(chased) == 1
