"""Cityscapes label tables, derived at import time from ``cityscapesscripts.helpers.labels``.

The official table is the single source of truth (docs/DESIGN.md section 3): nothing here copies ids,
names or colours by hand, so a change in the official package cannot leave us silently out of date.

* ``LABEL_TO_TRAIN``  uint8 (256,): labelId -> trainId; 255 (``IGNORE_INDEX``) for every class with
  ``trainId`` 255 or -1 in the official table *and* for every byte value that is not a labelId at all
  (34..255), so ``LABEL_TO_TRAIN[label_png]`` is always safe.
* ``TRAIN_TO_LABEL``  uint8 (256,): trainId -> labelId, for writing submission files; entries
  19..255 (ignore and out of range) map to labelId 0 ('unlabeled'), which the benchmark ignores.
* ``CLASS_NAMES``     the 19 train class names in trainId order ('road', ..., 'bicycle').
* ``PALETTE``         uint8 (19, 3) RGB colour per trainId; ``colorize`` maps 255 to black.
* ``VALID_LABEL_IDS`` frozenset of the labelIds a gtFine ``*_labelIds.png`` may contain (0..33;
  'license plate' has id -1 in the table and never appears in a PNG).
* ``LABEL_ID``        name -> labelId for every official class (used by the synthetic city).
"""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

NUM_CLASSES = 19
IGNORE_INDEX = 255

#: name -> labelId for every official class with a real (non-negative) id.
LABEL_ID: dict[str, int] = {lab.name: lab.id for lab in _CS_LABELS if lab.id >= 0}

#: labelIds that may legitimately appear in a ``*_gtFine_labelIds.png``.
VALID_LABEL_IDS: frozenset[int] = frozenset(LABEL_ID.values())


def _build_tables():
    label_to_train = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    train_to_label = np.zeros(256, dtype=np.uint8)  # 0 = 'unlabeled' for ignore / out of range
    names = [None] * NUM_CLASSES
    palette = np.zeros((NUM_CLASSES, 3), dtype=np.uint8)
    for lab in _CS_LABELS:
        if lab.id < 0:
            continue  # 'license plate': id -1, not representable in a uint8 PNG
        if 0 <= lab.trainId < NUM_CLASSES:
            label_to_train[lab.id] = lab.trainId
            if names[lab.trainId] is not None:
                raise RuntimeError(f"cityscapesscripts maps two classes to trainId {lab.trainId}")
            names[lab.trainId] = lab.name
            train_to_label[lab.trainId] = lab.id
            palette[lab.trainId] = lab.color
    if any(n is None for n in names):
        raise RuntimeError("cityscapesscripts' table does not define all 19 trainIds")
    for arr in (label_to_train, train_to_label, palette):
        arr.setflags(write=False)  # shared module-level tables: nobody may edit them in place
    return label_to_train, train_to_label, tuple(names), palette


LABEL_TO_TRAIN, TRAIN_TO_LABEL, CLASS_NAMES, PALETTE = _build_tables()

#: RGB colour per labelId (the official ``color`` field), for ``*_gtFine_color.png`` files.
LABEL_COLORS = np.zeros((256, 3), dtype=np.uint8)
for _lab in _CS_LABELS:
    if _lab.id >= 0:
        LABEL_COLORS[_lab.id] = _lab.color
LABEL_COLORS.setflags(write=False)
del _lab


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map an array of labelIds (any integer dtype) to trainIds (uint8, 255 = ignore).

    Values outside 0..255 and unknown ids both become 255.
    """
    label_ids = np.asarray(label_ids)
    if label_ids.dtype == np.uint8:
        return LABEL_TO_TRAIN[label_ids]
    out = np.full(label_ids.shape, IGNORE_INDEX, dtype=np.uint8)
    inside = (label_ids >= 0) & (label_ids <= 255)
    out[inside] = LABEL_TO_TRAIN[label_ids[inside].astype(np.int64)]
    return out


def to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map trainIds (predictions, 0..18) back to labelIds (uint8) for the official evaluation.

    Ignore (255) and any value >= 19 become labelId 0 ('unlabeled').
    """
    train_ids = np.asarray(train_ids)
    if train_ids.dtype != np.uint8:
        train_ids = np.where((train_ids >= 0) & (train_ids < NUM_CLASSES), train_ids, 255)
        train_ids = train_ids.astype(np.uint8)
    return TRAIN_TO_LABEL[train_ids]


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) trainIds -> (H, W, 3) uint8 RGB with the official colours; ignore is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    train_ids = np.asarray(train_ids)
    if train_ids.dtype != np.uint8:
        train_ids = np.where((train_ids >= 0) & (train_ids < 256), train_ids, 255).astype(np.uint8)
    return lut[train_ids]
