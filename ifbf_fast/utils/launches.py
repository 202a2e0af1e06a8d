"""Host cost made visible without a GPU: kernel launches per call, host time with the launches
stubbed, and host reads inside a training step.

A GPU run of this project found the fused ops bound by host work per call (launches, Python glue,
argument binding, a host sync inside the step), not by their kernels. None of these figures depends on
the machine, so the CPU tests and benches measure them:

* :func:`count_launches` counts, while a call runs, every device kernel it would launch: the aten ops
  that launch a kernel (views, metadata and empty allocations launch nothing), every Triton kernel
  launch, and the C++ ops of ``ifbf_fast._C`` (each counted as the number of CUDA kernels it launches,
  see :func:`register_native_launches`). Python custom ops (``torch.library.custom_op``) are entered:
  what counts is what they launch, not the op. Collectives are counted apart.
* ``count_launches(stub_triton=True)`` also turns every Triton launch into a no-op, so that the host
  side of a fast op can be timed on CPU tensors (under ``TRITON_INTERPRET=1``) without the
  interpreter's numpy work: what is left is binding, custom-op dispatch, autograd and the aten glue.
* :func:`host_time_us` times a callable (minimum over samples, the usual estimator of host cost).
* :func:`forbid_host_reads` makes every host read of a tensor (``item``, ``bool``, ``tolist``,
  ``nonzero``, ``.cpu()``, ``.numpy()``) raise, to prove that a training step never waits for the device.

On the CPU the counts are those of the CUDA path: the same aten ops and Triton launches are issued
(the C++ ABN ops differ by device only in their inner launch counts, which are registered per op).
"""

from __future__ import annotations

import collections
import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that never launch a kernel: allocation without initialisation, aliasing and metadata.
_NO_LAUNCH = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
    "detach", "alias", "lift_fresh", "lift_fresh_copy", "set_", "resize_", "record_stream",
    "_local_scalar_dense", "is_same_size", "_has_compatible_shallow_copy_type", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "is_pinned", "_to_dense", "_nested_tensor_size",
}
# Ops of these namespaces are collectives (counted apart from kernels).
_COLLECTIVE_NAMESPACES = {"c10d", "_c10d_functional", "_dtensor", "c10d_functional"}

_NATIVE_LAUNCHES: Dict[str, int] = {}


def register_native_launches(qualname: str, launches: int) -> None:
    """Declare how many CUDA kernels one call of the C++ op ``qualname`` (``ns::name``) launches.

    The dispatcher sees a C++ op as one call; its CUDA launcher may issue several kernels (a two-stage
    reduction, say). Ops that were not registered count as one launch.
    """
    _NATIVE_LAUNCHES[qualname] = int(launches)


@dataclass
class LaunchCount:
    """What :func:`count_launches` saw: kernel launches by name, collectives, host reads."""

    by_name: collections.Counter = field(default_factory=collections.Counter)
    collectives: collections.Counter = field(default_factory=collections.Counter)
    host_reads: int = 0
    # True while a Triton launch runs: the interpreter's own tensor copies are not the op's launches.
    paused: bool = False

    @property
    def total(self) -> int:
        """Device kernels launched (aten, Triton and C++ ops; collectives not included)."""
        return sum(self.by_name.values())

    @property
    def triton(self) -> int:
        return sum(v for k, v in self.by_name.items() if k.startswith("triton:"))

    def __str__(self) -> str:
        items = ", ".join(f"{k} x{v}" for k, v in sorted(self.by_name.items()))
        extra = f"; collectives {dict(self.collectives)}" if self.collectives else ""
        return f"{self.total} launches ({items}){extra}"


def _custom_op_def(func):
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - torch < 2.4
        return None
    return OPDEFS.get(func._schema.name)


class _Counter(TorchDispatchMode):
    def __init__(self, count: LaunchCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.count.paused:
            return func(*args, **kwargs)
        ns = func.namespace
        name = func._schema.name
        opdef = _custom_op_def(func) if ns not in ("aten", "prim") else None
        if opdef is not None:
            # A Python custom op: count what its body launches (with this mode active inside it).
            with self:
                return opdef._init_fn(*args, **kwargs)
        if ns in _COLLECTIVE_NAMESPACES:
            self.count.collectives[name] += 1
        elif name.split("::")[-1] == "_local_scalar_dense":
            self.count.host_reads += 1
        elif ns == "aten":
            short = name.split("::")[-1]
            if not (func.is_view or short in _NO_LAUNCH):
                self.count.by_name[f"aten:{short}"] += 1
        elif ns != "prim":
            self.count.by_name[f"native:{name}"] += _NATIVE_LAUNCHES.get(name, 1)
        return func(*args, **kwargs)


def _kernel_name(fn) -> str:
    inner = getattr(fn, "fn", None)
    return getattr(inner, "__name__", None) or getattr(fn, "__name__", repr(fn))


@contextlib.contextmanager
def _patched_triton(count: LaunchCount, stub: bool) -> Iterator[None]:
    """Count (and with ``stub``, skip) every Triton kernel launch, compiled or interpreted."""
    try:
        from triton.runtime import interpreter, jit
    except ImportError:  # pragma: no cover - triton ships with torch on Linux
        yield
        return
    classes = [c for c in (jit.JITFunction, interpreter.InterpretedFunction) if hasattr(c, "run")]
    saved = {c: c.run for c in classes}
    # The package's launchers bind compiled kernels once and then call Triton's C launcher directly
    # (kernels/_launch.py); paused, every launch goes through the patched run below.
    from ifbf_fast.kernels import _launch as planned

    def wrap(cls):
        original = saved[cls]

        def run(self, *args, grid=None, warmup=False, **kwargs):
            if not warmup:
                count.by_name[f"triton:{_kernel_name(self)}"] += 1
                if stub:
                    return None
            count.paused = True
            try:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                count.paused = False
        return run

    for c in classes:
        c.run = wrap(c)
    planned.pause()
    try:
        yield
    finally:
        planned.resume()
        for c, fn in saved.items():
            c.run = fn


@contextlib.contextmanager
def count_launches(stub_triton: bool = False) -> Iterator[LaunchCount]:
    """Count the device kernels launched inside the block (see the module docstring).

    ``stub_triton``: Triton launches are counted but not run (their outputs stay unwritten), for
    timing the host side of a fast op.
    """
    count = LaunchCount()
    with _patched_triton(count, stub_triton), _Counter(count):
        yield count


@contextlib.contextmanager
def stub_triton() -> Iterator[LaunchCount]:
    """Every Triton launch inside the block is a counted no-op (no dispatch mode: for timing)."""
    count = LaunchCount()
    with _patched_triton(count, True):
        yield count


def host_time_us(fn: Callable[[], object], repeat: int = 25, warmup: int = 3) -> float:
    """Minimum wall time of ``fn()`` in microseconds over ``repeat`` samples (after ``warmup`` calls).

    On CPU tensors with the Triton launches stubbed (:func:`stub_triton`), this is the
    host cost of issuing the call, the part a GPU cannot hide when the host is the slower side.
    """
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


class HostReadError(RuntimeError):
    """A tensor was read on the host inside a region declared free of host reads."""


class _ForbidReads(TorchDispatchMode):
    def __init__(self, allow: Optional[Callable[[], bool]]):
        super().__init__()
        self.allow = allow

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        short = func._schema.name.split("::")[-1]
        if not (self.allow is not None and self.allow()) and short in ("_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique",
                     "_unique2", "unique_consecutive"):
            raise HostReadError(f"host read inside a sync-free region: aten.{short}")
        return func(*args, **kwargs)


_in_interpreter = [0]


@contextlib.contextmanager
def _interpreter_allowed() -> Iterator[None]:
    """Mark Triton interpreter launches: the interpreter copies CPU tensors to numpy by design (on a
    GPU the same launch reads nothing on the host), so its reads are not the caller's."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        yield
        return
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        _in_interpreter[0] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _in_interpreter[0] -= 1

    interpreter.InterpretedFunction.run = run
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = original


@contextlib.contextmanager
def forbid_host_reads(allow: Optional[Callable[[], bool]] = None) -> Iterator[None]:
    """Raise :class:`HostReadError` on any host read of a tensor inside the block.

    Patched: ``Tensor.item``, ``__bool__``, ``__int__``, ``__float__``, ``tolist``, ``cpu``, ``numpy``
    and the aten ops whose output size depends on the data (``nonzero``, ``masked_select``, ``unique``)
    or that read a scalar (``_local_scalar_dense``). On the CPU every tensor lives on the host, so
    ``.cpu()`` stands for the device-to-host copy it would be on a GPU. ``allow()`` returning True
    lets a read through (for code outside the region under test that runs inside the block). Reads made
    by the Triton interpreter inside a kernel launch are let through (a compiled launch makes none).
    """
    user_allow = allow

    def allow() -> bool:
        return _in_interpreter[0] > 0 or (user_allow is not None and user_allow())

    names = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def guard(name):
        original = saved[name]

        def method(self, *args, **kwargs):
            if allow is not None and allow():
                return original(self, *args, **kwargs)
            raise HostReadError(f"host read inside a sync-free region: Tensor.{name}() on a tensor of shape "
                                f"{tuple(self.shape)}")
        return method

    for n in names:
        setattr(torch.Tensor, n, guard(n))
    mode = _ForbidReads(allow)
    try:
        with _interpreter_allowed(), mode:
            yield
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)
