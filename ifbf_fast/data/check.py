"""Preflight of a dataset (Cityscapes tree or folder layout): read every pair, report ALL problems at once.

    python -m ifbf_fast.data.check DIR [--splits train val] [--workers 8]

prints one line per problem (each names the file or files) and a summary, and exits 1 when there
is any problem (0 otherwise). Run it before a long training job: ``CityscapesDataset`` fails on the
first bad file it meets, which may be hours into a run, whereas this finds them all in one pass.

Problems found: missing root / split folders (a split folder missing is reported and that split
skipped), an image without its label and a label without its image, an empty split, a file that is
unreadable, truncated or not decodable, a label that is not single-channel 8-bit, image/label size
mismatch, label values that are not Cityscapes labelIds (the official table's ids, 0..33: 250, say),
a folder that cannot be listed (named as such, once, rather than as missing partners of its files).

A folder-layout root (``ROOT/classes.yaml``, ``ifbf_fast.data.folder``) is checked the same way against
its class table: a bad classes.yaml (one line, nothing else checked), a missing split list, names in a
list that are absolute or leave the folder, listed twice, have no image, several images (.png and .jpg)
or no mask, and mask values that are neither a class id nor the ignore_id.

A split holding prepared arrays (``python -m ifbf_fast.data.prepare``: ``*_leftImg8bit.npy`` /
``*_gtFine_labelIds.npy``) instead of PNGs is checked the same way (unreadable array, wrong dtype or
shape instead of an undecodable PNG).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .cityscapes import (IMAGE_DIR, IMAGE_SUFFIX, LABEL_DIR, LABEL_SUFFIX, DataReadError,
                         DatasetLayoutError, Sample, read_image, read_label_ids)
from .folder import CLASSES_FILE, class_table_of, is_folder_layout, scan_split
from .labels import VALID_LABEL_IDS
from .prepare import PREP_IMAGE_SUFFIX, PREP_LABEL_SUFFIX, load_array

_INVALID_LUT = np.ones(256, dtype=bool)
_INVALID_LUT[sorted(VALID_LABEL_IDS)] = False


@dataclass
class DatasetReport:
    """Result of ``check_dataset``: ``problems`` (one line each), pairs read per split."""

    root: str
    problems: list[str] = field(default_factory=list)
    pairs: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"PROBLEM: {p}" for p in self.problems]
        counts = ", ".join(f"{s}: {n} pairs" for s, n in self.pairs.items()) or "no pairs"
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines.append(f"{self.root}: {counts}; {verdict}")
        return "\n".join(lines)


def _check_pair(sample: Sample, invalid=_INVALID_LUT, what: str = "Cityscapes labelIds") -> list[str]:
    """Every problem of one pair (decoding both files even when the first fails). ``invalid``: bool
    (256,), the label values that are not allowed, ``what`` the name of the allowed ones."""
    problems, image, label = [], None, None
    prepared = sample.image_path.endswith(PREP_IMAGE_SUFFIX)
    try:
        image = load_array(sample.image_path, 3) if prepared else read_image(sample.image_path)
    except DataReadError as exc:
        problems.append(str(exc))
    try:
        label = (load_array(sample.label_path, 2) if prepared
                 else read_label_ids(sample.label_path))
    except DataReadError as exc:
        problems.append(str(exc))
    if image is not None and label is not None and image.shape[:2] != label.shape:
        problems.append(
            f"size mismatch: image {sample.image_path!r} is {image.shape[1]}x{image.shape[0]}, "
            f"label {sample.label_path!r} is {label.shape[1]}x{label.shape[0]}")
    if label is not None:
        counts = np.bincount(label.ravel(), minlength=256)
        bad = np.flatnonzero((counts > 0) & invalid)
        if bad.size:
            shown = ", ".join(f"{v} ({counts[v]} px)" for v in bad[:8])
            more = f" and {bad.size - 8} more" if bad.size > 8 else ""
            problems.append(f"label {sample.label_path!r} has values that are not {what}: {shown}{more}")
    return problems


def _list_split(split_dir: str, unreadable: dict) -> list[str]:
    """Every file ``split_dir/CITY/NAME`` (hidden names skipped, as glob does), sorted. A folder that
    cannot be listed goes into ``unreadable`` (path -> reason) instead of looking empty."""
    try:
        with os.scandir(split_dir) as it:
            cities = sorted(e.path for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as exc:
        unreadable[split_dir] = exc.strerror or str(exc)
        return []
    files = []
    for city in cities:
        try:
            names = os.listdir(city)
        except OSError as exc:
            unreadable[city] = exc.strerror or str(exc)
            continue
        files += [os.path.join(city, n) for n in names if not n.startswith(".")]
    return sorted(files)


def _scan_split(root: str, split: str, report: DatasetReport) -> list[Sample]:
    """Pair the files of one split, recording layout problems; return the complete pairs."""
    image_dir = os.path.join(root, IMAGE_DIR, split)
    label_dir = os.path.join(root, LABEL_DIR, split)
    missing = [d for d in (image_dir, label_dir) if not os.path.isdir(d)]
    if missing:
        for d in missing:
            report.problems.append(f"split {split!r}: expected the folder {d!r} (not a Cityscapes "
                                   f"layout: ROOT/{IMAGE_DIR}/{split}/CITY/*{IMAGE_SUFFIX})")
        return []
    unreadable: dict = {}
    image_files, label_files = _list_split(image_dir, unreadable), _list_split(label_dir, unreadable)
    for folder, why in unreadable.items():
        report.problems.append(f"cannot read the folder {folder!r} ({why}): its files are not checked")
    image_suffix, label_suffix = IMAGE_SUFFIX, LABEL_SUFFIX
    images = [f for f in image_files if f.endswith(IMAGE_SUFFIX)]
    if not images:  # a prepared (.npy) split?
        prep = [f for f in image_files if f.endswith(PREP_IMAGE_SUFFIX)]
        if prep:
            images, image_suffix, label_suffix = prep, PREP_IMAGE_SUFFIX, PREP_LABEL_SUFFIX
    labels = [f for f in label_files if f.endswith(label_suffix)]
    if not images and not unreadable:
        report.problems.append(f"split {split!r}: no images matching "
                               f"{os.path.join(image_dir, 'CITY', '*' + IMAGE_SUFFIX)!r}")
    expected_labels = set()
    pairs = []
    for image_path in images:
        city = os.path.basename(os.path.dirname(image_path))
        stem = os.path.basename(image_path)[: -len(image_suffix)]
        label_path = os.path.join(label_dir, city, stem + label_suffix)
        expected_labels.add(os.path.normpath(label_path))
        if os.path.isfile(label_path):
            pairs.append(Sample(stem, image_path, label_path))
        elif os.path.dirname(label_path) in unreadable or label_dir in unreadable:
            continue      # reported as an unreadable folder
        else:
            report.problems.append(f"image {image_path!r} has no label: expected {label_path!r}")
    for label_path in labels:
        if os.path.normpath(label_path) not in expected_labels:
            city = os.path.basename(os.path.dirname(label_path))
            stem = os.path.basename(label_path)[: -len(label_suffix)]
            image_path = os.path.join(image_dir, city, stem + image_suffix)
            if os.path.dirname(image_path) in unreadable or image_dir in unreadable:
                continue
            report.problems.append(f"label {label_path!r} has no image: expected {image_path!r}")
    return pairs


def _scan_folder_split(root: str, split: str, report: DatasetReport) -> list[Sample]:
    """The folder layout's counterpart of ``_scan_split``."""
    try:
        pairs, problems = scan_split(root, split)
    except (DatasetLayoutError, DataReadError) as exc:      # no list, or an unreadable one
        report.problems.append(str(exc))
        return []
    report.problems.extend(problems)
    return pairs


def check_dataset(root: str, splits=("train", "val"), workers: int | None = None) -> DatasetReport:
    """Scan every pair of ``splits`` under ``root``; never raises for a data problem.

    Decoding runs in ``workers`` threads (default ``min(8, cpu_count)``; OpenCV releases the GIL
    while decoding): full Cityscapes train+val is ~3500 pairs of 2048x1024 PNGs, about 0.03 s each.
    The order of the problems does not depend on ``workers``.
    """
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    root = os.fspath(root)
    report = DatasetReport(root=root)
    if not os.path.isdir(root):
        report.problems.append(f"data root {root!r} does not exist or is not a folder")
        return report
    all_pairs = []
    check, folder = _check_pair, is_folder_layout(root)
    if folder:
        try:
            table = class_table_of(root)
        except DatasetLayoutError as exc:       # a bad classes.yaml: nothing can be checked against it
            report.problems.append(str(exc))
            return report
        invalid = np.ones(256, dtype=bool)
        invalid[sorted(table.valid_ids)] = False
        what = f"ids of {CLASSES_FILE} (nor its ignore_id {table.ignore_id})"
        check = functools.partial(_check_pair, invalid=invalid, what=what)
    for split in splits:
        pairs = (_scan_folder_split if folder else _scan_split)(root, split, report)
        report.pairs[split] = len(pairs)
        all_pairs.extend(pairs)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(check, all_pairs))
    else:
        results = [check(p) for p in all_pairs]
    for problems in results:
        report.problems.extend(problems)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ifbf_fast.data.check",
        description="Check a dataset, a Cityscapes tree or the folder layout (layout, pairing, decodability, "
                    "sizes, label values).")
    parser.add_argument("root", help="folder holding leftImg8bit/ and gtFine/ (Cityscapes), or classes.yaml, "
                                     "images/, masks/ and splits/ (the folder layout)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads (default: min(8, CPU count))")
    args = parser.parse_args(argv)
    report = check_dataset(args.root, args.splits, workers=args.workers)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
