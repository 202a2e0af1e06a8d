"""Reader: pairing by stem, every layout error (one line, specific), decoding errors."""

import os

import numpy as np
import pytest

from ifbf_fast.data import (CityscapesDataset, DataReadError, DatasetLayoutError, find_pairs,
                            read_image, read_label)

from .conftest import write_pair


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_pairs_by_stem_sorted(tmp_path):
    root = str(tmp_path)
    write_pair(root, "train", "b_city", "b_city_000001_000019")
    write_pair(root, "train", "a_city", "a_city_000000_000019")
    write_pair(root, "train", "a_city", "a_city_000002_000019")
    pairs = find_pairs(root, "train")
    assert [p.name for p in pairs] == ["a_city_000000_000019", "a_city_000002_000019",
                                       "b_city_000001_000019"]
    for p in pairs:
        assert os.path.basename(p.image_path) == p.name + "_leftImg8bit.png"
        assert os.path.basename(p.label_path) == p.name + "_gtFine_labelIds.png"
        assert os.sep + os.path.join("gtFine", "train") + os.sep in p.label_path


def test_dataset_item(tmp_path):
    root = str(tmp_path)
    image = np.zeros((16, 24, 3), np.uint8)
    image[..., 0] = 200  # red in RGB: checks the BGR -> RGB conversion
    label = np.full((16, 24), 26, np.uint8)  # car
    label[0, 0] = 1  # ego vehicle -> ignore
    write_pair(root, "val", "c", "c_000000_000019", image, label)
    ds = CityscapesDataset(root, "val")
    item = ds[0]
    assert len(ds) == 1 and item["name"] == "c_000000_000019"
    assert item["image"].shape == (16, 24, 3) and item["image"].dtype == np.uint8
    assert (item["image"][..., 0] == 200).all() and (item["image"][..., 2] == 0).all()
    assert item["label"].dtype == np.uint8 and item["label"][0, 0] == 255
    assert (item["label"].ravel()[1:] == 13).all()
    ds2 = CityscapesDataset(root, "val", transform=lambda i, lab: (i[:2], lab[:2]))
    assert ds2[0]["image"].shape == (2, 24, 3)


def test_root_missing(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        find_pairs(str(tmp_path / "nope"), "train")
    assert "does not exist" in _one_line(e) and "nope" in str(e.value)


def test_not_a_cityscapes_layout_names_expected_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetLayoutError) as e:
        find_pairs(str(tmp_path), "train")
    assert os.path.join(str(tmp_path), "leftImg8bit", "train") in _one_line(e)
    # images present, gtFine missing: the gtFine folder is named
    (tmp_path / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError) as e:
        find_pairs(str(tmp_path), "train")
    assert os.path.join(str(tmp_path), "gtFine", "train") in _one_line(e)


def test_image_without_label_names_both(tmp_path):
    root = str(tmp_path)
    write_pair(root, "train", "c", "c_000000_000019")
    img, lab = write_pair(root, "train", "c", "c_000001_000019", label=False)
    with pytest.raises(DatasetLayoutError) as e:
        find_pairs(root, "train")
    msg = _one_line(e)
    assert img in msg and lab in msg


def test_no_images_in_split(tmp_path):
    for d in ("leftImg8bit/val/c", "gtFine/val/c"):
        (tmp_path / d).mkdir(parents=True)
    with pytest.raises(DatasetLayoutError) as e:
        find_pairs(str(tmp_path), "val")
    assert "no images" in _one_line(e) and "'val'" in str(e.value)


def test_truncated_and_garbage_files_name_the_file(tmp_path):
    root = str(tmp_path)
    img, lab = write_pair(root, "train", "c", "c_000000_000019")
    data = open(img, "rb").read()
    open(img, "wb").write(data[: len(data) // 2])
    with pytest.raises(DataReadError, match="truncated") as e:
        read_image(img)
    assert img in str(e.value)
    with pytest.raises(DataReadError) as e:
        CityscapesDataset(root, "train")[0]
    assert img in str(e.value)
    open(lab, "wb").write(b"not a png at all")
    with pytest.raises(DataReadError) as e:
        read_label(lab)
    assert lab in str(e.value)
    with pytest.raises(DataReadError) as e:
        read_image(str(tmp_path / "missing.png"))
    assert "missing.png" in str(e.value)


def test_size_mismatch_in_dataset_names_both(tmp_path):
    root = str(tmp_path)
    img, lab = write_pair(root, "train", "c", "c_000000_000019",
                          label=np.full((8, 8), 7, np.uint8))
    with pytest.raises(DataReadError) as e:
        CityscapesDataset(root, "train")[0]
    assert img in str(e.value) and lab in str(e.value)
