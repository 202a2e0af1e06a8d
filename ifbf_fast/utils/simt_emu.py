"""InPlace-ABN's CUDA kernels run on the CPU: the CUDA sources compiled against a SIMT emulator.

Triton kernels have an interpreter (``TRITON_INTERPRET=1``); the CUDA kernels of ``csrc/`` had only
their compilers: nvcc builds them and the SASS tests read the result, but nothing ran them without a GPU.
:func:`load` compiles the very sources the CUDA build uses (``csrc/inplace_abn_{statistics,forward,
backward_reduce,backward_dx}.cu`` with ``inplace_abn_launch.cuh`` and ``inplace_abn_kernels.cuh``) as
C++ with ``IFBF_SIMT_EMU`` defined, against ``csrc/simt/simt_emu.h``: a launch runs every block of its
grid on the CPU, the block's threads as fibers that meet at ``__syncthreads`` and at warp shuffles.
The launchers plan their grids exactly as on a GPU (for an H200's 132 SMs unless ``set_sms`` says
otherwise), choose the same vector widths from the same pointer alignments, and launch the same kernel
instantiations; the emulator checks the launch limits, every 16-byte access's alignment, and that every
shuffle and barrier is reached by all the threads that must reach it. The module
(``csrc/simt/abn_module.cpp``) exposes the ``abn_cuda::*_cuda`` entry points with the arguments
``csrc/inplace_abn.cpp`` passes them.

It needs the source tree (an editable install or a checkout) and a C++ compiler; the build takes about
a minute on two cores and is cached by source digest (``IFBF_SIMT_DIR``, default
``<tmp>/ifbf_simt``). What it cannot show: speed, memory-ordering races between barriers, and the
``--use_fast_math`` arithmetic of nvcc (the CPU rounds as IEEE; tests compare with tolerances).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Optional

ACT = {"leaky_relu": 0, "elu": 1, "identity": 2}   # ifbf::Act (csrc/inplace_abn_common.h)

_UNITS = ("statistics", "forward", "backward_reduce", "backward_dx")
_FLAGS = ["-O2", "-g0", "-DIFBF_WITH_CUDA=1", "-DIFBF_SIMT_EMU=1"]
_module: Optional[ModuleType] = None


def csrc_dir() -> Path:
    """The ``csrc`` folder of the source tree this package was installed from."""
    here = Path(__file__).resolve().parents[2] / "csrc"
    if not (here / "simt" / "simt_emu.h").exists():
        raise RuntimeError(f"simt_emu: the CUDA sources are not here ({here}); the emulator needs the "
                           "source tree (pip install -e . from a checkout)")
    return here


def unavailable() -> Optional[str]:
    """Why the emulator cannot be built here (no source tree, no C++ compiler), or None. A build that
    fails for any other reason is an error of the sources, not a missing tool."""
    try:
        csrc_dir()
    except RuntimeError as e:
        return str(e)
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        return "simt_emu: no C++ compiler (c++ or g++)"
    return None


def _digest(csrc: Path) -> str:
    import torch
    h = hashlib.sha256(" ".join(_FLAGS + [torch.__version__]).encode())
    for path in sorted(csrc.glob("*.h")) + sorted(csrc.glob("*.cuh")) + sorted(csrc.glob("*.cu")) \
            + sorted((csrc / "simt").glob("*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def load(verbose: bool = False) -> ModuleType:
    """Build (once per source digest) and import the emulated CUDA InPlace-ABN module."""
    global _module
    if _module is not None:
        return _module
    from torch.utils import cpp_extension

    csrc = csrc_dir()
    digest = _digest(csrc)
    root = os.environ.get("IFBF_SIMT_DIR") or os.path.join(tempfile.gettempdir(), "ifbf_simt")
    build = os.path.join(root, digest)
    os.makedirs(build, exist_ok=True)
    sources = [str(csrc / "simt" / "abn_module.cpp")]
    for unit in _UNITS:
        # A C++ unit per CUDA unit (torch would hand a .cu to nvcc): the same file, included.
        wrapper = os.path.join(build, f"emu_{unit}.cpp")
        text = f'#include "{csrc / f"inplace_abn_{unit}.cu"}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        sources.append(wrapper)
    _module = cpp_extension.load(name=f"ifbf_abn_simt_{digest}", sources=sources, extra_cflags=_FLAGS,
                                 extra_include_paths=[str(csrc)], build_directory=build, verbose=verbose)
    return _module
