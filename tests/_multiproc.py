"""Running a test body in several spawned processes (gloo on CPU), with a bound on the time."""
import time

import pytest
import torch.multiprocessing as mp

from ifbf_fast.utils.dist import free_port


def spawn_ranks(target, args, world: int = 2, timeout_s: float = 120, what: str = "the test") -> None:
    """Run ``target(rank, port, *args)`` in ``world`` spawned processes; fail the test, naming the
    ranks, if one is still running after ``timeout_s`` (it is killed: a hang never blocks the suite)
    or exits with a non-zero code."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, port, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for rank in hung:
        procs[rank].kill()
    if hung:
        pytest.fail(f"rank(s) {hung} hung in {what}")
    codes = [p.exitcode for p in procs]
    assert all(code == 0 for code in codes), f"ranks exited with codes {codes} in {what}"
