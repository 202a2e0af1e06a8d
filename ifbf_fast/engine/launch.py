"""One process launcher for training and evaluation.

``launch(fn, args, gpus, procs, known_errors)`` runs ``fn(args, local_rank)`` in as many processes as
asked and returns what rank 0's call returned when it ran in this process:

* under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` > 1 set): this process is one rank; the group is
  initialised from the environment (NCCL when ``gpus`` is not 0 and CUDA is there, else gloo);
* ``gpus`` > 1: one spawned process per GPU over NCCL;
* ``gpus`` == 0 and ``procs`` > 1: ``procs`` spawned CPU processes over gloo, each with an equal
  share of the cores;
* otherwise ``fn`` runs here, with no process group.

A spawned rank that stops on a user error (one of ``known_errors``: a bad option, file, data or
checkpoint) sends (rank, exit code, message) to the parent before the group is torn down, so the
message arrives before a peer fails on the closed connection, and leaves with that code. The parent
raises :class:`ifbf_fast.engine.preflight.RankError` with the first such message instead of torch's
``ProcessRaisedException`` traceback; any other failure (a crash) keeps its traceback.
``fn`` must be a module-level function (spawn pickles it by name).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ifbf_fast.utils import dist as du
from ifbf_fast.utils.runtime import check_gpus

from .preflight import RankError, exit_code

__all__ = ["launch", "plan", "under_torchrun"]


def under_torchrun() -> bool:
    """This process is one rank of a multi-process ``torchrun``."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def plan(gpus: Optional[int], procs: int) -> tuple:
    """(world size, backend) for ``--gpus``/``--procs`` on this machine; ``check_gpus`` raises a one-line
    ``SetupError`` for GPUs it does not have (here, not as a failed NCCL set-up in every rank)."""
    n = check_gpus(gpus)
    return (n, "nccl") if n > 1 else (procs if n == 0 else 1, "gloo")


def _worker(local_rank: int, fn: Callable, args, world: int, port: int, backend: str, known: tuple,
            errors) -> None:
    """One spawned rank: ``fn(args, local_rank)`` inside a local process group (see the module text)."""
    try:
        with du.local_group(local_rank, world, port, backend):
            if backend == "gloo":
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
            try:
                fn(args, local_rank)
            except known as exc:
                errors.put((local_rank, exit_code(exc), str(exc)))
                raise
    except known as exc:
        sys.stderr.flush()
        os._exit(exit_code(exc))
    du.exit_worker()


def launch(fn: Callable, args, gpus: Optional[int], procs: int, known_errors: tuple = (),
           before_spawn: Optional[Callable[[str], None]] = None):
    """Run ``fn(args, local_rank)`` on every rank (see the module text). Returns ``fn``'s result when it
    ran in this process (one process, or a torchrun rank), ``None`` after a spawn. ``before_spawn(backend)``
    runs once in the parent before the ranks start: checks that would otherwise fail in every rank."""
    if under_torchrun():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if (gpus != 0 and torch.cuda.is_available()) else "gloo"
        with du.group(lambda: dist.init_process_group(backend)):
            return fn(args, local_rank)
    world, backend = plan(gpus, procs)
    if world <= 1:
        return fn(args, 0)
    if before_spawn is not None:
        before_spawn(backend)
    mp = torch.multiprocessing
    errors = mp.get_context("spawn").SimpleQueue()
    # spawn logs a warning for every peer it terminates after a failure: noise beside the one line
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        # spawn ends every rank when one dies (it terminates the others and raises here)
        mp.spawn(_worker, args=(fn, args, world, du.free_port(), backend, tuple(known_errors), errors),
                 nprocs=world, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        if errors.empty():            # not a user error: a crash, keep its traceback
            raise
        rank, code, message = errors.get()      # the first rank that failed
        raise RankError(rank, message, code) from None
    return None
