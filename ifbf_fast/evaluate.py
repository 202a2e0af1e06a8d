"""Evaluate a train.py checkpoint on Cityscapes, the synthetic city or your own data (the folder layout,
``ifbf_fast.data.folder``): per-class IoU, mIoU, accuracy.

    python -m ifbf_fast.evaluate --checkpoint runs/ifbfnet/best.pt --data DIR [--split val]
        [--mode whole|slide --crop H W --stride H W] [--scales 0.5 0.75 1.0 1.25 1.5 1.75] [--flip]
        [--gpus N | --procs N] [--batch-size B] [--amp [bf16|fp16]] [--out results.json]
        [--save-predictions DIR]

The model is rebuilt from the arguments saved in the checkpoint (its ``meta`` block is checked
against them) and runs in eval mode, so the norm layers use their running statistics whichever
norm (InPlace-ABN-Sync included) it was trained with. Several processes (torchrun, ``--gpus N``
over NCCL, ``--procs N`` over gloo on the CPU) each evaluate a disjoint shard of the images and the
confusion matrix is all-reduced, so every image counts exactly once. Rank 0 prints the table and
writes the JSON file. ``--save-predictions`` writes every prediction as a labelIds PNG in the
layout ``cityscapesscripts``' evaluation and the benchmark server read. The model, its preprocessing
and the test-time settings are ``ifbf_fast.inference``'s, shared with ``ifbf_fast.predict``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, Optional

import torch

from ifbf_fast import ops
from ifbf_fast.engine import checkpoint as ck
from ifbf_fast.inference import (InferenceError, InferenceUsageError, add_inference_options, check_inference_options,
                                 existing_file, load_model, options, parser, report, window, write_mask,
                                 write_submission)
from ifbf_fast.utils import dist as du
from ifbf_fast.utils.runtime import resolve_amp, select_device

PROG = "python -m ifbf_fast.evaluate"
EvaluationError = InferenceError    # bad input or set-up; the message is one line
__all__ = ["main", "launch", "run", "parse_args", "build_parser", "write_json", "EvaluationError"]


def build_parser() -> argparse.ArgumentParser:
    p = parser(PROG, "Evaluate a train.py checkpoint: per-class IoU, mIoU and pixel accuracy on a "
                     "Cityscapes-layout split.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="iter_XXXXXXXX.pt or best.pt written by train.py")
    p.add_argument("--data", required=True, metavar="DIR", help="Cityscapes root (leftImg8bit/ and gtFine/), or "
                   "the folder layout (classes.yaml, images/, masks/, splits/) with the checkpoint's classes")
    p.add_argument("--split", default="val", help="split with ground truth (gtFine/SPLIT, or splits/SPLIT.txt)")
    p.add_argument("--out", metavar="JSON", default=None,
                   help="also write the results to this JSON file; default: print the table only")
    p.add_argument("--save-predictions", metavar="DIR", default=None,
                   help="also write labelIds PNGs (DIR/CITY/STEM_leftImg8bit.png) for cityscapesscripts; for the "
                        "folder layout, masks DIR/NAME.png holding the ids of classes.yaml")
    add_inference_options(p)
    g = p.add_argument_group("processes")
    g.add_argument("--gpus", type=int, default=None,
                   help="GPUs (one process each); 0 = CPU; default: 1 if CUDA is available else 0")
    g.add_argument("--procs", type=int, default=1, help="with --gpus 0: CPU processes over gloo (>= 1)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="images per forward and process (> 0; same-size images)")
    g.add_argument("--workers", type=int, default=2, help="loader worker processes per process (>= 0)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (there is none when stderr is not a terminal)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check what needs no work; one line and exit code 2 (``Parser.error``) on bad input."""
    p = build_parser()
    a = p.parse_args(argv)
    check_inference_options(p, a)
    for name, low in (("batch_size", 1), ("procs", 1), ("workers", 0), ("gpus", 0)):
        value = getattr(a, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}; got {value}")
    if a.gpus and a.procs != 1:
        p.error("--procs is for CPU runs (--gpus 0); with GPUs there is one process per GPU")
    existing_file(p, "--checkpoint", a.checkpoint, "iter_XXXXXXXX.pt or best.pt written by train.py")
    if not os.path.isdir(a.data):
        p.error(f"--data {a.data}: no such directory (expected a Cityscapes root with leftImg8bit/ and gtFine/, "
                f"or the folder layout with classes.yaml)")
    # found here, not after the whole evaluation when the results are written
    if a.out is not None and os.path.isdir(a.out):
        p.error(f"--out {a.out}: is a folder; give a JSON file name")
    if a.save_predictions is not None and os.path.isfile(a.save_predictions):
        p.error(f"--save-predictions {a.save_predictions}: is a file; give a folder")
    return a


# --- running ------------------------------------------------------------------------------------

def run(a: argparse.Namespace, local_rank: int = 0) -> Dict[str, object]:
    """Evaluate in this process (rank); every rank returns the same all-reduced result.
    ``--impl`` applies for the duration of the call only (else the choice in force at the start, held
    for the call, as in training)."""
    with ops.use_impl(a.impl or ops.get_impl()):
        return _run(a, local_rank)


def _run(a: argparse.Namespace, local_rank: int) -> Dict[str, object]:
    from ifbf_fast.data import build_loader, class_table_of, list_samples
    from ifbf_fast.engine.metrics import format_table

    device = select_device(a.gpus, local_rank)
    list_samples(a.data, a.split)       # layout errors before the model is built
    model = load_model(a.checkpoint, device, channels_last=a.channels_last or None)
    check_classes(model.classes, class_table_of(a.data), a.data)
    crop, stride = model.settings(a.mode, a.crop, a.stride)
    rank, world = du.rank(), du.world_size()
    loader = build_loader(a.data, a.split, a.batch_size, train=False, workers=a.workers, rank=rank,
                          world_size=world, pin_memory=device.type == "cuda")
    progress = None
    if a.progress and du.is_primary() and sys.stderr.isatty():
        from tqdm import tqdm

        progress = lambda it: tqdm(it, desc=f"evaluate (rank 0 of {world})", dynamic_ncols=True)  # noqa: E731
    writer = None
    if a.save_predictions:
        if model.classes.layout == "cityscapes":
            writer = lambda names, pred: [write_submission(a.save_predictions, n, p)  # noqa: E731
                                          for n, p in zip(names, pred.cpu().numpy())]
        else:
            writer = lambda names, pred: [write_mask(a.save_predictions, n, p, model.classes)  # noqa: E731
                                          for n, p in zip(names, pred.cpu().numpy())]
    result = model.evaluate(loader, **{**options(a), "crop": crop, "stride": stride}, progress=progress,
                            on_prediction=writer)
    if du.is_primary():
        print(f"{a.checkpoint}: {a.split} split of {a.data}, {result['images']} images, mode {a.mode}"
              f"{f' crop {crop[0]}x{crop[1]}' if crop else ''}, scales {a.scales}, flip {a.flip}, "
              f"{world} process(es) on {device.type}")
        print(format_table(result, model.class_names))
        if a.out:
            write_json(a.out, result, model.class_names, a, crop, stride, world)
            print(f"results written to {a.out}")
    return result


def check_classes(model_classes, data_classes, data: str) -> None:
    """The data's classes must be the checkpoint's (the same names for the same train ids), else the
    confusion matrix compares unrelated classes: ``InferenceUsageError`` (exit 2) naming both."""
    if tuple(model_classes.names) == tuple(data_classes.names):
        return

    def describe(t):
        names = ", ".join(t.names[:4]) + (", ..." if t.num_classes > 4 else "")
        return f"{t.num_classes} classes: {names}"

    where = data_classes.source or "Cityscapes' table"
    raise InferenceUsageError(f"--data {data}: its classes ({where}, {describe(data_classes)}) are not the "
                              f"checkpoint's ({describe(model_classes)}); evaluate on data with the checkpoint's "
                              f"class table")


def write_json(path: str, result: Dict[str, object], names, a: argparse.Namespace, crop, stride, world: int) -> None:
    def num(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    doc = {"checkpoint": os.path.abspath(a.checkpoint), "data": os.path.abspath(a.data), "split": a.split,
           "mode": a.mode, "crop": list(crop) if crop else None, "stride": list(stride) if stride else None,
           "scales": list(a.scales), "flip": a.flip, "amp": a.amp, "processes": world,
           "images": result["images"], "pixels": result["pixels"], "miou": num(result["miou"]),
           "pixel_acc": num(result["pixel_acc"]), "mean_acc": num(result["mean_acc"]),
           "iou": {n: num(v) for n, v in zip(names, result["iou"])}, "confusion": result["confusion"]}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def launch(a: argparse.Namespace) -> Optional[Dict[str, object]]:
    """Run ``run`` in as many processes as asked: torchrun's, ``--gpus N``, or ``--procs N``
    (:func:`ifbf_fast.engine.launch.launch`). Returns the result in a single process (and under
    torchrun), ``None`` after a spawn."""
    from ifbf_fast.engine.launch import launch as launch_ranks
    from ifbf_fast.engine.preflight import user_errors

    return launch_ranks(run, a, a.gpus, a.procs, user_errors(InferenceError), before_spawn=lambda backend:
                        _before_spawn(a, backend))


def _before_spawn(a: argparse.Namespace, backend: str) -> None:
    """Fail on bad input here, once, rather than in every spawned rank."""
    from ifbf_fast.data import list_samples

    list_samples(a.data, a.split)
    if backend == "gloo":
        resolve_amp(a.amp, torch.device("cpu"))        # --amp fp16 on the CPU: SetupError (exit 2)
    window(a.mode, a.crop, a.stride, ck.read(a.checkpoint).args.get("crop_size"))


def main(argv=None) -> int:
    """Exit code 0; 2 for a usage error (argparse's, or an option this checkpoint, data or machine cannot
    take); 1 for an unreadable checkpoint, data that is not a Cityscapes layout, a failed worker."""
    from ifbf_fast.engine.preflight import user_errors

    a = parse_args(argv)
    try:
        launch(a)
    except user_errors(InferenceError) as exc:
        return report(PROG, exc)
    except torch.multiprocessing.ProcessRaisedException as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        print(f"{PROG}: error in a worker process: {lines[-1] if lines else exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
