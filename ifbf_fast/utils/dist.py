"""Small helpers for torch.distributed used by the engine and by the multi-process tests."""

from __future__ import annotations

import contextlib
import os
import socket
import sys

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


def finish_group() -> None:
    """Leave the process group after a successful run: a barrier first, so that no rank tears down
    its gloo/NCCL context while a peer is still inside a collective (with gloo that aborts the
    peer: "terminate called without an active exception"). Not for the error path, where a peer may
    be gone and the barrier would wait for the timeout."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def group(init):
    """Run the body inside the process group that ``init()`` joins: on success leave it with
    ``finish_group``, on an error just tear it down (the peers are ended by the launcher)."""
    init()
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    finish_group()


def local_group(rank_: int, world: int, port: int, backend: str = "gloo", timeout_s: float = 120):
    """:func:`group` over :func:`init_local_group` (spawned workers, tests)."""
    return group(lambda: init_local_group(rank_, world, port, backend, timeout_s))


def exit_worker() -> None:
    """End a spawned worker after it finished successfully, skipping interpreter finalisation.

    With torch 2.14.1, a process that ran gloo collectives (in autograd too) sometimes aborts in
    C++ static destructors after all its work is done ("terminate called without an active
    exception", exit code -6, about one run in six in the two-process tests), which the launcher
    then reports as a failed rank. Everything a worker writes is flushed and closed before this.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
