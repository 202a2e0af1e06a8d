"""Your own data: the class table (classes.yaml), the folder layout's reader, layout detection, both
loaders and the preflight on a folder-layout root, and the synthetic city written in that layout."""

import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from ifbf_fast.data import (CITYSCAPES, ClassTableError, DatasetLayoutError, build_loader, class_table_of,
                            detect_layout, generate_city, list_samples, load_class_table, open_dataset)
from ifbf_fast.data.check import check_dataset
from ifbf_fast.data.classes import ClassTable, generic_table, label_dtype
from ifbf_fast.data.folder import FolderDataset
from ifbf_fast.data.labels import LABEL_TO_TRAIN, PALETTE
from ifbf_fast.data.synthetic import FOLDER_CLASSES

TABLE = ("ignore_id: 0\nclasses:\n  - {name: road, id: 7, color: [128, 64, 128]}\n"
         "  - {name: car, id: 26, color: [0, 0, 142]}\n  - {name: sky, id: 200, color: [70, 130, 180]}\n")


@pytest.fixture(scope="module")
def folder_city(tmp_path_factory):
    """The synthetic city in the folder layout: train 4, val 2, 48x96 (read-only: copy to plant problems)."""
    return generate_city(str(tmp_path_factory.mktemp("folder") / "city"), n_train=4, n_val=2, height=48,
                         width=96, seed=2, layout="folder")


def write_root(root, table=TABLE, images=None, splits=None):
    """A hand-made folder-layout root: ``images`` {name: (image, mask)}, ``splits`` {split: text}."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "classes.yaml"), "w") as f:
        f.write(table)
    for name, (image, mask) in (images or {}).items():
        for sub, array, ext in (("images", image, ".png"), ("masks", mask, ".png")):
            if array is None:
                continue
            path = os.path.join(root, sub, name + ext)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            cv2.imwrite(path, array[:, :, ::-1] if array.ndim == 3 else array)
    os.makedirs(os.path.join(root, "splits"), exist_ok=True)
    for split, text in (splits or {}).items():
        with open(os.path.join(root, "splits", f"{split}.txt"), "w") as f:
            f.write(text)
    return str(root)


# --- the class table ----------------------------------------------------------------------------

def test_class_table_from_yaml(tmp_path):
    path = tmp_path / "classes.yaml"
    path.write_text(TABLE)
    t = load_class_table(str(path))
    assert t.names == ("road", "car", "sky") and t.ids == (7, 26, 200) and t.num_classes == 3 and t.ignore_id == 0
    assert t.palette.tolist() == [[128, 64, 128], [0, 0, 142], [70, 130, 180]]
    lut = np.full(256, 255, np.uint8)
    lut[[7, 26, 200]] = [0, 1, 2]
    assert np.array_equal(t.lut, lut)            # ignore_id and every unlisted value -> 255
    assert t.valid_ids == {0, 7, 26, 200}
    pred = np.array([[0, 1], [2, 255]], np.uint8)
    assert t.to_mask_ids(pred).tolist() == [[7, 26], [200, 0]]       # ignore -> ignore_id
    assert t.colorize(pred)[1, 1].tolist() == [0, 0, 0] and t.colorize(pred)[0, 1].tolist() == [0, 0, 142]
    assert ClassTable.from_dict(t.to_dict()) == t and ClassTable.from_dict(CITYSCAPES.to_dict()) is CITYSCAPES
    path.write_text("classes:\n  - {name: a, id: 1, color: [1, 2, 3]}\n")
    assert load_class_table(str(path)).ignore_id == 255                # the default


def test_label_dtype_rule():
    """The one rule both loaders use: the narrowest of uint8 / int16 / int32 holding the train ids and
    the ignore id; every class table (at most 255 classes besides the ignore id) gives uint8."""
    assert CITYSCAPES.label_dtype == np.uint8 and generic_table(255).label_dtype == np.uint8
    assert label_dtype(19) == np.uint8 and label_dtype(1, 0) == np.uint8
    assert label_dtype(257) == np.int16 and label_dtype(19, -1) == np.int16 and label_dtype(19, 256) == np.int16
    assert label_dtype(40000) == np.int32 and label_dtype(19, -40000) == np.int32
    with pytest.raises(ValueError, match="no label dtype holds train ids 0..2147483648"):
        label_dtype(2 ** 31 + 1)


def test_cityscapes_table_is_the_official_one():
    t = CITYSCAPES
    assert t.num_classes == 19 and t.names[0] == "road" and t.names[-1] == "bicycle"
    assert np.array_equal(t.lut, LABEL_TO_TRAIN) and np.array_equal(t.palette, PALETTE)
    assert t.to_mask_ids(np.array([0, 18, 255], np.uint8)).tolist() == [7, 33, 0]
    g = generic_table(3)
    assert g.names == ("0", "1", "2") and g.palette.shape == (3, 3)


BAD_TABLES = [  # (classes.yaml text, expected text)
    ("classes: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping with the keys ignore_id and classes"),
    ("ignore_id: 255\n", "missing key 'classes'"),
    ("ignore: 255\nclasses: []\n", "unknown key(s) ['ignore']"),
    ("classes: []\n", "classes must be a non-empty list"),
    ("classes:\n  - {name: road, color: [1, 2, 3]}\n", "class 0 (road): missing key 'id'"),
    ("classes:\n  - {id: 3, color: [1, 2, 3]}\n", "class 0: missing key 'name'"),
    ("classes:\n  - {name: road, id: 3}\n", "class 0 (road): missing key 'color'"),
    ("classes:\n  - {name: road, id: 3, color: [1, 2, 3], colour: red}\n", "unknown key(s) ['colour']"),
    ("classes:\n  - {name: a, id: 3, color: [1, 2, 3]}\n  - {name: a, id: 4, color: [1, 2, 3]}\n",
     "class 1 (a): duplicate name 'a' (also class 0)"),
    ("classes:\n  - {name: a, id: 3, color: [1, 2, 3]}\n  - {name: b, id: 3, color: [1, 2, 3]}\n",
     "class 1 (b): duplicate id 3 (also class 0, a)"),
    ("classes:\n  - {name: a, id: 300, color: [1, 2, 3]}\n", "class 0 (a): id 300 is outside 0..255"),
    ("classes:\n  - {name: a, id: -1, color: [1, 2, 3]}\n", "id -1 is outside 0..255"),
    ("classes:\n  - {name: a, id: 2.5, color: [1, 2, 3]}\n", "id must be an integer in 0..255, got 2.5"),
    ("classes:\n  - {name: a, id: true, color: [1, 2, 3]}\n", "id must be an integer in 0..255, got True"),
    ("classes:\n  - {name: a, id: 1, color: [1, 2]}\n", "color must be three bytes [R, G, B] in 0..255, got [1, 2]"),
    ("classes:\n  - {name: a, id: 1, color: [1, 2, 256]}\n", "color must be three bytes"),
    ("classes:\n  - {name: a, id: 1, color: red}\n", "color must be three bytes"),
    ("ignore_id: 1\nclasses:\n  - {name: a, id: 1, color: [1, 2, 3]}\n", "class 0 (a): id 1 is the ignore_id"),
    ("ignore_id: 256\nclasses:\n  - {name: a, id: 1, color: [1, 2, 3]}\n", "ignore_id 256 is outside 0..255"),
    ("classes:\n  - {name: '', id: 1, color: [1, 2, 3]}\n", "name must be a non-empty string"),
]


@pytest.mark.parametrize("text, expected", BAD_TABLES, ids=[e for _, e in BAD_TABLES])
def test_bad_class_table_is_one_line_naming_the_file(text, expected, tmp_path):
    path = tmp_path / "classes.yaml"
    path.write_text(text)
    with pytest.raises(ClassTableError) as exc:
        load_class_table(str(path))
    msg = str(exc.value)
    assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg, msg
    assert isinstance(exc.value, DatasetLayoutError)       # the command lines' data error (exit 1)


# --- the layout ---------------------------------------------------------------------------------

def test_detection_and_reader(tmp_path, folder_city, city):
    assert detect_layout(folder_city) == "folder" and detect_layout(city) == "cityscapes"
    assert class_table_of(city) is CITYSCAPES and class_table_of(folder_city).names == FOLDER_CLASSES
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    mask = np.array([7, 26, 200, 0, 5] * 9 + [7, 7, 7], np.uint8).reshape(6, 8)
    root = write_root(tmp_path / "r", images={"a/one": (image, mask), "two": (image, mask)},
                      splits={"train": "# comment\n two \n\na/one\n"})
    ds = open_dataset(root, "train")
    assert isinstance(ds, FolderDataset) and ds.names == ["two", "a/one"]        # the list's order
    img, label, name = ds.load(1)
    assert name == "a/one" and np.array_equal(img, image)
    expected = np.full(mask.shape, 255, np.uint8)        # 0 is the ignore_id, 5 an unknown value
    expected[mask == 7], expected[mask == 26], expected[mask == 200] = 0, 1, 2
    assert np.array_equal(label, expected)
    assert [s.name for s in list_samples(root, "train")] == ["two", "a/one"]
    with pytest.raises(DatasetLayoutError, match="has no split 'val'"):
        list_samples(root, "val")


def test_loaders_agree_on_the_folder_layout(folder_city, city):
    """The synthetic city in both layouts: the same scenes, so the same batches (train and val) from
    the reference loader; and DALI's batches equal the reference's on the folder layout."""
    ids = [CITYSCAPES.names.index(n) for n in FOLDER_CLASSES]       # cityscapes train id of each folder class
    back = np.full(256, 255, np.int64)
    back[:len(ids)] = ids
    cs = generate_city(os.path.join(os.path.dirname(folder_city), "cs"), n_train=4, n_val=2, height=48, width=96,
                       seed=2)
    for split, kw in (("train", dict(batch_size=2, crop_size=32)), ("val", dict(train=False))):
        a, b = build_loader(folder_city, split, workers=0, **kw), build_loader(cs, split, workers=0, **kw)
        a.set_epoch(0), b.set_epoch(0)
        ba, bb = next(iter(a)), next(iter(b))
        assert ba["name"] == bb["name"] and np.array_equal(ba["image"], bb["image"])
        assert ba["label"].dtype == bb["label"].dtype == torch.uint8
        assert np.array_equal(back[ba["label"].numpy()], bb["label"].numpy())
    pytest.importorskip("nvidia.dali")
    from ifbf_fast.data.dali import build_dali_loader

    for split, kw in (("train", dict(batch_size=2, crop_size=32)), ("val", dict(train=False))):
        ref, dali = build_loader(folder_city, split, workers=0, **kw), build_dali_loader(folder_city, split, workers=1,
                                                                                          **kw)
        ref.set_epoch(1), dali.set_epoch(1)
        r, d = next(iter(ref)), next(iter(dali))
        assert r["name"] == d["name"] and np.array_equal(r["label"], d["label"])
        assert r["label"].dtype == d["label"].dtype == torch.uint8
        assert float((r["image"] - d["image"]).abs().max()) < 1e-3


def test_jpeg_images(tmp_path):
    pytest.importorskip("nvidia.dali")
    from ifbf_fast.data.dali import build_dali_loader

    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8), (5, 5), 2)
    mask = np.full((20, 28), 7, np.uint8)
    mask[:, 14:] = 26
    root = write_root(tmp_path / "r", images={"x": (None, mask)}, splits={"val": "x\n"})
    os.makedirs(os.path.join(root, "images"))
    assert cv2.imwrite(os.path.join(root, "images", "x.jpg"), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert check_dataset(root, ("val",)).ok
    ref = next(iter(build_loader(root, "val", workers=0)))
    dali = next(iter(build_dali_loader(root, "val", workers=1)))
    assert ref["image"].shape == dali["image"].shape == (1, 3, 20, 28)
    assert np.array_equal(ref["label"], dali["label"]) and ref["label"].dtype == dali["label"].dtype == torch.uint8
    assert float((ref["image"] - dali["image"]).abs().mean()) < 0.05      # two JPEG decoders, close


# --- the preflight ------------------------------------------------------------------------------

def test_preflight_lists_every_problem(tmp_path):
    good = (np.zeros((6, 8, 3), np.uint8), np.full((6, 8), 7, np.uint8))
    bad_ids = np.full((6, 8), 7, np.uint8)
    bad_ids[0, :3] = 99
    root = write_root(tmp_path / "r", images={
        "ok": good, "nomask": (good[0], None), "small": (np.zeros((5, 8, 3), np.uint8), good[1]),
        "odd": (good[0], bad_ids), "twice": good},
        splits={"train": "ok\nnomask\nsmall\nodd\nmissing\nok\nimg.png\n../up\n", "val": ""})
    cv2.imwrite(os.path.join(root, "images", "twice.jpg"), good[0])
    with open(os.path.join(root, "splits", "val.txt"), "a") as f:
        f.write("twice\n")
    report = check_dataset(root, ("train", "val", "test"), workers=1)
    text = "\n".join(report.problems)
    lst = os.path.join(root, "splits", "train.txt")
    for expected in (f"{lst}:2: 'nomask' has no mask: expected {os.path.join(root, 'masks', 'nomask.png')!r}",
                     f"{lst}:5: 'missing' has no image: expected", f"{lst}:6: 'ok' is listed twice (also line 1)",
                     f"{lst}:7: 'img.png' has no image", "(list NAMEs without their extension)",
                     f"{lst}:8: '../up' must be a path inside images/", "'twice' has several images",
                     "size mismatch: image", "small.png' is 8x5",
                     "has values that are not ids of classes.yaml (nor its ignore_id 0): 99 (3 px)",
                     "has no split 'test': expected the list"):
        assert expected in text, (expected, text)
    assert len(report.problems) == 10, text      # "missing" has neither image nor mask (two lines)
    assert report.pairs == {"train": 3, "val": 0, "test": 0}
    shutil.copy(os.path.join(root, "classes.yaml"), tmp_path / "keep.yaml")
    with open(os.path.join(root, "classes.yaml"), "w") as f:
        f.write("classes: {}\n")
    report = check_dataset(root)
    assert len(report.problems) == 1 and "classes.yaml: classes must be a non-empty list" in report.problems[0]


def test_synthetic_folder_layout_cli_and_check(tmp_path, capsys):
    """``python -m ifbf_fast.data.synthetic --layout folder`` then ``python -m ifbf_fast.data.check`` (their
    ``main``s, in this process: a subprocess would import torch again, ~20 s on CI's two cores)."""
    from ifbf_fast.data.check import main as check_main
    from ifbf_fast.data.synthetic import main as synthetic_main

    out = tmp_path / "f"
    assert synthetic_main(["--out", str(out), "--train", "2", "--val", "1", "--height", "32", "--width", "64",
                           "--layout", "folder"]) == 0
    assert "folder layout" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["classes.yaml", "images", "manifest.json", "masks", "splits"]
    assert open(out / "splits" / "val.txt").read().split() == ["gammaheim_000000_000019"]
    assert check_main([str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("train: 2 pairs, val: 1 pairs; OK")
