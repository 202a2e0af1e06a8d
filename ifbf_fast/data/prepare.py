"""Convert a Cityscapes tree to a decode-free form: raw uint8 ``.npy`` arrays, lossless.

    python -m ifbf_fast.data.prepare SRC DST [--splits train val] [--workers 8]

writes, for every pair of ``SRC`` (the official PNG layout, see ``cityscapes``):

    DST/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.npy       uint8 (H, W, 3) RGB
    DST/gtFine/{split}/{city}/{stem}_gtFine_labelIds.npy         uint8 (H, W) labelIds

plus ``DST/prepared.json``. Labels stay **labelIds** (exactly the PNG's values, not trainIds), so
both forms go through the same labelIds -> trainIds lookup (on the device in the DALI pipeline) and
``prepare`` is invertible. A 2048x1024 pair takes 8 MiB instead of ~2.5 MiB of PNG; reading it is a
plain copy (the page cache or a memory map), which removes the PNG decode (~30 ms per image on one
core) from the loader's CPU budget.

Every pair is decoded with the reference reader (``read_image`` / ``read_label_ids``) and checked
(decodable, sizes agree); a bad pair is reported and skipped, the command exits 1. Files are written
to a temporary name and renamed, so an interrupted run never leaves a partial array behind.
``ifbf_fast.data.dali`` reads either form (``detect_form``); ``find_prepared_pairs`` lists the
arrays in the same order (sorted by stem) as ``find_pairs`` lists the PNGs, so dataset index ``i``
is the same image in both forms and gets the same augmentation parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from glob import escape as glob_escape
from glob import glob

import numpy as np

from .cityscapes import (IMAGE_DIR, IMAGE_SUFFIX, LABEL_DIR, DataReadError,
                         DatasetLayoutError, Sample, find_pairs, read_image, read_label_ids)

PREP_IMAGE_SUFFIX = "_leftImg8bit.npy"
PREP_LABEL_SUFFIX = "_gtFine_labelIds.npy"
MANIFEST = "prepared.json"


def prepared_paths(dst: str, split: str, sample: Sample) -> tuple[str, str]:
    """Where ``prepare`` writes the arrays of one PNG pair."""
    city = os.path.basename(os.path.dirname(sample.image_path))
    return (os.path.join(dst, IMAGE_DIR, split, city, sample.name + PREP_IMAGE_SUFFIX),
            os.path.join(dst, LABEL_DIR, split, city, sample.name + PREP_LABEL_SUFFIX))


def _save(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, np.ascontiguousarray(array))
    os.replace(tmp, path)


def _convert(job) -> str | None:
    dst, split, sample = job
    try:
        image = read_image(sample.image_path)
        label = read_label_ids(sample.label_path)
    except DataReadError as exc:
        return str(exc)
    if image.shape[:2] != label.shape:
        return (f"size mismatch: image {sample.image_path!r} is {image.shape[1]}x{image.shape[0]}, "
                f"label {sample.label_path!r} is {label.shape[1]}x{label.shape[0]}")
    image_out, label_out = prepared_paths(dst, split, sample)
    _save(image_out, image)
    _save(label_out, label)
    return None


def prepare(src: str, dst: str, splits=("train", "val"), workers: int | None = None) -> list[str]:
    """Convert ``splits`` of ``src`` into ``dst``; return the problems (empty when all is well).

    A missing split raises ``DatasetLayoutError`` (nothing is written for it); a bad pair is
    reported and skipped. Decoding runs in ``workers`` threads (OpenCV releases the GIL).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("prepare: SRC and DST must differ")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    jobs = [(dst, split, s) for split in splits for s in find_pairs(src, split)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = [p for p in pool.map(_convert, jobs) if p]
    os.makedirs(dst, exist_ok=True)
    counts = {split: sum(1 for j in jobs if j[1] == split) for split in splits}
    with open(os.path.join(dst, MANIFEST), "w") as f:
        json.dump({"source": os.path.abspath(src), "format": 1, "pairs": counts,
                   "image": "uint8 (H, W, 3) RGB", "label": "uint8 (H, W) labelIds",
                   "problems": len(problems)}, f, indent=1)
    return problems


def find_prepared_pairs(root: str, split: str) -> list[Sample]:
    """The ``.npy`` pairs of ``split`` (the form ``prepare`` writes), sorted by stem; raises
    ``DatasetLayoutError`` for a missing folder, an image array without its label, or none."""
    image_dir = os.path.join(root, IMAGE_DIR, split)
    if not os.path.isdir(image_dir):
        raise DatasetLayoutError(
            f"{root!r} has no prepared split {split!r}: expected {image_dir!r}")
    images = sorted(glob(os.path.join(glob_escape(image_dir), "*", "*" + PREP_IMAGE_SUFFIX)))
    if not images:
        raise DatasetLayoutError(f"no prepared images in {image_dir!r} (*{PREP_IMAGE_SUFFIX})")
    samples = []
    for image_path in images:
        city = os.path.basename(os.path.dirname(image_path))
        name = os.path.basename(image_path)[: -len(PREP_IMAGE_SUFFIX)]
        label_path = os.path.join(root, LABEL_DIR, split, city, name + PREP_LABEL_SUFFIX)
        if not os.path.isfile(label_path):
            raise DatasetLayoutError(f"image {image_path!r} has no label: expected {label_path!r}")
        samples.append(Sample(name, image_path, label_path))
    samples.sort(key=lambda s: s.name)
    return samples


def detect_form(root: str, split: str) -> str:
    """``"png"`` when ``root/leftImg8bit/split`` holds official PNGs, ``"npy"`` when it holds
    prepared arrays (PNGs win when both are there); raises ``DatasetLayoutError`` otherwise."""
    image_dir = os.path.join(os.fspath(root), IMAGE_DIR, split)
    for suffix, form in ((IMAGE_SUFFIX, "png"), (PREP_IMAGE_SUFFIX, "npy")):
        if glob(os.path.join(glob_escape(image_dir), "*", "*" + suffix)):
            return form
    raise DatasetLayoutError(f"{root!r} has neither PNG (*{IMAGE_SUFFIX}) nor prepared "
                             f"(*{PREP_IMAGE_SUFFIX}) images under {image_dir!r}")


def load_array(path: str, ndim: int) -> np.ndarray:
    """A prepared uint8 array (``ndim`` 3: image, 2: label); ``DataReadError`` naming the file."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataReadError(f"cannot read prepared array {path!r}: {exc}") from exc
    if array.dtype != np.uint8 or array.ndim != ndim or (ndim == 3 and array.shape[2] != 3):
        raise DataReadError(f"prepared array {path!r} must be uint8 with {ndim} dims"
                            f"{' (H, W, 3)' if ndim == 3 else ' (H, W)'}, got {array.dtype} "
                            f"{array.shape}")
    return array


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ifbf_fast.data.prepare",
        description="Convert a Cityscapes tree (PNG) to raw uint8 .npy arrays (lossless; labels "
                    "stay labelIds).")
    parser.add_argument("src", help="Cityscapes root holding leftImg8bit/ and gtFine/")
    parser.add_argument("dst", help="output root (same layout, .npy files)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads (default: min(8, CPU count))")
    args = parser.parse_args(argv)
    try:
        problems = prepare(args.src, args.dst, args.splits, args.workers)
    except (DatasetLayoutError, ValueError) as exc:
        print(f"ERROR: {exc}")
        return 1
    for p in problems:
        print(f"PROBLEM: {p} (skipped)")
    print(f"{args.dst}: prepared {', '.join(args.splits)}; "
          f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
