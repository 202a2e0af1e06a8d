"""Small helpers for torch.distributed used by the engine and by the multi-process tests."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on the loopback interface, for a local process group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_primary() -> bool:
    return rank() == 0


def init_local_group(rank_: int, world: int, port: int, backend: str = "gloo", timeout_s: float = 120) -> None:
    """Join a process group on 127.0.0.1:port (the multi-process tests and ``--procs N`` on CPU)."""
    import datetime
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend, rank=rank_, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over all ranks (a no-op in a single process); returns ``t``."""
    if is_dist():
        dist.all_reduce(t)
    return t
