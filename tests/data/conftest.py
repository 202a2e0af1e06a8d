"""Fixtures for the data tests: a small synthetic city (built once per session) and helpers to
write hand-made Cityscapes trees."""

import os

import cv2
import numpy as np
import pytest

from ifbf_fast.data import generate_city

CITY_PARAMS = dict(n_train=6, n_val=3, height=64, width=128, seed=1)


@pytest.fixture(scope="session")
def city(tmp_path_factory):
    """Path of a synthetic city: train 6 images (two cities), val 3, 64x128. Read-only: copy it
    before planting problems."""
    return generate_city(str(tmp_path_factory.mktemp("synthetic") / "city"), **CITY_PARAMS)


def write_pair(root, split, city, stem, image=None, label=None, size=(16, 24)):
    """Write one image (RGB) / labelIds pair in the official layout; return both paths."""
    h, w = size
    if image is None:
        image = np.full((h, w, 3), 100, np.uint8)
    if label is None:
        label = np.full((h, w), 7, np.uint8)  # road
    img_path = os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png")
    lab_path = os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")
    for p in (img_path, lab_path):
        os.makedirs(os.path.dirname(p), exist_ok=True)
    if image is not False:
        cv2.imwrite(img_path, np.ascontiguousarray(image[:, :, ::-1]))
    if label is not False:
        cv2.imwrite(lab_path, label)
    return img_path, lab_path
