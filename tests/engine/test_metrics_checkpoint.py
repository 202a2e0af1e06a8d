"""Confusion-matrix metrics on constructed predictions, and checkpoint writing/loading."""
import math
import os

import pytest
import torch

from ifbf_fast.engine import checkpoint as ck
from ifbf_fast.engine.metrics import ConfusionMatrix, format_table


def test_known_confusion_matrix():
    # 4 classes; class 3 absent from both prediction and ground truth: no IoU, not in the mean.
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 3, 1])
    cm = ConfusionMatrix(4)
    cm.update(pred.view(2, 5), target.view(2, 5))
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    assert torch.equal(cm.mat, expected)
    res = cm.compute()
    iou = [2 / 4, 2 / 3, 2 / 3]
    assert res["iou"][:3] == pytest.approx(iou)
    assert math.isnan(res["iou"][3])
    assert res["miou"] == pytest.approx(sum(iou) / 3)
    assert res["pixel_acc"] == pytest.approx(6 / 8)
    table = format_table(res, ["road", "car", "sky", "train"])
    assert "n/a" in table and "road" in table and f"{100 * sum(iou) / 3:.2f}" in table


@pytest.mark.parametrize("n", [19, 255])
def test_uint8_labels_give_the_int64_matrix(n):
    # The loaders' uint8 labels: target * n + pred would wrap in uint8; ignore 255 and the largest
    # class id n - 1 (254 for a 255-class table: 254 * 255 + 254 = 65024 wraps in int16 too).
    g = torch.Generator().manual_seed(n)
    target = torch.randint(0, n, (3, 11, 13), generator=g)
    pred = torch.randint(0, n, (3, 11, 13), generator=g)
    target[0, 0, :4] = 255
    target[1, 2, :5] = n - 1
    pred[1, 2, :3] = n - 1
    want, got = ConfusionMatrix(n), ConfusionMatrix(n)
    want.update(pred, target)
    got.update(pred.to(torch.uint8), target.to(torch.uint8))
    assert torch.equal(got.mat, want.mat) and int(got.mat[n - 1, n - 1]) >= 3
    assert int(got.mat.sum()) == int((target != 255).sum())


def test_update_order_and_batching_do_not_matter():
    pred, target = torch.randint(0, 5, (4, 7, 9)), torch.randint(0, 6, (4, 7, 9))
    target[target == 5] = 255
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred, target)
    for i in reversed(range(4)):
        b.update(pred[i], target[i])
    assert torch.equal(a.mat, b.mat)
    assert int(a.mat.sum()) == int((target != 255).sum())


def test_atomic_save_and_load(tmp_path):
    path = str(tmp_path / "a" / "ckpt.pt")
    ck.save_atomic({"model": {"w": torch.ones(2)}, "iteration": 3}, path)
    assert ck.load(path)["iteration"] == 3
    assert not [f for f in os.listdir(tmp_path / "a") if ".tmp." in f]
    with open(path, "wb") as f:
        f.write(b"truncated")
    with pytest.raises(ck.CheckpointError, match="could not be read"):
        ck.load(path)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load(str(tmp_path / "missing.pt"))


def test_meta_mismatch_is_named(tmp_path):
    with pytest.raises(ck.CheckpointError, match="num_classes: checkpoint 19 vs this run 8"):
        ck.check_meta({"num_classes": 19, "backbone": "resnet18"}, {"num_classes": 8, "backbone": "resnet18"}, "x.pt")


def test_prune_and_latest(tmp_path):
    for it in (5, 10, 15, 20):
        ck.save_atomic({"model": {}}, str(tmp_path / ck.CKPT_PATTERN.format(it)))
    ck.prune(str(tmp_path), keep_last=2)
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path))] == ["iter_00000015.pt", "iter_00000020.pt"]
    assert ck.latest(str(tmp_path)).endswith("iter_00000020.pt")


def test_rng_state_round_trip(tmp_path):
    import random
    import numpy as np
    state = ck.rng_state()
    ck.save_atomic({"model": {}, "rng": state}, str(tmp_path / "r.pt"))
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(ck.load(str(tmp_path / "r.pt"))["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_load_newest_skips_what_does_not_load(tmp_path):
    for it in (1, 2, 3):
        ck.save_atomic({"model": {}, "iteration": it}, str(tmp_path / ck.CKPT_PATTERN.format(it)))
    (tmp_path / ck.CKPT_PATTERN.format(3)).write_bytes(b"PK\x03\x04cut")          # cut short
    (tmp_path / ck.CKPT_PATTERN.format(4)).write_bytes(b"")                       # empty
    path, state, skipped = ck.load_newest(str(tmp_path))
    assert path.endswith("iter_00000002.pt") and state["iteration"] == 2
    assert [s.split(" could not")[0] for s in skipped] == [f"checkpoint {tmp_path / ck.CKPT_PATTERN.format(i)}"
                                                           for i in (4, 3)]
    assert ck.load_newest(str(tmp_path / "none")) == (None, None, [])


def test_stale_temporaries_only_ours_and_only_dead_writers(tmp_path):
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {f".iter_00000010.pt.tmp.{dead.pid}": False, f".best.pt.tmp.{dead.pid}": False,
             f".iter_00000010.pt.tmp.{os.getpid()}": False,            # this process is not writing yet
             f".iter_00000011.pt.tmp.{os.getppid()}": True,            # a live writer
             "iter_00000010.pt.tmp.1": True, ".iter_00000010.pt.tmp.abc": True, ".other.pt.tmp.1": True}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = ck.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(n for n, kept in names.items() if not kept)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, kept in names.items() if kept)
    # save_atomic writes through exactly the name that is cleaned up
    assert ck.TMP_RE.match(os.path.basename(ck.tmp_path(str(tmp_path / "iter_00000012.pt"))))


def test_refused_pickle_reason_is_short(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    torch.save({"model": Evil()}, str(tmp_path / "e.pt"))
    with pytest.raises(ck.CheckpointError) as exc:
        ck.load(str(tmp_path / "e.pt"))
    msg = str(exc.value)
    assert "pickles Python objects such as" in msg and "nothing in it was run" in msg and "\n" not in msg
    assert "Re-running" not in msg                # torch's advice to load with weights_only=False is dropped


def test_mismatch_is_a_usage_error():
    with pytest.raises(ck.CheckpointMismatch) as exc:
        ck.check_meta({"aux": True}, {"aux": False}, "x.pt")
    assert isinstance(exc.value, ck.CheckpointError) and exc.value.exit_code == 2


def test_failed_write_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "iter_00000002.pt")
    ck.save_atomic({"model": {}, "iteration": 1}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed\nmore lines")
    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(ck.CheckpointError, match=r"cannot write checkpoint .*iter_00000002.pt \(.*file write failed\)"):
        ck.save_atomic({"model": {}, "iteration": 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["iter_00000002.pt"] and ck.load(path)["iteration"] == 1
    with pytest.raises(ck.CheckpointError, match="cannot write checkpoint"):
        ck.save_atomic({"model": {}}, str(tmp_path / "iter_00000002.pt" / "x.pt"))   # a file where a folder belongs
