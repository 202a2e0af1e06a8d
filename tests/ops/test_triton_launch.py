"""The bound Triton launches of kernels/_launch.py against Triton's own launch path.

On every machine: a fresh process without TRITON_INTERPRET (tests/ops/_triton_launch_child.py) compiles
the FBF and OHEM-CE kernels for sm_90 and launches them on CPU tensors through Triton's real CUDA
launcher over the stand-in libcuda (ifbf_fast/utils/fake_cuda.py). Each case runs once through
``JITFunction.run`` and once bound, and every launch is compared: the C launcher's arguments and what it
handed the driver (grid, block, shared memory, function, stream, the parameter bytes). The bound run must
not enter ``JITFunction.run`` at all; a change of pointer alignment or of a per-call scalar must. At the
network's shapes, with the H200's launch plans, every launch must load and be accepted by the stand-in,
which refuses what the driver would (grid, threads per block, shared memory).

With IFBF_TEST_GPU=1 on a CUDA machine (where the stand-in checks skip): the same ops on CUDA tensors
give bitwise the same results bound and through Triton's path, and the bound repeat never enters
``JITFunction.run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHILD = Path(__file__).with_name("_triton_launch_child.py")
GPU = os.environ.get("IFBF_TEST_GPU", "0") not in ("", "0")
CASES = ("fbf_nchw_bf16", "fbf_channels_last_fp32_grad_stats", "fbf_unaligned_fp16", "ohem_bf16", "ohem_up_fp16",
         "ohem_up_x4_bf16_maxnreg")
LAUNCHES = {"fbf": 4, "ohem": 3}


@pytest.fixture(scope="module")
def report():
    if GPU:
        # A GPU machine has the real libcuda, which the stand-in must not shadow in the child; the GPU
        # test below checks the real launches there.
        pytest.skip("the stand-in driver checks run on the CPU test machines (IFBF_TEST_GPU=1: see "
                    "test_bound_launch_on_gpu_is_bitwise_triton)")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(CHILD.parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(CHILD)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the launch child failed:\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["supported"]:
        import triton
        pytest.skip(f"Triton {triton.__version__}: the bound launches are off (kernels/_launch.py SUPPORTED), "
                    f"every launch takes Triton's own path")
    return result


@pytest.mark.parametrize("case", CASES)
def test_bound_launch_matches_triton(report, case):
    r = report[case]
    assert r["launches"] == LAUNCHES[case.split("_")[0]]
    assert r["problems"] == [], "\n".join(r["problems"])
    # Triton's path enters JITFunction.run once per launch; so does the first bound call (it binds);
    # the repeat enters it never.
    assert r["triton_runs"] == r["launches"] and r["bind_runs"] == r["launches"]
    assert r["bound_runs"] == 0


def test_alignment_change_rebinds(report):
    steps = report["alignment"]
    # A misaligned input (3 fp16 elements into its storage) is a new specialisation for the three
    # launches that read it (the forward's reduce and scale, the backward's reduce); the backward's
    # scale reads only grad_out and outputs.
    assert steps["misaligned"]["triton_runs"] == 3
    assert steps["misaligned_again"]["triton_runs"] == 0
    assert steps["realigned"]["triton_runs"] == 0            # 8 elements in: 16-byte aligned again
    assert steps["aligned_again"]["triton_runs"] == 0
    # Bound launches call the function Triton compiled for that alignment, not the other one.
    assert steps["misaligned_again"]["functions"] == steps["misaligned_by_triton"]["functions"]
    assert steps["aligned_again"]["functions"] == steps["aligned_by_triton"]["functions"]
    assert steps["realigned"]["functions"] == steps["aligned_by_triton"]["functions"]
    assert steps["misaligned"]["functions"][:3] != steps["aligned"]["functions"][:3]


def test_launch_hooks_see_every_launch(report):
    # with a launch hook registered (a profiler), every launch takes Triton's path and reaches the hook
    assert report["hooks"] == {"triton_runs": 4, "hook_calls": 4, "after_removal_runs": 0}


def test_per_call_scalar_change_rebinds(report):
    r = report["ohem_new_keep_ratio"]
    assert r["first_runs"] == 3 and r["second_runs"] == 0 and r["launches"] == 6


@pytest.mark.parametrize("case", ["fbf1_nchw_219", "fbf1_channels_last_219", "fbf2_nchw_219",
                                  "fbf2_channels_last_219", "ohem_plain_876", "ohem_fused_876"])
def test_network_shapes_launch(report, case):
    """At the network's shapes, with the H200's plans, every launch compiles, loads (shared memory,
    threads) and is accepted by the driver (grid and block limits)."""
    r = report["network"][case]
    assert r["error"] is None, r["error"]
    assert r["refused"] == 0 and r["launches"] == r["expected"]
    if r["planned"] is not None:
        # the programs and threads the work-in-flight model (test_fbf_launches) reads from the plans
        # are what reaches the driver
        assert r["driver"] == r["planned"]


def test_stand_in_driver_refuses_bad_launch(report):
    r = report["network"]["grid_y_70000"]
    assert r["refused"] == 1 and r["launches"] == 0
    assert r["error"] is not None and "outside an H200's grid" in r["error"]


def test_launch_counter_sees_every_launch(report):
    # count_launches pauses the bound launches, so every launch reaches its patched JITFunction.run
    assert report["counted"] == 4


def test_pause_is_scoped():
    from ifbf_fast.kernels import _launch
    from ifbf_fast.utils.launches import count_launches, stub_triton

    assert _launch._STATE["paused"] == 0
    with count_launches():
        assert not _launch.enabled()
        with stub_triton():
            assert _launch._STATE["paused"] == 2
        assert _launch._STATE["paused"] == 1
    assert _launch._STATE["paused"] == 0


def test_interpreted_kernels_keep_triton_path():
    from ifbf_fast.kernels import _launch, fbf

    if not fbf.INTERPRETER:
        pytest.skip("the kernels are compiled in this process (IFBF_TEST_GPU=1)")
    launch = _launch.PlannedLaunch(fbf._fbf_scale_kernel, (1,), 8, {"num_warps": 4})
    assert not launch.compiled and not launch.cache


@pytest.mark.skipif(not (GPU and torch.cuda.is_available()), reason="needs IFBF_TEST_GPU=1 and a CUDA device")
@pytest.mark.parametrize("op", ["fbf", "ohem", "ohem_up"])
def test_bound_launch_on_gpu_is_bitwise_triton(op):
    from triton.runtime import jit

    from ifbf_fast import ops
    from ifbf_fast.kernels import _launch

    dev = torch.device("cuda")
    if op == "fbf":
        high = torch.randn(2, 48, 33, 31, device=dev, dtype=torch.bfloat16)
        low = torch.randn(2, 80, 33, 31, device=dev, dtype=torch.bfloat16)
        inputs = [high, low, torch.randn(128, 128, 1, 1, device=dev), torch.randn(128, device=dev)]
        grad = torch.randn(2, 128, 33, 31, device=dev, dtype=torch.bfloat16)

        def run():
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = ops.fbf(*leaves)
            return (out,) + torch.autograd.grad(out, leaves, grad)
    else:
        shape = (2, 19, 16, 24) if op == "ohem_up" else (2, 19, 64, 96)
        logits = torch.randn(shape, device=dev, dtype=torch.bfloat16) * 3
        target = torch.randint(0, 19, (2, 64, 96), device=dev, dtype=torch.uint8)
        fn = ops.ohem_cross_entropy_upsampled if op == "ohem_up" else ops.ohem_cross_entropy

        def run():
            leaf = logits.detach().clone().requires_grad_()
            loss = fn(leaf, target, 0.75, None)
            return (loss,) + torch.autograd.grad(loss, [leaf])

    runs = [0]
    original = jit.JITFunction.run

    def counted(self, *args, **kwargs):
        runs[0] += 1
        return original(self, *args, **kwargs)

    with ops.use_impl("fast"):
        _launch.set_enabled(False)
        try:
            ref = run()
        finally:
            _launch.set_enabled(True)
        run()                                    # binds
        jit.JITFunction.run = counted
        try:
            got = run()
        finally:
            jit.JITFunction.run = original
    torch.cuda.synchronize()
    assert runs[0] == 0
    for r, g in zip(ref, got):
        assert torch.equal(r, g)
