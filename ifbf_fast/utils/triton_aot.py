"""Ahead-of-time compilation of Triton kernels for real GPU targets, without a GPU.

Under ``TRITON_INTERPRET=1`` (set by the tests) ``@triton.jit`` yields interpreter objects that cannot
be compiled, so :func:`compile_kernels` then compiles in one child process started without it, naming
each kernel by module and attribute.

Used by the tests (docs/DESIGN.md section 7): every kernel configuration that the launchers use is
compiled for sm_80 (A100) and sm_90 (H100/H200) so that type errors, shared-memory overflows and
register spills are caught on machines that have no GPU. ``ptxas -v`` (shipped inside the triton
package) reports registers and spills; the PTX shows whether global loads were vectorised, and the
cubin's SASS (``cuobjdump``, also shipped with triton) how many of them each thread keeps in flight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, Mapping, Optional, Sequence

from .sass import cuobjdump_path, disassemble, loads_in_flight

ARCHS = (80, 90)
# Shared memory a block may use (opt-in maximum): A100 163 KiB, H100 227 KiB.
MAX_SHARED = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclasses.dataclass
class AotResult:
    """What one compilation of one kernel configuration for one architecture produced."""

    kernel: str
    arch: int
    shared: int           # bytes of shared memory per block
    num_warps: int
    registers: int        # per thread, from ptxas -v
    spill_stores: int     # bytes, from ptxas -v
    spill_loads: int
    vector_loads: bool    # ld.global.v2 / v4 present in the PTX
    ptx: str
    sass: str = ""        # cuobjdump -sass of the cubin ("" where cuobjdump is absent)

    @property
    def loads_in_flight(self) -> int:
        """16-byte global loads each thread issues before it uses the first (ifbf_fast.utils.sass)."""
        return loads_in_flight(self.sass)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def ptxas_path() -> str:
    import triton.backends.nvidia as nv
    path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"ptxas not found at {path} (it ships inside the triton package)")
    return path


def ptxas_report(ptx: str) -> tuple:
    """(registers, spill store bytes, spill load bytes) of the PTX's kernel, from ``ptxas -v``."""
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas_path(), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{proc.stderr}")
    text = proc.stderr + proc.stdout
    regs = max((int(m) for m in re.findall(r"Used (\d+) registers", text)), default=0)
    stores = sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", text))
    loads = sum(int(m) for m in re.findall(r"(\d+) bytes spill loads", text))
    return regs, stores, loads


def compile_kernel(fn, signature: Mapping[str, str], constexprs: Optional[Mapping[str, object]] = None,
                   archs: Iterable[int] = ARCHS, divisible_by_16: Sequence[str] = (),
                   num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                   sass_archs: Iterable[int] = (), maxnreg: Optional[int] = None) -> list:
    """Compile ``fn`` (a ``@triton.jit`` function, or an autotuned/heuristics wrapper of one) once per arch.

    ``signature`` maps every argument name to its Triton type (``"*fp32"``, ``"*bf16"``, ``"i32"``,
    ``"i64"``, ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the values of the constexpr ones;
    ``divisible_by_16`` names the arguments a real launch would mark as divisible by 16 (pointers
    from the caching allocator, sizes that are multiples of 16), which enables vectorised accesses.
    ``sass_archs``: the archs whose cubin is disassembled into ``AotResult.sass`` (about half a second
    per kernel, so only where a test reads it). ``maxnreg``: the register cap a launch passes (PTX
    ``.maxnreg``; ptxas -v then reports within it).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = fn
    while not hasattr(jit_fn, "arg_names") and hasattr(jit_fn, "fn"):  # unwrap autotune/heuristics
        jit_fn = jit_fn.fn
    names = list(jit_fn.arg_names)
    missing = [n for n in names if n not in signature]
    if missing:
        raise ValueError(f"compile_kernel({jit_fn.__name__}): signature lacks {missing}")
    attrs: Dict[tuple, list] = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible_by_16}
    src = ASTSource(fn=jit_fn, signature=dict(signature), constexprs=dict(constexprs or {}), attrs=attrs)
    options = {}
    if num_warps is not None:
        options["num_warps"] = num_warps
    if num_stages is not None:
        options["num_stages"] = num_stages
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    results = []
    for arch in archs:
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = ck.asm["ptx"]
        regs, stores, loads = ptxas_report(ptx)
        sass = disassemble(ck.asm["cubin"]) if arch in sass_archs and cuobjdump_path() else ""
        results.append(AotResult(kernel=jit_fn.__name__, arch=arch, shared=int(ck.metadata.shared),
                                 num_warps=int(ck.metadata.num_warps), registers=regs, spill_stores=stores,
                                 spill_loads=loads, vector_loads=bool(re.search(r"ld\.global(\.\w+)*\.v[24]", ptx)),
                                 ptx=ptx, sass=sass))
    return results


def assert_compiles_cleanly(results: Iterable[AotResult]) -> None:
    """Fail on shared-memory overflow or register spills, naming the kernel, arch and numbers."""
    for r in results:
        limit = MAX_SHARED.get(r.arch, 48 * 1024)
        if r.shared > limit:
            raise AssertionError(f"{r.kernel} sm_{r.arch}: {r.shared} B shared memory > {limit} B")
        if r.spills:
            raise AssertionError(f"{r.kernel} sm_{r.arch}: register spills ({r.spill_stores} B stores, "
                                 f"{r.spill_loads} B loads) at {r.registers} registers, {r.num_warps} warps")


@dataclasses.dataclass
class KernelSpec:
    """One kernel configuration to compile: ``module:attr`` of a ``@triton.jit`` kernel and its launch."""

    module: str
    attr: str
    signature: Mapping[str, str]
    constexprs: Mapping[str, object] = dataclasses.field(default_factory=dict)
    divisible_by_16: Sequence[str] = ()
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    sass_archs: Sequence[int] = ()   # disassemble the cubins of these archs (AotResult.sass)
    maxnreg: Optional[int] = None    # the launch's register cap (PlannedLaunch option), if any


def _compile_specs_here(specs: Sequence[KernelSpec], archs: Sequence[int]) -> list:
    import importlib
    out = []
    for spec in specs:
        fn = getattr(importlib.import_module(spec.module), spec.attr)
        out.append(compile_kernel(fn, spec.signature, spec.constexprs, archs, spec.divisible_by_16,
                                  spec.num_warps, spec.num_stages, spec.sass_archs, spec.maxnreg))
    return out


def compile_kernels(specs: Sequence[KernelSpec], archs: Sequence[int] = ARCHS) -> list:
    """Compile every spec for every arch; returns one list of :class:`AotResult` per spec.

    In a child process without ``TRITON_INTERPRET`` when the interpreter is on here.
    """
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return _compile_specs_here(specs, archs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps({"archs": list(archs), "specs": [dataclasses.asdict(s) for s in specs]})
    proc = subprocess.run([sys.executable, "-m", "ifbf_fast.utils.triton_aot"], input=payload,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"ahead-of-time compile failed:\n{proc.stderr[-6000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [[AotResult(**r) for r in per_spec] for per_spec in rows]


def _main() -> None:
    req = json.loads(sys.stdin.read())
    specs = [KernelSpec(**s) for s in req["specs"]]
    results = _compile_specs_here(specs, req["archs"])
    print(json.dumps([[dataclasses.asdict(r) for r in per_spec] for per_spec in results]))


if __name__ == "__main__":
    _main()
