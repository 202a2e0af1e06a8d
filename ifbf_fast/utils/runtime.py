"""Device and mixed-precision choices shared by train.py, ``ifbf_fast.evaluate`` and ``ifbf_fast.predict``."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch


class UsageError(RuntimeError):
    """An option the user gave cannot work with this data, checkpoint, folder or machine. The message
    is one line naming the option and the value; the command lines exit with code 2 for it, as
    argparse does for the errors it finds itself."""

    exit_code = 2


class SetupError(UsageError):
    """A runtime option cannot be honoured on this machine (no CUDA, too few GPUs, fp16 on the CPU)."""


def check_gpus(gpus: Optional[int]) -> int:
    """The number of GPUs ``--gpus`` asks for (``None``: one if CUDA is available, else 0), after checking
    that this machine has them; raises ``SetupError`` otherwise. Launchers call it before starting any
    process, so that a missing GPU is one line and not a failed NCCL set-up in every rank."""
    gpus = gpus if gpus is not None else (1 if torch.cuda.is_available() else 0)
    if gpus > 0:
        if not torch.cuda.is_available():
            raise SetupError(f"--gpus {gpus} but CUDA is not available here; use --gpus 0 for the CPU")
        if gpus > torch.cuda.device_count():
            raise SetupError(f"--gpus {gpus} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return gpus


def select_device(gpus: Optional[int], local_rank: int = 0) -> torch.device:
    """``cuda:local_rank`` for ``--gpus N > 0``, the CPU for 0; ``None``: one GPU if there is one."""
    if check_gpus(gpus) > 0:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_amp(mode: str, device: torch.device) -> str:
    """``--amp auto|off|bf16|fp16`` -> ``off|bf16|fp16``: auto is bf16 where the GPU supports it, fp16 on
    older GPUs, off on the CPU."""
    if mode == "auto":
        if device.type != "cuda":
            return "off"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "fp16" and device.type != "cuda":
        raise SetupError("--amp fp16 needs a GPU; use --amp bf16 on the CPU")
    return mode


def autocast_factory(mode: str, device: torch.device) -> Callable[[], ContextManager]:
    """A zero-argument factory of the autocast context for a resolved mode (``off|bf16|fp16``)."""
    if mode == "off":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)
