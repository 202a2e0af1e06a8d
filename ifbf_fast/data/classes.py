"""The class table of a dataset: names, colours, the mask value -> train id lookup, the ignore id.

Every dataset has one, so code that needs the class names, the palette or the number of classes asks
the dataset's table (``table.names``, ``table.palette``, ``table.num_classes``) rather than the
Cityscapes constants:

* ``CITYSCAPES``: the 19 train classes of the official ``cityscapesscripts`` table (``labels``): masks
  hold labelIds, ``lut`` is ``LABEL_TO_TRAIN``, predictions are written back as labelIds.
* ``load_class_table(path)``: a ``classes.yaml`` of the folder layout (``ifbf_fast.data.folder``)::

      ignore_id: 255                                   # optional, 255 when absent
      classes:                                         # the i-th class listed is train id i
        - {name: road, id: 7, color: [128, 64, 128]}   # id: the mask value of the class, 0..255
        - {name: car, id: 26, color: [0, 0, 142]}      # color: RGB, three bytes

  A bad file raises ``ClassTableError`` (a ``DatasetLayoutError``) with one line naming the file and
  the problem: not YAML, a missing or unknown key, a duplicate id or name, an id or ignore_id outside
  0..255 or not an integer, a colour that is not three bytes, ignore_id equal to a class id.

Mask values: a listed id maps to its train id, ``ignore_id`` to 255 (the loss's ignore index); any other
value also maps to 255 in the loaders (as an unknown Cityscapes labelId does), and the preflight
(``python -m ifbf_fast.data.check``, which train.py runs before the first step) reports every file
that holds one, so training never starts on data with unknown values.

**The label dtype of a batch** (``label_dtype``; both loaders ask ``table.label_dtype``): the narrowest of
uint8, int16 and int32 that holds every train id ``0 .. num_classes - 1`` and the ignore id 255. Every
table this format allows (and Cityscapes' 19 classes) gives uint8: ids are bytes, so a table has at
most 255 classes besides the ignore id. uint8 is what the OHEM kernels read with no conversion copy
and what the batch's host-to-device copy moves (1 byte per pixel, not int64's 8).

``table.to_dict()`` is what train.py records in its checkpoints (``args.classes``);
``ClassTable.from_dict`` rebuilds it for evaluate, predict and TensorBoard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import yaml

from .errors import DatasetLayoutError
from .labels import (CLASS_NAMES, IGNORE_INDEX, LABEL_TO_TRAIN, PALETTE, TRAIN_TO_LABEL,
                     VALID_LABEL_IDS)


#: the label dtypes of the batch contract, narrowest first (``label_dtype`` picks one)
LABEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.int32))


def label_dtype(num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.dtype:
    """The dtype the loaders give labels in: the first of ``LABEL_DTYPES`` that holds the train ids
    ``0 .. num_classes - 1`` and ``ignore_index`` (module docstring). ``ValueError`` when none does."""
    low, high = min(0, int(ignore_index)), max(int(num_classes) - 1, int(ignore_index))
    for dtype in LABEL_DTYPES:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise ValueError(f"no label dtype holds train ids 0..{int(num_classes) - 1} and ignore index {ignore_index}")


class ClassTableError(DatasetLayoutError):
    """A ``classes.yaml`` that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True, eq=False)
class ClassTable:
    """One dataset's classes (see the module docstring).

    ``names`` / ``ids`` / ``palette``: per train id, the name, the mask value and the RGB colour.
    ``lut``: uint8 (256,), mask value -> train id (255 = ignore). ``valid_ids``: the mask values a
    mask may hold (the class ids and the ignore id). ``ignore_id``: the mask value meaning ignore
    (None for Cityscapes, where every labelId without a train id is ignored). ``layout``:
    ``"cityscapes"`` or ``"folder"``; ``source``: the file it was read from, if any.
    """

    names: tuple
    ids: tuple
    palette: np.ndarray
    lut: np.ndarray
    valid_ids: frozenset
    ignore_id: int | None = None
    layout: str = "folder"
    source: str | None = field(default=None, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def label_dtype(self) -> np.dtype:
        """The dtype of this dataset's labels in a batch (``label_dtype``: uint8 for every table)."""
        return label_dtype(self.num_classes, IGNORE_INDEX)

    def __eq__(self, other) -> bool:
        return (isinstance(other, ClassTable) and self.names == other.names and self.ids == other.ids
                and self.ignore_id == other.ignore_id and self.layout == other.layout
                and np.array_equal(self.palette, other.palette))

    __hash__ = None

    def __repr__(self) -> str:
        where = f" from {self.source}" if self.source else ""
        return f"ClassTable({self.layout}, {self.num_classes} classes{where})"

    def colorize(self, train_ids: np.ndarray) -> np.ndarray:
        """(H, W) train ids -> (H, W, 3) uint8 RGB in this table's colours; ignore (and any value
        without a class) is black."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = self.palette
        train_ids = np.asarray(train_ids)
        if train_ids.dtype != np.uint8:
            train_ids = np.where((train_ids >= 0) & (train_ids < 256), train_ids, 255).astype(np.uint8)
        return lut[train_ids]

    def to_mask_ids(self, train_ids: np.ndarray) -> np.ndarray:
        """Train ids (predictions) -> the dataset's mask values (uint8): labelIds for Cityscapes
        (ignore -> 0 'unlabeled'), the class ids of classes.yaml otherwise (ignore -> ignore_id)."""
        back = np.full(256, 0 if self.ignore_id is None else self.ignore_id, dtype=np.uint8)
        back[: self.num_classes] = self.ids
        train_ids = np.asarray(train_ids)
        if train_ids.dtype != np.uint8:
            train_ids = np.where((train_ids >= 0) & (train_ids < 256), train_ids, 255).astype(np.uint8)
        return back[train_ids]

    def to_dict(self) -> dict:
        """Plain values (what a ``weights_only`` checkpoint and ``args.yaml`` can hold)."""
        return {"layout": self.layout, "names": list(self.names), "ids": list(self.ids),
                "colors": self.palette.astype(int).tolist(), "ignore_id": self.ignore_id}

    @staticmethod
    def from_dict(d: dict, what: str = "class table") -> "ClassTable":
        """Inverse of ``to_dict``; ``ValueError`` naming ``what`` for a record that does not fit."""
        try:
            if d.get("layout") == "cityscapes":
                return CITYSCAPES
            if not len(d["names"]) == len(d["ids"]) == len(d["colors"]):
                raise ClassTableError(f"{what}: names, ids and colors differ in length")
            entries = [{"name": n, "id": i, "color": c} for n, i, c in zip(d["names"], d["ids"], d["colors"])]
            return _build({"ignore_id": d.get("ignore_id", IGNORE_INDEX), "classes": entries}, what)
        except (AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"{what}: not a class table record ({type(exc).__name__}: {exc})") from None


def generic_table(num_classes: int) -> ClassTable:
    """Names ``"0"``, ``"1"``, ... for a checkpoint that records no table (written before tables
    existed) and does not have Cityscapes' 19 classes: grey levels as colours, ids = train ids."""
    n = int(num_classes)
    grey = np.linspace(40, 230, max(n, 1)).astype(np.uint8)[:n]
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:n] = np.arange(n)
    return ClassTable(tuple(str(i) for i in range(n)), tuple(range(n)), np.stack([grey] * 3, 1), lut,
                      frozenset(range(n)) | {IGNORE_INDEX}, IGNORE_INDEX, "folder")


def _cityscapes() -> ClassTable:
    ids = tuple(int(v) for v in TRAIN_TO_LABEL[: len(CLASS_NAMES)])
    return ClassTable(tuple(CLASS_NAMES), ids, PALETTE, LABEL_TO_TRAIN, VALID_LABEL_IDS, None, "cityscapes")


CITYSCAPES = _cityscapes()


# --- classes.yaml --------------------------------------------------------------------------------

def _byte(value, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClassTableError(f"{where}: {what} must be an integer in 0..255, got {value!r}")
    if not 0 <= value <= 255:
        raise ClassTableError(f"{where}: {what} {value} is outside 0..255")
    return value


def _build(doc, where: str) -> ClassTable:
    """The table of a parsed classes.yaml ``doc``; ``ClassTableError`` prefixed with ``where``."""
    if not isinstance(doc, dict):
        raise ClassTableError(f"{where}: expected a mapping with the keys ignore_id and classes, got "
                              f"{type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in ("ignore_id", "classes"))
    if unknown:
        raise ClassTableError(f"{where}: unknown key(s) {unknown}; expected ignore_id and classes")
    if "classes" not in doc:
        raise ClassTableError(f"{where}: missing key 'classes' (a list of {{name, id, color}})")
    ignore_id = _byte(doc.get("ignore_id", IGNORE_INDEX), "ignore_id", where)
    entries = doc["classes"]
    if not isinstance(entries, list) or not entries:
        raise ClassTableError(f"{where}: classes must be a non-empty list of {{name, id, color}}, got {entries!r}")
    names, ids, colors = [], [], []
    for i, entry in enumerate(entries):
        label = f"class {i}"
        if not isinstance(entry, dict):
            raise ClassTableError(f"{where}: {label}: expected a mapping {{name, id, color}}, got {entry!r}")
        if isinstance(entry.get("name"), str):
            label = f"class {i} ({entry['name']})"
        for key in ("name", "id", "color"):
            if key not in entry:
                raise ClassTableError(f"{where}: {label}: missing key '{key}'")
        extra = sorted(str(k) for k in entry if k not in ("name", "id", "color"))
        if extra:
            raise ClassTableError(f"{where}: {label}: unknown key(s) {extra}; expected name, id, color")
        name = entry["name"]
        if not isinstance(name, str) or not name.strip():
            raise ClassTableError(f"{where}: {label}: name must be a non-empty string, got {name!r}")
        if name in names:
            raise ClassTableError(f"{where}: {label}: duplicate name {name!r} (also class {names.index(name)})")
        cid = _byte(entry["id"], "id", f"{where}: {label}")
        if cid in ids:
            raise ClassTableError(f"{where}: {label}: duplicate id {cid} (also class {ids.index(cid)}, "
                                  f"{names[ids.index(cid)]})")
        if cid == ignore_id:
            raise ClassTableError(f"{where}: {label}: id {cid} is the ignore_id; give the class another id "
                                  f"or set ignore_id to a value no class uses")
        color = entry["color"]
        if (not isinstance(color, (list, tuple)) or len(color) != 3
                or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 255 for c in color)):
            raise ClassTableError(f"{where}: {label}: color must be three bytes [R, G, B] in 0..255, got {color!r}")
        names.append(name)
        ids.append(cid)
        colors.append(color)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[ids] = np.arange(len(ids))
    palette = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    for arr in (lut, palette):
        arr.setflags(write=False)
    return ClassTable(tuple(names), tuple(ids), palette, lut, frozenset(ids) | {ignore_id}, ignore_id, "folder")


def load_class_table(path: str) -> ClassTable:
    """Read a ``classes.yaml`` (module docstring); ``ClassTableError`` with one line on any problem."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise ClassTableError(f"{path}: no such file (the class table of the folder layout)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassTableError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    except yaml.YAMLError as exc:
        raise ClassTableError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    table = _build(doc, path)
    return ClassTable(table.names, table.ids, table.palette, table.lut, table.valid_ids, table.ignore_id,
                      table.layout, path)


def write_class_table(path: str, names, ids, colors, ignore_id: int = IGNORE_INDEX) -> None:
    """Write a ``classes.yaml`` (one class per line, as the README shows)."""
    lines = [f"ignore_id: {int(ignore_id)}", "classes:"]
    for name, cid, color in zip(names, ids, colors):
        r, g, b = (int(c) for c in color)
        lines.append(f"  - {{name: {yaml.safe_dump(str(name), default_style=None).strip().splitlines()[0]}, "
                     f"id: {int(cid)}, color: [{r}, {g}, {b}]}}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
