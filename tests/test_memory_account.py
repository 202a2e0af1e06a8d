"""bench/memory_account.py: the counters, the reference OHEM stand-in, and the fast path's saving.

The account (ifbf_fast.utils.memory.step_account, which the bench wraps) runs one IFBFNet-R101 training
step of train.py's TrainStep at crop 876, batch 2 on fake tensors (seconds on a CPU). Measured with it
(fp32; bytes saved for backward / peak of the step, fast vs BatchNorm2d + LeakyReLU: 62% / 63%; fast vs
the ABN reference: 45% / 46%), hence the thresholds below.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from ifbf_fast import ops

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def ma():
    spec = importlib.util.spec_from_file_location("memory_account", BENCH / "memory_account.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_live_storages_counts_allocations_not_views_or_in_place(ma):
    param = torch.zeros(250)                     # exists before: in-place updates allocate nothing
    tracker = ma.LiveStorages()
    with tracker:
        a = torch.empty(1000)                   # 4000 B
        b = a.view(10, 100)                      # a view: no allocation
        c = b + 1                                # 4000 B
        c.add_(1)
        param.add_(1)
        del a, b                                 # a's storage dies with its last view
        d = c * 2                                # 4000 B, while c lives
        del c, d
    assert tracker.peak == 8000
    assert tracker.current == 0
    assert tracker.live == {}


def test_count_saved_deduplicates_storages_and_excludes(ma):
    x = torch.randn(64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    with ma.count_saved(exclude={w.untyped_storage()._cdata}) as saved:
        y = x * w                                # saves x and w
        z = y.view(8, 8).sin()                   # saves y (through a view)
        _ = (y * 1.0).view(64).cos()
    assert x.untyped_storage()._cdata in saved
    assert w.untyped_storage()._cdata not in saved
    assert saved[y.untyped_storage()._cdata] == 64 * 4
    assert len(saved) == 3                       # x, y (once, though saved by sin through a view), y*1.0
    del z


def test_ohem_ref_static_is_the_reference_on_all_valid_labels(ma):
    logits = torch.randn(2, 19, 9, 7, requires_grad=True)
    target = torch.randint(0, 19, (2, 9, 7))
    results = []
    for fn in (ops.ohem_cross_entropy_ref, ma.ohem_ref_static):
        with ma.count_saved(exclude=set()) as saved:
            loss = fn(logits, target, 0.75)
        results.append((loss.item(), torch.autograd.grad(loss, logits)[0], sorted(saved.values())))
    (ref_value, ref_grad, ref_saved), (value, grad, saved) = results
    assert value == pytest.approx(ref_value, rel=1e-6)
    torch.testing.assert_close(grad, ref_grad)
    assert saved == ref_saved, "the stand-in must save exactly what the reference saves"


def test_fast_paths_assumed_restores_the_process_state(ma):
    fbf_kernels = pytest.importorskip("ifbf_fast.kernels.fbf")
    before = fbf_kernels.INTERPRETER, os.environ.get("TRITON_INTERPRET")
    with ma.fast_paths_assumed():
        assert fbf_kernels.INTERPRETER and os.environ["TRITON_INTERPRET"] == "1"
    assert (fbf_kernels.INTERPRETER, os.environ.get("TRITON_INTERPRET")) == before


def test_fast_path_saves_clearly_less_r101_crop876_batch2(ma, capsys):
    rows = [ma.account(path, "resnet101", 876, 2, "off") for path in ("bn_leaky_relu", "reference_abn", "fast")]
    with capsys.disabled():
        print("\n" + ma.format_table(rows))
    bn, abn, fast = rows
    for r in rows:                               # IFBFNet-R101 with 19 classes (DESIGN section 1)
        assert r["param_bytes"] == 60_017_190 * 4
    # the logits alone (out and aux, N x 19 x 876 x 876 fp32) are saved on every path
    assert fast["saved_bytes"] > 2 * 2 * 19 * 876 * 876 * 4
    assert fast["saved_bytes"] <= 0.75 * bn["saved_bytes"]
    assert fast["saved_bytes"] <= 0.60 * abn["saved_bytes"]
    assert fast["peak_step"] <= 0.75 * bn["peak_step"]
    assert fast["peak_step"] <= 0.60 * abn["peak_step"]
    for r in rows:                               # the peak holds at least what is saved for backward
        assert r["peak_step"] >= r["saved_bytes"]
