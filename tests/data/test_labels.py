"""The label tables against the official cityscapesscripts table."""

import numpy as np
from cityscapesscripts.helpers.labels import id2label, labels, name2label, trainId2label

from ifbf_fast.data import labels as L


def test_label_to_train_matches_official_for_every_id():
    assert L.LABEL_TO_TRAIN.dtype == np.uint8 and L.LABEL_TO_TRAIN.shape == (256,)
    for lab in labels:
        if lab.id < 0:
            continue
        expected = lab.trainId if 0 <= lab.trainId < 19 else 255
        assert L.LABEL_TO_TRAIN[lab.id] == expected, lab.name
    assert (L.LABEL_TO_TRAIN[34:] == 255).all()  # unknown byte values are ignored


def test_spot_checks():
    lut = L.LABEL_TO_TRAIN
    assert lut[name2label["road"].id] == 0 and lut[7] == 0
    assert lut[26] == 13 and L.CLASS_NAMES[13] == "car"
    assert lut[33] == 18 and L.CLASS_NAMES[18] == "bicycle"
    for ignored in ("unlabeled", "ego vehicle", "static", "dynamic", "parking", "rail track",
                    "guard rail", "bridge", "tunnel", "polegroup", "caravan", "trailer"):
        assert lut[name2label[ignored].id] == 255, ignored


def test_names_palette_and_inverse():
    assert L.NUM_CLASSES == len(L.CLASS_NAMES) == 19
    for t in range(19):
        assert L.CLASS_NAMES[t] == trainId2label[t].name
        assert tuple(L.PALETTE[t]) == trainId2label[t].color
        assert id2label[int(L.TRAIN_TO_LABEL[t])].trainId == t
        assert L.LABEL_TO_TRAIN[L.TRAIN_TO_LABEL[t]] == t
    assert L.TRAIN_TO_LABEL[255] == 0
    assert L.VALID_LABEL_IDS == frozenset(range(34))
    assert L.LABEL_ID["traffic sign"] == 20


def test_conversions():
    ids = np.array([[7, 8, 0, 200]], np.uint8)
    assert L.to_train_ids(ids).tolist() == [[0, 1, 255, 255]]
    assert L.to_train_ids(np.array([-1, 26, 300])).tolist() == [255, 13, 255]
    assert L.to_label_ids(np.array([0, 18, 255, 40])).tolist() == [7, 33, 0, 0]
    rgb = L.colorize(np.array([[0, 255]], np.uint8))
    assert rgb.tolist() == [[[128, 64, 128], [0, 0, 0]]]
