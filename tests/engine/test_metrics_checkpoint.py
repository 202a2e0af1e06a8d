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
