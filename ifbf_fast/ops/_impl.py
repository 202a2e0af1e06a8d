"""The implementation switch: which path (fast or reference) the public ops take.

One switch, read at call time (docs/DESIGN.md section 2). Precedence, highest first:

1. the innermost ``use_impl(...)`` context;
2. the last ``set_impl(...)`` (``set_impl(None)`` clears it);
3. the environment variable ``IFBF_IMPL``;
4. ``"auto"``.

``"auto"`` takes the fast path wherever it can run on the tensors at hand and the reference
elsewhere; ``"fast"`` insists on the fast path and raises (naming the op and why) where it cannot run,
so that a user who asked for the fast kernels never measures the reference by accident;
``"reference"`` always takes the plain PyTorch specification.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional, Union

import torch

IMPLS = ("auto", "fast", "reference")
ENV_VAR = "IFBF_IMPL"

# A plain module-level list rather than a ContextVar: torch.compile reads module globals and guards
# on them, so a change of implementation recompiles instead of silently reusing the old graph.
_stack: list = []
_global: Optional[str] = None


def _check(impl: str, source: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{source}: unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")
    return impl


def _env_impl() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    return _check(value, f"environment variable {ENV_VAR}") if value else "auto"


def set_impl(impl: Optional[str]) -> None:
    """Select ``"fast"``, ``"reference"`` or ``"auto"`` for every later call; ``None`` clears it."""
    global _global
    _global = None if impl is None else _check(impl, "set_impl")


@contextlib.contextmanager
def use_impl(impl: Optional[str]) -> Iterator[None]:
    """Context manager: run the body with the given implementation, restoring the previous one.

    ``None`` leaves the current choice as it is (convenient for an optional ``--impl``).
    """
    if impl is None:
        yield
        return
    _stack.append(_check(impl, "use_impl"))
    try:
        yield
    finally:
        _stack.pop()


def get_impl() -> str:
    """The implementation requested now (before the per-op ``auto`` resolution)."""
    if _stack:
        return _stack[-1]
    if _global is not None:
        return _global
    return _env_impl()


class FastPathUnavailable(RuntimeError):
    """Raised when ``impl="fast"`` is requested for an op whose fast path cannot run here."""


def choose(op: str, reason_unavailable: Union[None, str, Callable[[], Optional[str]]]) -> bool:
    """Decide whether ``op`` takes its fast path.

    ``reason_unavailable`` is ``None`` when the fast path can run on the given inputs, else a short
    explanation that is raised to the user when ``"fast"`` was requested explicitly. It may be a
    zero-argument callable returning either: it is then called only when the answer depends on it, so
    the reference mode does no fast-path work at all (this runs at every call of every op).
    """
    impl = get_impl()
    if impl == "reference":
        return False
    if callable(reason_unavailable):
        reason_unavailable = reason_unavailable()
    if reason_unavailable is None:
        return True
    if impl == "fast":
        raise FastPathUnavailable(
            f"ifbf_fast.ops.{op}: the fast path was requested (impl='fast') but cannot run: "
            f"{reason_unavailable}. Use impl='auto' to fall back to the reference there."
        )
    return False


# --- availability probes shared by the ops ---------------------------------------------------

def triton_unavailable_reason(interpreter: bool, *tensors: torch.Tensor) -> Optional[str]:
    """Why Triton kernels cannot run on these tensors, or ``None`` if they can. ``interpreter`` is the
    kernel module's own ``INTERPRETER`` flag, recorded when it was imported (``@triton.jit`` decides
    then, so the environment now does not matter): CPU tensors run only when it is set."""
    for t in tensors:
        if t.device.type == "cuda" or (t.device.type == "cpu" and interpreter):
            continue
        return (f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
                f"the kernels were imported); got a tensor on {t.device}")
    return None
