"""``python -m ifbf_fast.data.prepare``: lossless .npy form, and the DALI loader reads it with the
same batches as the PNG form."""

import os
import shutil

import numpy as np
import pytest
import torch

from ifbf_fast.data import CityscapesDataset, read_image, read_label_ids
from ifbf_fast.data.prepare import (detect_form, find_prepared_pairs, main, prepare,
                                    prepared_paths)


@pytest.fixture(scope="module")
def prepared(city, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("prepared") / "npy")
    assert prepare(city, dst, workers=2) == []
    return dst


@pytest.mark.parametrize("split", ["train", "val"])
def test_lossless_and_same_order(city, prepared, split):
    pngs = CityscapesDataset(city, split).samples
    arrays = find_prepared_pairs(prepared, split)
    assert [s.name for s in arrays] == [s.name for s in pngs]
    for png, npy in zip(pngs, arrays):
        assert (npy.image_path, npy.label_path) == prepared_paths(prepared, split, png)
        image, label = np.load(npy.image_path), np.load(npy.label_path)
        assert image.dtype == label.dtype == np.uint8
        assert np.array_equal(image, read_image(png.image_path))            # RGB, as decoded
        assert np.array_equal(label, read_label_ids(png.label_path))        # labelIds, not trainIds
    assert detect_form(city, split) == "png" and detect_form(prepared, split) == "npy"


def test_cli_reports_bad_pairs(city, tmp_path, capsys):
    src = str(tmp_path / "src")
    shutil.copytree(city, src)
    bad = CityscapesDataset(src, "val").samples[1].image_path
    with open(bad, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2])
    assert main([src, str(tmp_path / "dst")]) == 1
    out = capsys.readouterr().out
    assert "truncated" in out and os.path.basename(bad) in out
    assert len(find_prepared_pairs(str(tmp_path / "dst"), "val")) == 2  # the others are there
    assert main([src, src]) == 1  # SRC == DST refused
    with pytest.raises(ValueError, match="must differ"):
        prepare(src, src)


@pytest.mark.parametrize("split,train", [("train", True), ("val", False)])
def test_dali_png_and_npy_batches_identical(city, prepared, split, train):
    pytest.importorskip("nvidia.dali")
    from ifbf_fast.data.dali import build_dali_loader

    kw = dict(batch_size=2 if train else 1, crop_size=(48, 80), seed=3)
    png = build_dali_loader(city, split, **kw)
    npy = build_dali_loader(prepared, split, **kw)
    assert (png.form, npy.form) == ("png", "npy") and len(png) == len(npy) > 0
    for epoch in (0, 1):
        png.set_epoch(epoch)
        npy.set_epoch(epoch)
        for a, b in zip(png, npy, strict=True):
            assert a["name"] == b["name"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_preflight_checks_prepared_form(prepared, tmp_path):
    from ifbf_fast.data import check_dataset

    report = check_dataset(prepared)
    assert report.ok and report.pairs == {"train": 6, "val": 3}, report.format()
    root = str(tmp_path / "bad")
    shutil.copytree(prepared, root)
    samples = find_prepared_pairs(root, "train")
    os.remove(samples[0].label_path)                                        # missing partner
    with open(samples[1].image_path, "r+b") as f:                           # truncated array
        f.truncate(200)
    np.save(samples[2].label_path, np.zeros((10, 10), np.uint8))            # size mismatch
    np.save(samples[3].label_path, np.full((64, 128), 40, np.uint8))        # not a labelId
    np.save(samples[4].image_path, np.zeros((64, 128, 3), np.float32))      # wrong dtype
    report = check_dataset(root)
    text = report.format()
    assert len(report.problems) == 5, text
    for needle, sample in (("has no label", samples[0]), ("cannot read prepared", samples[1]),
                           ("size mismatch", samples[2]), ("not Cityscapes labelIds", samples[3]),
                           ("must be uint8", samples[4])):
        line = next((p for p in report.problems if needle in p), None)
        assert line is not None and os.path.basename(sample.name) in line, (needle, text)
