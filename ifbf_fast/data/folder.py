"""Your own data: the folder layout, its reader, and the choice between it and Cityscapes.

    ROOT/classes.yaml              the class table (``ifbf_fast.data.classes``: names, ids, colours, ignore_id)
    ROOT/images/NAME.png|.jpg      RGB images (.jpeg too)
    ROOT/masks/NAME.png            single-channel 8-bit PNG; pixel values are the ids of classes.yaml
    ROOT/splits/train.txt          one NAME per line (also val.txt; test.txt or any SPLIT.txt optional)

A NAME is a path relative to ``images/`` and ``masks/`` without its extension (``street/0001`` is
``images/street/0001.png``); blank lines and lines starting with ``#`` are skipped. Samples come in
the order of the list. A mask value that is a listed id maps to its train id, the ignore_id to 255;
see ``classes`` for unknown values (ignored by the loaders, reported by the preflight).

**Which layout a root holds** (``detect_layout``): ``classes.yaml`` present -> ``"folder"``; otherwise
``"cityscapes"`` (``leftImg8bit/`` + ``gtFine/``), whose own checks say what is missing. The functions
below take either root, so the loaders, train.py, evaluate, predict and the preflight do too:
``class_table_of(root)``, ``list_samples(root, split)`` (``Sample`` pairs, first layout problem as
``DatasetLayoutError``), ``open_dataset(root, split)`` (``FolderDataset`` or ``CityscapesDataset``).
"""

from __future__ import annotations

import os

from .cityscapes import CityscapesDataset, DataReadError, DatasetLayoutError, Sample, find_pairs
from .classes import CITYSCAPES, ClassTable, load_class_table

CLASSES_FILE = "classes.yaml"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
SPLITS_DIR = "splits"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MASK_EXTENSION = ".png"
LAYOUT = (f"ROOT/{CLASSES_FILE}, ROOT/{IMAGES_DIR}/NAME.png|.jpg, ROOT/{MASKS_DIR}/NAME.png, "
          f"ROOT/{SPLITS_DIR}/SPLIT.txt")


def is_folder_layout(root) -> bool:
    return os.path.isfile(os.path.join(os.fspath(root), CLASSES_FILE))


def detect_layout(root) -> str:
    """``"folder"`` when ``root/classes.yaml`` exists, else ``"cityscapes"``."""
    return "folder" if is_folder_layout(root) else "cityscapes"


def class_table_of(root) -> ClassTable:
    """The class table of the dataset at ``root``: its classes.yaml, or Cityscapes' 19 classes."""
    if is_folder_layout(root):
        return load_class_table(os.path.join(os.fspath(root), CLASSES_FILE))
    return CITYSCAPES


def split_list_path(root, split: str) -> str:
    return os.path.join(os.fspath(root), SPLITS_DIR, f"{split}.txt")


def read_split_list(root, split: str) -> list[tuple[int, str]]:
    """(line number, NAME) of every entry of ``splits/SPLIT.txt``; ``DatasetLayoutError`` when the
    list is missing or unreadable."""
    path = split_list_path(root, split)
    if not os.path.isfile(path):
        raise DatasetLayoutError(f"{os.fspath(root)!r} (folder layout) has no split {split!r}: expected the "
                                 f"list {path!r} (one NAME per line; {LAYOUT})")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataReadError(f"cannot read the split list {path!r} ({getattr(exc, 'strerror', None) or exc})") \
            from None
    return [(i + 1, ln.strip()) for i, ln in enumerate(lines) if ln.strip() and not ln.strip().startswith("#")]


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a NAME (absolute, leaves the folder), or None."""
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
        return "must be a path inside images/ (not absolute, no '..')"
    return None


def image_candidates(root, name: str) -> list[str]:
    """The existing ``images/NAME.EXT`` files (every accepted extension)."""
    base = os.path.join(os.fspath(root), IMAGES_DIR, name)
    return [base + ext for ext in IMAGE_EXTENSIONS if os.path.isfile(base + ext)]


def mask_path(root, name: str) -> str:
    return os.path.join(os.fspath(root), MASKS_DIR, name + MASK_EXTENSION)


def _missing_image(root, split_file: str, line: int, name: str) -> str:
    hint = (" (list NAMEs without their extension)" if name.lower().endswith(IMAGE_EXTENSIONS) else "")
    base = os.path.join(os.fspath(root), IMAGES_DIR, name)
    return f"{split_file}:{line}: {name!r} has no image: expected {base + '.png'!r} (or .jpg, .jpeg){hint}"


def scan_split(root, split: str) -> tuple[list[Sample], list[str]]:
    """(complete pairs, problems) of one split of a folder-layout root: every entry of the list is
    looked at (bad name, duplicate, no image, several images, no mask). A missing list raises."""
    root = os.fspath(root)
    entries = read_split_list(root, split)
    split_file = split_list_path(root, split)
    samples, problems, seen = [], [], {}
    if not entries:
        problems.append(f"split {split!r}: the list {split_file!r} names no images")
    for line, name in entries:
        why = name_problem(name)
        if why:
            problems.append(f"{split_file}:{line}: {name!r} {why}")
            continue
        if name in seen:
            problems.append(f"{split_file}:{line}: {name!r} is listed twice (also line {seen[name]})")
            continue
        seen[name] = line
        images = image_candidates(root, name)
        mask = mask_path(root, name)
        if not images:
            problems.append(_missing_image(root, split_file, line, name))
            if name.lower().endswith(IMAGE_EXTENSIONS):
                continue        # the hint says it all: no second line about NAME.png.png's mask
        elif len(images) > 1:
            problems.append(f"{split_file}:{line}: {name!r} has several images {images}; keep one")
        if not os.path.isfile(mask):
            problems.append(f"{split_file}:{line}: {name!r} has no mask: expected {mask!r}")
        if len(images) == 1 and os.path.isfile(mask):
            samples.append(Sample(name, images[0], mask))
    return samples, problems


def find_samples(root, split: str) -> list[Sample]:
    """The pairs of ``split`` (folder layout), in list order; ``DatasetLayoutError`` on the first
    problem (``python -m ifbf_fast.data.check ROOT`` lists them all)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"data root {root!r} does not exist or is not a folder")
    samples, problems = scan_split(root, split)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s): python -m ifbf_fast.data.check {root})" \
            if len(problems) > 1 else ""
        raise DatasetLayoutError(problems[0] + more)
    return samples


def list_samples(root, split: str) -> list[Sample]:
    """The pairs of ``split`` under ``root`` in either layout (``find_samples`` or ``find_pairs``)."""
    return find_samples(root, split) if is_folder_layout(root) else find_pairs(root, split)


class FolderDataset(CityscapesDataset):
    """Map-style dataset over one split of a folder-layout root: ``CityscapesDataset`` with this
    layout's samples and the root's own class table (``ds[i]`` -> ``{"image": (H, W, 3) uint8 RGB,
    "label": (H, W) uint8 train ids, "name": NAME}``, ``load(i)``, ``names``, ``samples``, ``classes``)."""

    label_word = "mask"

    def __init__(self, root, split: str, transform=None, classes: ClassTable | None = None):
        super().__init__(root, split, transform)
        self.classes = classes if classes is not None else class_table_of(self.root)

    @staticmethod
    def find_samples(root: str, split: str) -> list[Sample]:
        return find_samples(root, split)


def open_dataset(root, split: str, transform=None):
    """``FolderDataset`` or ``CityscapesDataset`` for ``root`` (``detect_layout``)."""
    if is_folder_layout(root):
        return FolderDataset(root, split, transform)
    return CityscapesDataset(root, split, transform)
