"""Synthetic city: layout, class content, determinism by seed, idempotent cache."""

import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ifbf_fast.data import LABEL_ID, LABEL_TO_TRAIN, CityscapesDataset, generate_city
from ifbf_fast.data import synthetic
from ifbf_fast.data.cityscapes import find_pairs, read_label_ids

SMALL = dict(n_train=3, n_val=1, height=48, width=96)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


def test_layout_and_cities(city):
    train, val = find_pairs(city, "train"), find_pairs(city, "val")
    assert len(train) == 6 and len(val) == 3
    assert {p.name.split("_")[0] for p in train} == set(synthetic.CITIES["train"])
    assert {p.name.split("_")[0] for p in val} == set(synthetic.CITIES["val"])
    for p in train + val:
        assert os.path.isfile(p.label_path.replace("_labelIds.png", "_color.png"))
    item = CityscapesDataset(city, "val")[0]
    assert item["image"].shape == (64, 128, 3) and item["label"].shape == (64, 128)


def test_label_ids_map_to_the_expected_train_classes(city):
    ids = set()
    for split in ("train", "val"):
        for p in find_pairs(city, split):
            ids |= set(np.unique(read_label_ids(p.label_path)).tolist())
    named = {LABEL_ID[n] for n in ("road", "sidewalk", "building", "vegetation", "sky", "car",
                                   "person", "pole", "traffic sign")}
    void = {LABEL_ID[n] for n in ("unlabeled", "ego vehicle", "static")}
    assert named <= ids and ids <= named | void
    assert ids & {LABEL_ID["ego vehicle"], LABEL_ID["static"]}  # some void pixels
    train_ids = {int(LABEL_TO_TRAIN[i]) for i in ids}
    assert train_ids == {0, 1, 2, 5, 7, 8, 10, 11, 13, 255}


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    a = generate_city(str(tmp_path / "a"), seed=3, **SMALL)
    b = generate_city(str(tmp_path / "b"), seed=3, **SMALL)
    c = generate_city(str(tmp_path / "c"), seed=4, **SMALL)
    files = _files(a)
    assert files == _files(b) == _files(c) and len(files) == 3 * 4 + 1
    assert all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False) for f in files)
    pngs = [f for f in files if f.endswith("leftImg8bit.png")]
    assert not any(filecmp.cmp(os.path.join(a, f), os.path.join(c, f), shallow=False) for f in pngs)


def test_reuse_regenerate_and_refuse(tmp_path, monkeypatch):
    out = str(tmp_path / "cache")
    generate_city(out, seed=0, **SMALL)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["params"]["n_train"] == 3

    def boom(*a, **k):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(synthetic, "_write_all", boom)
    assert generate_city(out, seed=0, **SMALL) == os.path.abspath(out)  # reused
    monkeypatch.undo()
    generate_city(out, seed=0, **dict(SMALL, n_train=2))  # other parameters: replaced
    assert len(find_pairs(out, "train")) == 2
    os.remove(find_pairs(out, "train")[0].label_path)  # incomplete: rebuilt
    generate_city(out, seed=0, **dict(SMALL, n_train=2))
    assert len(find_pairs(out, "train")) == 2
    assert [p for p in os.listdir(tmp_path) if p != "cache"] == []  # no temporary folders left

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_city(str(foreign), **SMALL)
    assert (foreign / "precious.txt").exists()


def test_cli(tmp_path):
    out = str(tmp_path / "cli")
    run = subprocess.run([sys.executable, "-m", "ifbf_fast.data.synthetic", "--out", out,
                          "--train", "2", "--val", "1", "--height", "32", "--width", "64",
                          "--seed", "2"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "RuntimeWarning" not in run.stderr
    assert len(find_pairs(out, "train")) == 2 and len(find_pairs(out, "val")) == 1
