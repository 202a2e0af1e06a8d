"""Triton's real CUDA launch path on a machine without a GPU, over a stand-in libcuda.

The host cost of a Triton launch on a GPU machine is mostly Python and C work before the driver call:
binding and specialising the arguments, the cache lookup, launch metadata, and the C launcher packing
each argument. :func:`ifbf_fast.utils.launches.stub_triton` replaces ``JITFunction.run`` as a whole and so
hides all of it. :func:`fake_cuda` keeps everything of Triton's and replaces only the CUDA driver:

* a stand-in ``libcuda.so.1`` (the C source below, built with the system C compiler into a cache
  folder) whose every entry point that Triton's launcher calls succeeds without doing anything, except
  ``cuLaunchKernelEx``, which refuses a launch outside an H200's limits (grid, threads per block,
  shared memory) as the driver would, counts the launch and can record it: grid, block, shared
  memory, function, stream and the bytes of every kernel parameter;
* a Triton driver object with an sm_90 target on device 0 (an H200's properties), which builds Triton's
  real ``cuda_utils`` launcher module against the stand-in and uses Triton's ``CudaLauncher``.

Inside the block, kernels imported without ``TRITON_INTERPRET`` compile for sm_90 (ptxas ships with
Triton) and launch on CPU tensors: their host pointers travel to the stand-in driver, which never
dereferences them. Nothing runs on a device and no output is written. What is measured is the host
side of a launch exactly as a GPU machine runs it, minus the driver's own ``cuLaunchKernelEx`` (a few
µs on a real GPU, the same for every launch path). The tests use it to prove that
``ifbf_fast.kernels._launch`` passes the driver the same bytes as Triton, and the benches to time
launches host-side (``bench/bench_launch.py``).

The kernel modules must be imported inside a process where ``TRITON_INTERPRET`` was never set (a
subprocess under the test suite), since ``@triton.jit`` decides at import whether it builds interpreter
objects. Use it in a process of its own, on a machine without a GPU: the stand-in library stays loaded
(as ``libcuda.so.1``) after the block, so that process cannot reach a real driver any more.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Iterator, List, Optional

_C_SOURCE = r"""
/* A stand-in libcuda.so.1: every driver call Triton's launcher makes succeeds and does nothing;
 * cuLaunchKernelEx counts the launch and, while recording, copies it (the parameter sizes come from
 * Python, from the kernel's signature). */
#include <cuda.h>
#include <stdint.h>
#include <string.h>

#define MAX_PARAM_BYTES 2048
typedef struct {
  unsigned grid[3], block[3], shared;
  uint64_t function, stream;
  unsigned n_bytes;
  unsigned char params[MAX_PARAM_BYTES];
} fake_launch_t;

static fake_launch_t last_launch;
static unsigned long long n_launches = 0;
static unsigned param_sizes[256];
static unsigned n_param_sizes = 0;
static int recording = 0;

void fake_cuda_record(int on, unsigned n, const unsigned *sizes) {
  recording = on;
  n_param_sizes = n < 256 ? n : 256;
  for (unsigned i = 0; i < n_param_sizes; ++i) param_sizes[i] = sizes[i];
}
unsigned long long fake_cuda_launches(void) { return n_launches; }
const fake_launch_t *fake_cuda_last(void) { return &last_launch; }

/* An H200's launch limits: a launch outside them fails as the real driver's would. */
static unsigned long long n_refused = 0;
unsigned long long fake_cuda_refused(void) { return n_refused; }

CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
  unsigned long long threads = (unsigned long long)config->blockDimX * config->blockDimY * config->blockDimZ;
  if (config->gridDimX == 0 || config->gridDimY == 0 || config->gridDimZ == 0 ||
      config->gridDimX > 2147483647u || config->gridDimY > 65535u || config->gridDimZ > 65535u ||
      threads == 0 || threads > 1024 || config->blockDimZ > 64 || config->sharedMemBytes > 232448u) {
    ++n_refused;
    return CUDA_ERROR_INVALID_VALUE;
  }
  ++n_launches;
  if (recording) {
    last_launch.grid[0] = config->gridDimX; last_launch.grid[1] = config->gridDimY;
    last_launch.grid[2] = config->gridDimZ;
    last_launch.block[0] = config->blockDimX; last_launch.block[1] = config->blockDimY;
    last_launch.block[2] = config->blockDimZ;
    last_launch.shared = config->sharedMemBytes;
    last_launch.function = (uint64_t)(uintptr_t)f;
    last_launch.stream = (uint64_t)(uintptr_t)config->hStream;
    unsigned off = 0;
    for (unsigned i = 0; i < n_param_sizes && off + param_sizes[i] <= MAX_PARAM_BYTES; ++i) {
      memcpy(last_launch.params + off, params[i], param_sizes[i]);
      off += param_sizes[i];
    }
    last_launch.n_bytes = off;
  }
  return CUDA_SUCCESS;
}

static int fake_ctx;
CUresult cuCtxGetCurrent(CUcontext *pctx) { *pctx = (CUcontext)&fake_ctx; return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext ctx) { return CUDA_SUCCESS; }
CUresult cuCtxGetDevice(CUdevice *d) { *d = 0; return CUDA_SUCCESS; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) { *d = ordinal; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice d) { *pctx = (CUcontext)&fake_ctx; return CUDA_SUCCESS; }
CUresult cuCtxGetLimit(size_t *v, CUlimit l) { *v = 0; return CUDA_SUCCESS; }
CUresult cuCtxSetLimit(CUlimit l, size_t v) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return CUDA_SUCCESS; }
CUresult cuGetErrorString(CUresult e, const char **s) {
  *s = e == CUDA_ERROR_INVALID_VALUE ? "stand-in libcuda: launch outside an H200's grid, block or shared-memory limits"
                                     : "stand-in libcuda error";
  return CUDA_SUCCESS;
}
CUresult cuPointerGetAttribute(void *data, CUpointer_attribute a, CUdeviceptr p) {
  if (a == CU_POINTER_ATTRIBUTE_DEVICE_POINTER) *(CUdeviceptr *)data = p;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int *v, CUdevice_attribute a, CUdevice d) {
  switch (a) {  /* an H200: sm_90, 132 SMs */
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = 132; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = 232448; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = 49152; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *v = 233472; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *v = 65536; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: *v = 65536; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *v = 1980000; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *v = 2619000; break;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *v = 6144; break;
    default: *v = 1; break;
  }
  return CUDA_SUCCESS;
}
/* Each loaded module gets its own handle, and its function the handle + 8: launches of different
 * compiled kernels (or specialisations) name different functions. */
static uintptr_t next_module = 0x10000;
CUresult cuModuleLoadData(CUmodule *m, const void *image) {
  next_module += 16; *m = (CUmodule)next_module; return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule m) { return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
  *f = (CUfunction)((uintptr_t)m + 8); return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int *v, CUfunction_attribute a, CUfunction f) {
  switch (a) {
    case CU_FUNC_ATTRIBUTE_NUM_REGS: *v = 32; break;
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
    default: *v = 0; break;
  }
  return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) { return CUDA_SUCCESS; }
CUresult cuFuncSetCacheConfig(CUfunction f, CUfunc_cache c) { return CUDA_SUCCESS; }
CUresult cuOccupancyMaxActiveClusters(int *n, CUfunction f, const CUlaunchConfig *c) { *n = 1; return CUDA_SUCCESS; }
CUresult cuTensorMapEncodeTiled(CUtensorMap *t, CUtensorMapDataType d, cuuint32_t r, void *g,
                                const cuuint64_t *s, const cuuint64_t *st, const cuuint32_t *b,
                                const cuuint32_t *es, CUtensorMapInterleave i, CUtensorMapSwizzle sw,
                                CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill f) { return CUDA_SUCCESS; }
CUresult cuTensorMapEncodeIm2col(CUtensorMap *t, CUtensorMapDataType d, cuuint32_t r, void *g,
                                 const cuuint64_t *s, const cuuint64_t *st, const int *lo, const int *hi,
                                 cuuint32_t c, cuuint32_t pc, const cuuint32_t *es, CUtensorMapInterleave i,
                                 CUtensorMapSwizzle sw, CUtensorMapL2promotion l2,
                                 CUtensorMapFloatOOBfill f) { return CUDA_SUCCESS; }
"""

_MAX_PARAM_BYTES = 2048


class _Launch(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("function", ctypes.c_uint64), ("stream", ctypes.c_uint64), ("n_bytes", ctypes.c_uint),
                ("params", ctypes.c_ubyte * _MAX_PARAM_BYTES)]


# bytes of one kernel parameter by Triton signature type
_PARAM_SIZE = {"i1": 1, "u1": 1, "i8": 1, "u8": 1, "i16": 2, "u16": 2, "fp16": 2, "bf16": 2, "i32": 4, "u32": 4,
               "fp32": 4, "f32": 4, "i64": 8, "u64": 8, "fp64": 8, "f64": 8}


def param_sizes(signature: dict) -> List[int]:
    """Bytes of each parameter the launcher hands the driver for a kernel of this Triton signature
    (``CompiledKernel.src.signature``): constexprs take none; the two scratch pointers follow."""
    sizes = []
    for ty in signature.values():
        if ty == "constexpr":
            continue
        sizes.append(8 if ty.startswith("*") else _PARAM_SIZE[ty])
    return sizes + [8, 8]


class FakeCuda:
    """The stand-in driver while :func:`fake_cuda` is active.

    ``launches`` counts ``cuLaunchKernelEx`` calls. With ``fake_cuda(log=True)``, ``log`` lists every
    launch: what Triton's C launcher was called with (``"call"``, by field: see ``_normalised``), what
    it handed the driver (``"driver"``: grid, block, shared memory,
    function, stream and the parameter bytes) and the kernel's Triton signature types (``"types"``, one
    per argument, ``"constexpr"`` for those the launcher skips).
    """

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        lib.fake_cuda_launches.restype = ctypes.c_ulonglong
        lib.fake_cuda_refused.restype = ctypes.c_ulonglong
        lib.fake_cuda_last.restype = ctypes.POINTER(_Launch)
        self.log: list = []

    @property
    def launches(self) -> int:
        return int(self._lib.fake_cuda_launches())

    @property
    def refused(self) -> int:
        """Launches refused for being outside an H200's limits (grid, threads per block, shared memory)."""
        return int(self._lib.fake_cuda_refused())

    def record(self, sizes: Optional[List[int]]) -> None:
        """Copy the parameters of every later launch (``sizes``: bytes per parameter), or stop (None)."""
        if sizes is None:
            self._lib.fake_cuda_record(0, 0, None)
        else:
            arr = (ctypes.c_uint * len(sizes))(*sizes)
            self._lib.fake_cuda_record(1, len(sizes), arr)

    def last(self) -> dict:
        rec = self._lib.fake_cuda_last().contents
        return {"grid": tuple(rec.grid), "block": tuple(rec.block), "shared": rec.shared,
                "function": rec.function, "stream": rec.stream, "params": bytes(rec.params[:rec.n_bytes])}


def _build_dir() -> str:
    digest = hashlib.sha256(_C_SOURCE.encode()).hexdigest()[:16]
    root = os.environ.get("IFBF_FAKE_CUDA_DIR") or os.path.join(tempfile.gettempdir(), "ifbf_fake_cuda")
    return os.path.join(root, digest)


def build_libcuda() -> str:
    """Build the stand-in ``libcuda.so.1`` once (with ``cc`` and the ``cuda.h`` that ships with Triton);
    returns its folder."""
    out_dir = _build_dir()
    lib = os.path.join(out_dir, "libcuda.so.1")
    if os.path.exists(lib):
        return out_dir
    import triton.backends.nvidia as nv
    include = os.path.join(os.path.dirname(nv.__file__), "include")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("fake_cuda: no C compiler (cc or gcc) to build the stand-in libcuda")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src = os.path.join(tmp, "fake_libcuda.c")
        with open(src, "w") as f:
            f.write(_C_SOURCE)
        tmp_lib = os.path.join(tmp, "libcuda.so.1")
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", f"-I{include}", src,
                        "-o", tmp_lib], check=True, capture_output=True)
        os.replace(tmp_lib, lib)       # atomic: a concurrent build leaves one complete library
    return out_dir


class _Driver:
    """A Triton driver for sm_90 device 0 over the stand-in libcuda (Triton's CudaUtils and CudaLauncher;
    with a ``fake``, every launch is logged there)."""

    def __init__(self, fake: Optional[FakeCuda] = None):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia import driver as nv_driver
        self._nv = nv_driver
        self.utils = nv_driver.CudaUtils()
        self._target = GPUTarget("cuda", 90, 32)
        self.launcher_cls = nv_driver.CudaLauncher if fake is None else _logging(nv_driver.CudaLauncher, fake)

    def is_active(self):
        return True

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=0):
        return (9, 0)

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_device_interface(self):
        import torch
        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        return self._nv.CudaDriver.map_python_to_cpp_type(self, ty)

    def allocate_default_profile_scratch(self, size, alignment, stream):
        raise RuntimeError("fake_cuda: kernels that need profile scratch are not supported")


def _normalised(call: tuple) -> dict:
    """The C launcher's call, by field. Triton 3.8's one C launcher takes (grid x3, stream, function,
    cooperative, pdl, metadata, launch metadata, enter hook, exit hook, global scratch, profile scratch,
    argument annotations, kernel signature, the arguments as one tuple); the per-kernel launchers of
    3.6 and 3.7 take (grid x3, stream, function, cooperative, pdl, global scratch, profile scratch,
    metadata, launch metadata, enter hook, exit hook, *the arguments)."""
    if len(call) == 16 and isinstance(call[15], tuple) and isinstance(call[7], tuple):
        return {"head": tuple(call[:7]), "packed": call[7], "metadata": call[8], "hooks": (call[9], call[10]),
                "scratch": (call[11], call[12]), "annotations": call[13], "signature": bytes(call[14]),
                "args": call[15]}
    return {"head": tuple(call[:7]), "packed": call[9], "metadata": call[10], "hooks": (call[11], call[12]),
            "scratch": (call[7], call[8]), "annotations": None, "signature": None, "args": tuple(call[13:])}


def _logging(launcher_cls, fake: FakeCuda):
    """A CudaLauncher subclass whose C launcher records every call, and the driver-level launch it made,
    into ``fake.log`` (the kernel's parameter sizes and types come from its signature)."""

    class LoggingLauncher(launcher_cls):
        def __init__(self, src, metadata):
            super().__init__(src, metadata)
            sizes, types, inner = param_sizes(src.signature), list(src.signature.values()), self.launch

            def launch(*call):
                fake.record(sizes)
                try:
                    result = inner(*call)
                finally:
                    fake.record(None)
                fake.log.append({"call": _normalised(call), "driver": fake.last(), "types": types})
                return result
            self.launch = launch

    return LoggingLauncher


@contextlib.contextmanager
def fake_cuda(log: bool = False) -> Iterator[FakeCuda]:
    """Make Triton launch through its real CUDA path onto the stand-in libcuda inside the block
    (``log``: record every launch in the returned object's ``log``; enter it before the first launch
    of the kernels to be logged, and do not time launches while logging)."""
    folder = build_libcuda()
    lib = ctypes.CDLL(os.path.join(folder, "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)
    saved_env = os.environ.get("TRITON_LIBCUDA_PATH")
    os.environ["TRITON_LIBCUDA_PATH"] = folder
    from triton.runtime import driver
    saved = driver._active
    fake = FakeCuda(lib)
    try:
        driver.set_active(_Driver(fake if log else None))
        yield fake
    finally:
        driver._active = saved
        if saved_env is None:
            os.environ.pop("TRITON_LIBCUDA_PATH", None)
        else:
            os.environ["TRITON_LIBCUDA_PATH"] = saved_env
