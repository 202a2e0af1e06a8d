"""Reader for the official Cityscapes folder layout.

    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png      8-bit RGB image
    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png        8-bit labelIds

An image and its label are paired by the stem ``{city}_{seq}_{frame}``. ``find_pairs`` checks the
layout before any work starts and fails with one specific line (``DatasetLayoutError``); the full
preflight that reads every file and lists *all* problems is ``ifbf_fast.data.check``.

Decoding goes through ``read_image`` / ``read_label``: the file bytes are read with numpy, a PNG
without its final IEND chunk is reported as truncated (libpng would otherwise print a warning and
OpenCV return None or, for some truncations, a partly black image), and a failed decode raises
``DataReadError`` naming the file, so a bad file never surfaces as a cryptic error deep inside a
DataLoader worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from glob import escape as glob_escape
from glob import glob

import cv2
import numpy as np

from .classes import CITYSCAPES
from .errors import DataReadError, DatasetLayoutError  # noqa: F401  (also this module's API)
from .labels import LABEL_TO_TRAIN

IMAGE_DIR = "leftImg8bit"
LABEL_DIR = "gtFine"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every complete PNG ends with


@dataclass(frozen=True)
class Sample:
    """One image/label pair: ``name`` is the stem ``{city}_{seq}_{frame}``."""

    name: str
    image_path: str
    label_path: str


def stem_of(image_path: str) -> str:
    """``.../aachen_000000_000019_leftImg8bit.png`` -> ``aachen_000000_000019``."""
    return os.path.basename(image_path)[: -len(IMAGE_SUFFIX)]


def label_path_for(root: str, split: str, image_path: str) -> str:
    """Where the labelIds PNG of ``image_path`` must be."""
    city = os.path.basename(os.path.dirname(image_path))
    return os.path.join(root, LABEL_DIR, split, city, stem_of(image_path) + LABEL_SUFFIX)


def check_layout(root: str, split: str) -> tuple[str, str]:
    """Check that ``root`` holds ``leftImg8bit/{split}`` and ``gtFine/{split}``; return both paths."""
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"Cityscapes root {root!r} does not exist or is not a folder")
    image_dir = os.path.join(root, IMAGE_DIR, split)
    label_dir = os.path.join(root, LABEL_DIR, split)
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise DatasetLayoutError(
                f"{root!r} is not a Cityscapes layout for split {split!r}: expected the folder "
                f"{folder!r} (ROOT/{IMAGE_DIR}/{split}/CITY/*{IMAGE_SUFFIX} and "
                f"ROOT/{LABEL_DIR}/{split}/CITY/*{LABEL_SUFFIX}), or, for your own data, the folder "
                f"layout's ROOT/classes.yaml")
    return image_dir, label_dir


def list_images(root: str, split: str) -> list[str]:
    """Sorted image paths of a split (layout checked first)."""
    image_dir, _ = check_layout(root, split)
    # escape: a user folder named e.g. "data[1]" must not be read as a glob pattern
    return sorted(glob(os.path.join(glob_escape(image_dir), "*", "*" + IMAGE_SUFFIX)))


def find_pairs(root: str, split: str) -> list[Sample]:
    """All image/label pairs of ``split``, sorted by stem; raises ``DatasetLayoutError`` on the
    first layout problem (missing root or split folder, an image without its label, no images)."""
    images = list_images(root, split)
    if not images:
        raise DatasetLayoutError(
            f"no images in split {split!r}: nothing matches "
            f"{os.path.join(root, IMAGE_DIR, split, 'CITY', '*' + IMAGE_SUFFIX)!r}")
    samples = []
    for image_path in images:
        label_path = label_path_for(root, split, image_path)
        if not os.path.isfile(label_path):
            folder = os.path.dirname(label_path)
            if os.path.isdir(folder) and not os.access(folder, os.R_OK | os.X_OK):
                raise DataReadError(f"cannot read the folder {folder!r} (permission denied)")
            raise DatasetLayoutError(
                f"image {image_path!r} has no label: expected {label_path!r}")
        samples.append(Sample(stem_of(image_path), image_path, label_path))
    samples.sort(key=lambda s: s.name)
    return samples


def _read_bytes(path: str) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataReadError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
    if data.size == 0:
        raise DataReadError(f"cannot decode {path!r}: the file is empty")
    if path.lower().endswith(".png"):
        if data[:8].tobytes() != _PNG_SIGNATURE:
            raise DataReadError(f"cannot decode {path!r}: not a PNG file (bad signature)")
        if data[-12:].tobytes() != _PNG_IEND:
            raise DataReadError(f"cannot decode {path!r}: truncated PNG (no IEND chunk at the end)")
    return data


def png_size(path: str) -> tuple[int, int]:
    """(H, W) of a PNG from its IHDR header, without decoding (e.g. to draw ``AugParams``)."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataReadError(f"cannot read the size of {path!r}: not a PNG file")
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def read_image(path: str) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 **RGB**; raises ``DataReadError`` naming the file."""
    image = cv2.imdecode(_read_bytes(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataReadError(f"cannot decode image {path!r} (corrupt or unsupported)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label_ids(path: str) -> np.ndarray:
    """Decode a ``*_labelIds.png`` to (H, W) uint8 labelIds, exactly as stored (no mapping)."""
    label = cv2.imdecode(_read_bytes(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DataReadError(f"cannot decode label {path!r} (corrupt or unsupported)")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DataReadError(
            f"label {path!r} must be a single-channel 8-bit labelIds PNG, got shape "
            f"{label.shape} dtype {label.dtype}")
    return label


def read_label(path: str) -> np.ndarray:
    """Decode a ``*_labelIds.png`` and map it to (H, W) uint8 trainIds (255 = ignore)."""
    return LABEL_TO_TRAIN[read_label_ids(path)]


class CityscapesDataset:
    """Map-style dataset over one split.

    ``ds[i]`` returns ``{"image": (H, W, 3) uint8 RGB, "label": (H, W) uint8 trainIds,
    "name": stem}``; with ``transform``, ``image, label = transform(image, label)`` is applied
    before the dict is built. The layout is checked in the constructor (``DatasetLayoutError``);
    a file that fails to decode raises ``DataReadError`` naming it; an image whose label has a
    different size raises ``DataReadError`` naming both.
    """

    #: what the error for a size mismatch calls the label file
    label_word = "label"

    def __init__(self, root: str, split: str, transform=None):
        self.root = os.fspath(root)
        self.split = split
        self.transform = transform
        self.classes = CITYSCAPES       # the class table; FolderDataset reads its own from classes.yaml
        self.samples = self.find_samples(self.root, split)

    @staticmethod
    def find_samples(root: str, split: str) -> list[Sample]:
        """The split's samples, checked (``DatasetLayoutError``): ``find_pairs`` for this layout."""
        return find_pairs(root, split)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.samples]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """The raw pair (RGB uint8 image, uint8 train ids through the class table's ``lut``) and its
        name, without the transform."""
        sample = self.samples[index]
        image = read_image(sample.image_path)
        label = read_label_ids(sample.label_path)
        if image.shape[:2] != label.shape:
            raise DataReadError(
                f"image {sample.image_path!r} is {image.shape[1]}x{image.shape[0]} but its {self.label_word} "
                f"{sample.label_path!r} is {label.shape[1]}x{label.shape[0]}")
        return image, self.classes.lut[label], sample.name

    def __getitem__(self, index: int) -> dict:
        image, label, name = self.load(index)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return {"image": image, "label": label, "name": name}
