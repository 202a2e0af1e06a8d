"""Reading compiled GPU code (SASS) on a machine without a GPU.

``cuobjdump`` ships inside the triton package (``backends/nvidia/bin``); it disassembles the sm_90 code
of the built extension (tests/ops/test_inplace_abn_sass.py) and the cubins that Triton compiles ahead of
time (``ifbf_fast.utils.triton_aot``). :func:`loads_in_flight` reads from that code how many 16-byte
global loads each thread issues before it needs the first of them: the work in flight that a
memory-bound kernel needs to reach the card's bandwidth, which the launch plans assume (4 per thread).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from typing import Optional

_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def cuobjdump_path() -> Optional[str]:
    """The cuobjdump that ships with triton, else one on PATH, else None."""
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def disassemble(cubin: bytes) -> str:
    """The SASS text of one cubin (``cuobjdump -sass``)."""
    tool = cuobjdump_path()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (it ships with triton under backends/nvidia/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-sass", path], check=True, capture_output=True, text=True,
                              timeout=300).stdout


def memory_opcodes(sass: str) -> Counter:
    """Counter of the global and local memory instructions (LDG, STG, LDL, STL with their modifiers,
    e.g. ``LDG.E.128``) in SASS text: one per instruction in the code, not per execution."""
    ops = (m.group(1) for m in _INSTRUCTION.finditer(sass))
    return Counter(op for op in ops if op.startswith(("LDG", "STG", "LDL", "STL")))


_ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][^;]*);")
_BRANCH_TARGET = re.compile(r"\bBRA\s+(?:`\([^)]*\)\s*)?0x([0-9a-f]+)")


def _addressed(sass: str) -> list:
    """(address, instruction text) of each instruction of SASS text, in program order."""
    return [(int(m.group(1), 16), m.group(2).strip()) for m in _ADDRESS.finditer(sass)]


def instructions(sass: str) -> list:
    """The instructions (text, predicate included) of SASS text in program order, without the NOPs
    that pad a kernel's end (and the branch-to-self after its EXIT)."""
    code = _addressed(sass)
    last_exit = max((i for i, (_, t) in enumerate(code) if re.search(r"\bEXIT\b", t)), default=len(code) - 1)
    return [t for _, t in code[:last_exit + 1] if not t.startswith("NOP")]


def loop_bodies(sass: str) -> list:
    """The instructions (text, predicate included) of every loop in SASS text: from the target of
    each backward branch to the branch, in program order. One list per backward branch."""
    code = _addressed(sass)
    loops = []
    for addr, text in code:
        m = _BRANCH_TARGET.search(text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            loops.append([t for a, t in code if start <= a <= addr])
    return loops


def loads_in_flight(sass: str) -> int:
    """The most 128-bit global loads (LDG.*.128) issued back to back, in program order, before an
    instruction reads one of their destination registers (4 per load) or uses one as an address: how
    many 16-byte loads each thread keeps in flight at once."""
    pending, count, best = set(), 0, 0
    for m in _INSTRUCTION.finditer(sass):
        op, operands = m.group(1), m.group(2).split(",")
        # sources: every register operand, except the destination of an instruction that writes one
        first = 0 if op.startswith("ST") else 1
        sources = set()
        for text in operands[first:]:
            for reg, wide in re.findall(r"\bR(\d+)(\.64)?", text):
                sources.update((int(reg), int(reg) + 1) if wide else (int(reg),))
        if pending and sources & pending:
            best, pending, count = max(best, count), set(), 0
        if op.startswith("LDG") and ".128" in op:
            dest = int(re.match(r"\s*R(\d+)", operands[0]).group(1))
            pending |= set(range(dest, dest + 4))
            count += 1
    return max(best, count)


# sm_90 (H100 / H200) per-SM limits, and the bytes a memory-bound kernel needs in flight on an H200:
# about 3 MB over the card (its 4.2 TB/s copy bandwidth times a loaded DRAM latency near 0.7 us;
# csrc/inplace_abn_plan.h), i.e. 22.7 KB per SM of the 132.
SM90_LIMITS = {"warps": 64, "blocks": 32, "registers": 65536, "shared": 228 * 1024, "shared_per_block": 1024}
H200_SMS = 132
H200_BYTES_IN_FLIGHT = 3_000_000


def resident_blocks(num_warps: int, registers: int, shared: int = 0, limits: dict = SM90_LIMITS) -> int:
    """Blocks of ``num_warps`` warps an SM holds at once, from the warp, block, register (allocated per
    warp in units of 256, 8 per thread) and shared-memory limits."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (limits["registers"] // per_warp) // num_warps
    by_shared = limits["shared"] // (shared + limits["shared_per_block"]) if shared else limits["blocks"]
    return max(0, min(limits["blocks"], limits["warps"] // num_warps, by_regs, by_shared))


def bytes_in_flight_per_sm(num_warps: int, registers: int, loads_in_flight: int, programs: int,
                           shared: int = 0, sms: int = H200_SMS) -> int:
    """16-byte loads outstanding on one SM at once (Little's law's side of the bandwidth): the resident
    blocks (no more than the grid gives each SM) times their threads times each thread's loads in flight."""
    blocks = min(resident_blocks(num_warps, registers, shared), -(-programs // sms))
    return blocks * num_warps * 32 * loads_in_flight * 16
