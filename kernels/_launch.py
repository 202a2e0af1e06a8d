"""Triton launches that bind their arguments once per launch plan instead of on every call.

``kernel[grid](...)`` and ``kernel.run(...)`` (Triton's ``JITFunction.run``) do far more host work than
the launch itself. Per call they specialise every argument (dtype, 16-byte alignment of each pointer,
ints equal to 1 or divisible by 16), build the cache key (with ``str(options)``), look the compiled
kernel up, read knobs, build launch metadata for the launch hooks, and only then call the CUDA launcher.
Measured on the 2-core development CPU with Triton's real launcher over the stand-in libcuda of
``ifbf_fast/utils/fake_cuda.py``, for FBF's reduce launch (38 arguments): 22 µs per ``JITFunction.run``,
of which the C launch is 1.9 µs and the binder 9 µs.

Every launch site of this package already plans its launch once per shape key (grid, scalar arguments,
constexprs, warps). :class:`PlannedLaunch` adds the one thing a plan cannot know: the compiled kernel
and its launcher for the per-call properties Triton specialises on. Per call it computes only those: the
dtype and 16-byte alignment of each pointer argument, the current device, and the per-call scalars the
site names (``var``). The first call with a new combination goes through ``kernel.run``, which compiles
or looks up the kernel and launches it. Later calls pass the same argument tuple to Triton's C launcher
directly, with the same grid, stream, function handle and metadata that ``JITFunction.run`` would pass.
``tests/ops/test_triton_launch.py`` compares the two launches byte for byte over the stand-in libcuda.

Triton's own path is taken instead (documented fallbacks, decided per call):

* kernels built under the Triton interpreter (CPU tensors): ``kernel.run`` is the interpreter (which
  ``_interpreter.patch``, applied when this module is imported under it, makes compute as the
  compiled kernels do);
* a Triton outside the tested 3.6-3.8 series, whose launch path may differ (``SUPPORTED``);
* ``IFBF_TRITON_BYPASS=0`` in the environment when this module is imported, or ``set_enabled(False)``;
* while ``ifbf_fast.utils.launches`` counts or stubs launches (it patches ``JITFunction.run``);
* while a launch hook is registered (``triton.knobs.runtime.launch_enter_hook`` / ``launch_exit_hook``,
  as profilers do), or the kernel has pre-run hooks: they see every launch, as with Triton alone;
* a compiled kernel that needs global or profile scratch memory, or runs instrumented.

What the bypass assumes stays fixed after a plan's first launch: the kernel's source and the globals it
reads, and ``TRITON_DEBUG`` / the instrumentation mode (Triton re-reads these on every call; change them
only before the first launch, or call ``clear()``).
"""

from __future__ import annotations

import operator
import os
import weakref
from typing import Optional

import torch
import triton

from . import _interpreter

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):   # as each kernel module decides at import
    _interpreter.patch()

try:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover - a Triton without the 3.x runtime layout
    _knobs = _driver = _JITFunction = None

_SERIES = ".".join(triton.__version__.split(".")[:2])
#: whether this Triton's launch path is one this module reproduces (the 3.6-3.8 series, each checked by
#: tests/ops/test_triton_launch.py): on 3.8 the bound launch calls the C launcher itself; on 3.6 and
#: 3.7 it calls the kernel's CudaLauncher, with the call JITFunction.run makes (their C launchers are
#: generated per kernel, with another argument order)
SUPPORTED = _SERIES in ("3.6", "3.7", "3.8") and _knobs is not None
_RAW = _SERIES == "3.8"

# "enabled": the switch (the environment at import, set_enabled); "paused": > 0 while launches are counted
_STATE = {"enabled": SUPPORTED and os.environ.get("IFBF_TRITON_BYPASS", "1") != "0", "paused": 0}
_dtype_of = operator.attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr
_NO_BYPASS = object()          # an entry for a combination that must keep Triton's path
_PLANS = weakref.WeakSet()     # every PlannedLaunch of a compiled kernel, for clear()
_CACHE_LIMIT = 64              # combinations per plan before its cache starts over


def set_enabled(on: bool) -> None:
    """Turn the bypass on or off for every later launch (it stays off on an unsupported Triton)."""
    _STATE["enabled"] = bool(on) and SUPPORTED


def enabled() -> bool:
    """Whether launches take the bypass now (the switch on and no launch counting in progress)."""
    return _STATE["enabled"] and not _STATE["paused"]


def pause() -> None:
    """Send every launch through ``kernel.run`` until :func:`resume` (the launch counter's stub)."""
    _STATE["paused"] += 1


def resume() -> None:
    _STATE["paused"] = max(0, _STATE["paused"] - 1)


def clear() -> None:
    """Forget every bound launcher: the next launch of each plan goes through ``kernel.run`` again."""
    for plan in _PLANS:
        plan.cache.clear()


def _hooks_active() -> bool:
    rt = _knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and (getattr(hook, "calls", True)):
            return True
    return False


def _bind(kernel, ck, device, args: tuple, opts: dict) -> object:
    """What a bypassed launch needs from the CompiledKernel ``ck`` that ``JITFunction.run`` returned
    for ``args``/``opts``, or ``_NO_BYPASS`` where the launch must keep Triton's path."""
    function = getattr(ck, "function", None)
    packed = getattr(ck, "packed_metadata", None)
    launcher = getattr(ck, "_run", None)
    if function is None or packed is None or launcher is None:
        return _NO_BYPASS
    if (getattr(launcher, "global_scratch_size", 1) != 0 or getattr(launcher, "profile_scratch_size", 1) != 0
            or getattr(launcher, "gsan_enabled", False)):
        return _NO_BYPASS
    raw = getattr(launcher, "launch", None) if _RAW else None
    if raw is not None and not (hasattr(launcher, "arg_annotations") and hasattr(launcher, "kernel_signature")
                                and hasattr(launcher, "launch_cooperative_grid")):
        raw = None
    # Triton hands its launcher every bound argument in signature order, constexprs included (the
    # launcher skips them): the ones given by keyword (or by default) come after the positional ones
    # and are fixed for the plan, so they are bound here once.
    try:
        binder = kernel.device_caches[device][4]
        bound = list(binder(*args, **opts)[0].values())
    except Exception:           # a binder of another shape: keep Triton's path
        return _NO_BYPASS
    if len(bound) < len(args) or any(a is not b for a, b in zip(args, bound)):
        return _NO_BYPASS
    extra = tuple(bound[len(args):])
    if raw is None:         # the CudaLauncher, called as JITFunction.run calls it
        return (False, launcher, function, None, None, packed, None, None, extra, ck)
    return (True, raw, function, launcher.launch_cooperative_grid, launcher.launch_pdl, packed,
            launcher.arg_annotations, launcher.kernel_signature, extra, ck)


class PlannedLaunch:
    """One planned launch of a ``@triton.jit`` kernel: fixed grid and options (constexprs passed by
    keyword, ``num_warps``), arguments passed as one positional tuple whose first ``n_ptr`` entries are
    the tensors of the call.

    ``launch(args, var)``: ``args`` every positional argument in signature order (tensors, then the
    plan's scalars and constexprs); ``var`` the scalars among them that may change between calls of
    this plan (their values become part of the binding key; everything else in ``args`` after the
    tensors must be fixed for the plan).
    """

    __slots__ = ("kernel", "grid", "opts", "n_ptr", "cache", "g0", "g1", "g2", "compiled", "__weakref__")

    def __init__(self, kernel, grid: tuple, n_ptr: int, opts: Optional[dict] = None):
        self.kernel = kernel
        self.grid = tuple(grid)
        self.opts = dict(opts or {})
        self.n_ptr = n_ptr
        self.g0 = self.grid[0]
        self.g1 = self.grid[1] if len(self.grid) > 1 else 1
        self.g2 = self.grid[2] if len(self.grid) > 2 else 1
        # Only compiled kernels on a supported Triton can bind; the rest always take kernel.run.
        self.compiled = SUPPORTED and _JITFunction is not None and isinstance(kernel, _JITFunction)
        self.cache: dict = {}
        if self.compiled:
            _PLANS.add(self)

    def triton_run(self, args: tuple):
        """Triton's own path (``kernel.run``, looked up per call so that a patched run is seen)."""
        return self.kernel.run(*args, grid=self.grid, warmup=False, **self.opts)

    def __call__(self, args: tuple, var: tuple = ()) -> None:
        if not (self.compiled and _STATE["enabled"]) or _STATE["paused"] or self.kernel.pre_run_hooks \
                or _hooks_active():
            self.triton_run(args)
            return
        drv = _driver.active
        device = drv.get_current_device()
        tensors = args[:self.n_ptr]
        # what Triton specialises a pointer on: its dtype and whether it is 16-byte aligned (the low
        # four bits are kept whole: a finer key, never a coarser one)
        key = (device, var, tuple(map(_dtype_of, tensors)), tuple([_data_ptr(t) & 15 for t in tensors]))
        entry = self.cache.get(key)
        if entry is None:
            result = self.triton_run(args)          # compiles or looks up, and launches
            if len(self.cache) >= _CACHE_LIMIT:
                self.cache.clear()
            self.cache[key] = _NO_BYPASS if result is None else _bind(self.kernel, result, device, args, self.opts)
            return
        if entry is _NO_BYPASS:
            self.triton_run(args)
            return
        is_raw, launch, function, coop, pdl, packed, annotations, signature, extra, _ck = entry
        if extra:
            args = args + extra
        # No launch metadata and no hooks (none is registered: checked above), no scratch (checked at
        # binding); otherwise the arguments JITFunction.run gives the launcher.
        if is_raw:
            launch(self.g0, self.g1, self.g2, drv.get_current_stream(device), function, coop, pdl, packed, None,
                   None, None, None, None, annotations, signature, args)
        else:
            launch(self.g0, self.g1, self.g2, drv.get_current_stream(device), function, packed, None, None, None,
                   *args)
