"""Export a train.py checkpoint to ONNX or to a ``torch.export`` program, checked against PyTorch.

    python -m ifbf_fast.export --checkpoint runs/ifbfnet/best.pt --format onnx --out ifbfnet.onnx [--size H W]
    python -m ifbf_fast.export --checkpoint runs/ifbfnet/best.pt --format torch-export --out ifbfnet.pt2

The exported graph takes one normalised image batch, float32 ``(1, 3, H, W)`` (RGB on the 0..255 scale
minus ``ImageNet mean * 255``, divided by ``ImageNet std * 255``: ``Segmenter.to_tensor``), and returns
the main logits ``(1, classes, H, W)``, whose argmax over dim 1 is the train-id map. H and W are fixed
(``--size``; default: the size of the check image).

What makes the network exportable, without changing a weight:

* The InPlace-ABN(-Sync) layers call a C++/CUDA custom op that neither exporter knows. They are
  replaced by the reference ``ABN`` (``ifbf_fast.nn``), which has the same constructor and the same
  ``state_dict``: the swap copies the buffers and parameters one to one. In eval mode ABN is
  ``F``-level batch norm with the running statistics, ``|weight| + eps`` and the activation.
* The fused FBF (Triton) is a custom op as well: the export runs under
  ``ifbf_fast.ops.use_impl("reference")``, so every FBF traces as pooling, a 1x1 product, sigmoid
  and scale (``ops.fbf_ref``).

The check runs the original model (the loaded checkpoint, fast paths where this machine has them)
and the exported file (ONNX through onnxruntime on the CPU; the ``.pt2`` through ``torch.export.load``)
on a real image, an image of the synthetic city unless ``--image`` is given, resized to ``--size``,
and prints the largest absolute difference of the logits and how many pixels' argmax agree.
``--format onnx`` uses PyTorch's TorchScript-based ONNX exporter (``dynamo=False``): it needs only the
``onnx`` package, where the dynamo exporter also needs ``onnxscript``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Iterable, Optional, Tuple

import numpy as np
import torch

from ifbf_fast.utils.runtime import UsageError

PROG = "python -m ifbf_fast.export"
FORMATS = ("onnx", "torch-export")
DEFAULT_SIZE = (256, 512)      # the synthetic city's image size
OPSET = 17
CHECK_RTOL = 1e-3      # largest logit difference allowed by the check, relative to max(1, |logits|)


class ExportError(RuntimeError):
    """Bad input, or an export that cannot be made or checked; the message is one line (exit code 1)."""


class ExportUsageError(ExportError, UsageError):
    """An option value that cannot work (an unknown format, an --out that cannot be written): exit code
    2, as argparse's errors (``UsageError``)."""


def export_format(text: str) -> str:
    """argparse type of ``--format``: one of ``FORMATS`` (the message lists them)."""
    if text not in FORMATS:
        raise argparse.ArgumentTypeError(f"unknown format {text!r}; expected one of {', '.join(FORMATS)}")
    return text


def exportable(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every InPlace-ABN(-Sync) replaced, in place, by the reference ``ABN`` holding the
    same parameters and buffers (same constructor, same state_dict). Returns ``model``."""
    from ifbf_fast.nn import ABN, InPlaceABN, InPlaceABNSync

    for name, child in list(model.named_children()):
        if isinstance(child, (InPlaceABN, InPlaceABNSync)) and type(child) is not ABN:
            ref = ABN(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                      activation=child.activation, slope=child.slope)
            ref.load_state_dict(child.state_dict())
            ref.train(child.training)
            setattr(model, name, ref.to(child.running_mean.device))
        else:
            exportable(child)
    return model


class Logits(torch.nn.Module):
    """The main logits tensor of IFBFNet's ``{"out": ...}`` (exporters want tensors, not dicts)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)["out"]


@contextlib.contextmanager
def _quiet():
    """The tracer warns about every Python ``if`` on a shape (argument checks that hold for the fixed
    export size) and about the TorchScript exporter's deprecation; the check below is what counts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_onnx(net: torch.nn.Module, x: torch.Tensor, out: str) -> None:
    with _quiet():
        torch.onnx.export(net, (x,), out, dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=["logits"], do_constant_folding=True)


def run_onnx(path: str, x: torch.Tensor) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("checking an ONNX export needs onnxruntime (pip install onnxruntime), "
                          "or pass --no-check") from None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0]


def export_program(net: torch.nn.Module, x: torch.Tensor, out: str) -> None:
    with _quiet():
        program = torch.export.export(net, (x,))
    torch.export.save(program, out)


def run_program(path: str, x: torch.Tensor) -> np.ndarray:
    program = torch.export.load(path)
    with torch.no_grad():
        return program.module()(x).float().cpu().numpy()


def check_image(path: Optional[str], size: Optional[Tuple[int, int]]) -> Tuple[np.ndarray, str]:
    """(RGB uint8 image at ``size``, what it is): ``--image`` or a synthetic-city scene."""
    import cv2

    if path:
        from ifbf_fast.data import read_image

        image, what = read_image(path), path
    else:
        from ifbf_fast.data import render_scene

        h, w = size or DEFAULT_SIZE
        image, what = render_scene(h, w, np.random.default_rng(0))[0], "a synthetic-city scene"
    if size and image.shape[:2] != tuple(size):
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return image, what


def export(checkpoint: str, fmt: str, out: str, size: Optional[Tuple[int, int]] = None,
           image: Optional[str] = None, check: bool = True, log=print) -> dict:
    """Export ``checkpoint`` to ``out``; returns ``{"size", "max_abs_diff", "argmax_agree", ...}``.
    See the module docstring."""
    from ifbf_fast import ops
    from ifbf_fast.inference import load_model

    if fmt not in FORMATS:
        raise ExportUsageError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    _check_writable(out)
    seg = load_model(checkpoint, device="cpu", channels_last=False)
    picture, what = check_image(image, size)
    x = seg.to_tensor(picture)
    with torch.no_grad():
        reference = Logits(seg.model)(x).float().numpy()          # the model as loaded, before the swap
    net = Logits(exportable(seg.model)).eval()
    try:
        with ops.use_impl("reference"), torch.no_grad():
            (export_onnx if fmt == "onnx" else export_program)(net, x, out)
    except ExportError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"exporting {checkpoint} to {fmt} failed ({type(exc).__name__}: {first})") from exc
    result = {"checkpoint": checkpoint, "format": fmt, "out": out, "size": tuple(x.shape[-2:]),
              "classes": seg.num_classes}
    if check:
        got = run_onnx(out, x) if fmt == "onnx" else run_program(out, x)
        if got.shape != reference.shape:
            raise ExportError(f"{out}: the export returns logits {got.shape}, PyTorch {reference.shape}")
        result["max_abs_diff"] = float(np.abs(got - reference).max())
        result["argmax_agree"] = float((got.argmax(1) == reference.argmax(1)).mean())
        runner = "onnxruntime (CPU)" if fmt == "onnx" else "torch.export.load"
        scale = float(np.abs(reference).max())
        log(f"check on {what} at {x.shape[-2]}x{x.shape[-1]}: {runner} vs PyTorch, largest |logit difference| "
            f"{result['max_abs_diff']:.3g} (logits up to {scale:.3g}); argmax agrees "
            f"on {100 * result['argmax_agree']:.2f}% of pixels")
        # fp32 throughout: reassociation in another runtime moves logits by ~1e-6 of their range
        if not result["max_abs_diff"] <= CHECK_RTOL * max(1.0, scale):
            raise ExportError(f"{out} differs from the PyTorch model by up to {result['max_abs_diff']:.3g} "
                              f"(allowed {CHECK_RTOL:g} of the logits' range); the file is left for inspection")
    h, w = result["size"]
    log(f"wrote {out} ({fmt}, {os.path.getsize(out) / 2**20:.1f} MiB): input 'image' float32 (1, 3, {h}, {w}), "
        f"normalised RGB; output 'logits' float32 (1, {seg.num_classes}, {h}, {w})")
    return result


def _check_writable(out: str) -> None:
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise ExportUsageError(f"--out {out} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise ExportUsageError(f"--out {out}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        raise ExportUsageError(f"--out {out}: not writable")


def build_parser() -> argparse.ArgumentParser:
    from ifbf_fast.inference import parser

    p = parser(PROG, "Export a train.py checkpoint to ONNX or torch.export, checked against the PyTorch model "
                     "on a real image.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="best.pt or iter_XXXXXXXX.pt from train.py")
    p.add_argument("--format", required=True, type=export_format, metavar="|".join(FORMATS),
                   help="onnx: an .onnx file; torch-export: a .pt2 file for torch.export.load")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (its folder must exist)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input size (> 0) of the exported graph; default: the --image's size, else "
                        f"{DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]}")
    p.add_argument("--image", metavar="PNG", default=None,
                   help="image for the check (resized to --size); default: a synthetic-city scene")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the check against PyTorch")
    return p


def parse_args(argv: Iterable[str] = None) -> argparse.Namespace:
    """Parse and check what needs no work; one line and exit code 2 (``Parser.error``) on bad input."""
    from ifbf_fast.inference import existing_file

    p = build_parser()
    a = p.parse_args(argv)
    if a.size is not None and min(a.size) <= 0:
        p.error(f"--size must be positive; got {a.size[0]} {a.size[1]}")
    existing_file(p, "--checkpoint", a.checkpoint, "best.pt or iter_XXXXXXXX.pt written by train.py")
    existing_file(p, "--image", a.image, "a PNG or JPEG image")
    try:
        _check_writable(a.out)
    except ExportUsageError as exc:
        p.error(str(exc))
    return a


def main(argv: Iterable[str] = None) -> int:
    """Exit code 0; 2 for a usage error (argparse's, a path that does not exist, an --out that cannot be
    written); 1 for an unreadable checkpoint or image, an export that fails or differs from PyTorch."""
    from ifbf_fast.engine.preflight import user_errors
    from ifbf_fast.inference import InferenceError, report

    a = parse_args(argv)
    try:
        export(a.checkpoint, a.format, a.out, tuple(a.size) if a.size else None, a.image, a.check)
    except user_errors(ExportError, InferenceError) as exc:
        return report(PROG, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
