"""Segment images with a train.py checkpoint: colour masks, overlays, Cityscapes submission files.

    python -m ifbf_fast.predict --checkpoint CKPT IMAGE_OR_DIR [...] --out DIR
        [--format color overlay panel submission] [--scales ...] [--flip] [--mode slide --crop H W]

Folders are searched recursively for ``*.png``, ``*.jpg``, ``*.jpeg``. Formats (several allowed):

* ``color``      ``DIR/REL/STEM_color.png``: the prediction in the colours of the class table the
                 checkpoint records (the official Cityscapes palette, ``ifbf_fast.data.PALETTE``, for
                 Cityscapes and the synthetic city; classes.yaml's for the folder layout);
* ``overlay``    ``DIR/REL/STEM_overlay.png``: the colours blended over the input (``--alpha``);
* ``panel``      ``DIR/REL/STEM_panel.png``: input, colour mask and overlay side by side;
* ``submission`` ``DIR/CITY/CITY_SEQ_FRAME_leftImg8bit.png``: 8-bit single-channel **labelIds**
                 (trainIds mapped with ``TRAIN_TO_LABEL``), one file per image, the layout of the
                 Cityscapes benchmark for the test split: the server (and ``cityscapesscripts``'
                 ``evalPixelLevelSemanticLabeling``) finds the prediction of ``CITY_SEQ_FRAME`` by
                 the pattern ``CITY_SEQ_FRAME*.png`` anywhere under the results folder. Zip ``DIR``'s
                 content to submit. Input names must follow the Cityscapes pattern for this format, and
                 the checkpoint must have Cityscapes' classes.

``REL`` is the image's folder relative to the folder given on the command line (empty for files
given directly), so a directory tree of inputs keeps its shape in the output.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, List, Sequence, Tuple

import numpy as np

from ifbf_fast.inference import (EXTENSIONS, InferenceError, InferenceUsageError, add_inference_options,
                                 check_inference_options, existing_file, load_model, options, overlay,
                                 parser, report, submission_name, write_png, write_submission)

PROG = "python -m ifbf_fast.predict"
FORMATS = ("color", "overlay", "panel", "submission")
PredictError = InferenceError      # bad input; the message is one line
__all__ = ["main", "run", "build_parser", "parse_args", "list_inputs", "PredictError", "overlay",
           "submission_name", "write_png", "write_submission"]


# --- inputs -------------------------------------------------------------------------------------

def list_inputs(paths: Sequence[str]) -> List[Tuple[str, str]]:
    """(image path, output folder relative to --out) for every image under ``paths``, sorted. A path that
    does not exist or a folder without images is a usage error (``InferenceUsageError``, exit 2)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            hits = []
            for root, _, files in os.walk(path):
                hits += [os.path.join(root, f) for f in files if f.lower().endswith(EXTENSIONS)]
            if not hits:
                raise InferenceUsageError(f"{path}: no {'/'.join(EXTENSIONS)} images in this folder")
            found += [(f, os.path.relpath(os.path.dirname(f), path)) for f in sorted(hits)]
        elif os.path.isfile(path):
            found.append((path, "."))
        else:
            raise InferenceUsageError(f"{path}: no such file or folder")
    return found


# --- the CLI ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from ifbf_fast.engine.config import finite_float

    p = parser(PROG, "Segment images with a train.py checkpoint.")
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIR", help="image files and/or folders")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="iter_XXXXXXXX.pt or best.pt written by train.py")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=["color", "overlay"],
                   help="what to write (several allowed; submission alone)")
    p.add_argument("--alpha", type=finite_float, default=0.5, help="colour weight of the overlay, in [0, 1]")
    p.add_argument("--gpus", type=int, choices=(0, 1), default=None,
                   help="1: the GPU, 0: the CPU; default: the GPU if there is one")
    add_inference_options(p)
    return p


def parse_args(argv: Iterable[str] = None) -> argparse.Namespace:
    """Parse and check what needs no work; one line and exit code 2 (``Parser.error``) on bad input."""
    p = build_parser()
    a = p.parse_args(argv)
    check_inference_options(p, a)
    if not 0.0 <= a.alpha <= 1.0:
        p.error(f"--alpha must be in [0, 1]; got {a.alpha:g}")
    if "submission" in a.format and len(a.format) > 1:
        # The server takes any CITY_SEQ_FRAME*.png under the folder as the prediction: the colour
        # images would be found as second predictions of the same image.
        p.error("--format submission writes a folder to zip and upload as it is; write the other formats "
                "into another --out")
    existing_file(p, "--checkpoint", a.checkpoint, "iter_XXXXXXXX.pt or best.pt written by train.py")
    if os.path.isfile(a.out):
        p.error(f"--out {a.out}: is a file; give a folder")
    return a


def run(a: argparse.Namespace) -> List[str]:
    """Predict every input; returns the paths written. ``--impl`` applies for the call only."""
    from ifbf_fast import ops

    with ops.use_impl(a.impl):
        return _run(a)


def _run(a: argparse.Namespace) -> List[str]:
    from ifbf_fast.data import read_image
    from ifbf_fast.utils.runtime import select_device

    inputs = list_inputs(a.inputs)
    if "submission" in a.format:
        for path, _ in inputs:
            try:
                submission_name(path)       # refuse bad names before any work
            except InferenceError as exc:   # the input does not fit the option: a usage error
                raise InferenceUsageError(str(exc)) from None
    model = load_model(a.checkpoint, select_device(a.gpus, 0), channels_last=a.channels_last or None)
    if "submission" in a.format and model.classes.layout != "cityscapes":
        names = ", ".join(model.class_names[:4]) + (", ..." if model.num_classes > 4 else "")
        raise InferenceUsageError(f"--format submission needs a checkpoint with Cityscapes' classes; {a.checkpoint} "
                                  f"predicts the {model.num_classes} classes of its own table ({names}); use color, "
                                  f"overlay or panel")
    settings = options(a)
    model.settings(a.mode, a.crop, a.stride)        # a missing sliding-window crop fails before any work
    written = []
    for path, rel in inputs:
        image = read_image(path)
        pred = model.predict(image, **settings)
        stem = os.path.splitext(os.path.basename(path))[0]
        folder = os.path.normpath(os.path.join(a.out, rel))
        color = model.colorize(pred)
        outputs = {"color": lambda: color, "overlay": lambda: overlay(image, color, a.alpha),
                   "panel": lambda: np.concatenate([image, color, overlay(image, color, a.alpha)], axis=1)}
        for fmt in a.format:
            if fmt == "submission":
                written.append(write_submission(a.out, path, pred))
            else:
                target = os.path.join(folder, f"{stem}_{fmt}.png")
                write_png(target, outputs[fmt]())
                written.append(target)
    return written


def main(argv: Iterable[str] = None) -> int:
    """Exit code 0; 2 for a usage error (argparse's, a path that does not exist, an option this
    checkpoint or these inputs cannot take); 1 for an unreadable checkpoint or image."""
    from ifbf_fast.engine.preflight import user_errors

    a = parse_args(argv)
    try:
        written = run(a)
    except user_errors(InferenceError) as exc:
        return report(PROG, exc)
    print(f"{len(written)} file(s) written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
