"""Inference from a train.py checkpoint: the Python API, and what the evaluate/predict command lines share.

    import ifbf_fast
    model = ifbf_fast.load_model("runs/ifbfnet/best.pt", device="cuda")
    train_ids = model.predict("frankfurt_000000_000294_leftImg8bit.png", scales=(0.75, 1.0, 1.25), flip=True)
    ifbf_fast.overlay(image, model.colorize(train_ids))

``load_model`` rebuilds the network from the arguments saved in the checkpoint (its ``meta`` block is
checked against them), loads the weights, puts it in eval mode (the norm layers then use their running
statistics, whichever norm, InPlace-ABN-Sync included, it was trained with) and returns a
:class:`Segmenter`. The segmenter knows the preprocessing of the evaluation loader
(``ifbf_fast.data.transforms``): RGB on the 0..255 scale, minus ``mean * 255``, divided by
``std * 255`` (ImageNet's statistics), in float32. It uploads the uint8 image and normalises on the
device (a quarter of the bytes of a float upload); both are IEEE float32 subtract-then-divide with the
same constants, so the input equals the loader's bit for bit and the CLIs' results equal the API's.

``Segmenter.predict`` and ``Segmenter.evaluate`` run ``ifbf_fast.engine.evaluate`` (whole image or
sliding window, multi-scale, flip; the views and tiles batched under ``max_batch``), so
``python -m ifbf_fast.predict`` and ``python -m ifbf_fast.evaluate`` are thin layers over this module:
it also holds their shared options (``add_inference_options``) and the output files (colour masks,
overlays, Cityscapes submission PNGs).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ifbf_fast.engine import checkpoint as ck
from ifbf_fast.engine import evaluate as ev
from ifbf_fast.utils.runtime import UsageError

EXTENSIONS = (".png", ".jpg", ".jpeg")
ImageLike = Union[np.ndarray, str, os.PathLike]


class InferenceError(RuntimeError):
    """Bad input or set-up for inference; the message is one line."""


def one_line(exc: BaseException) -> str:
    """The message on one line (torch.load's own messages span several)."""
    return " ".join(str(exc).split())


# --- the model from a checkpoint ----------------------------------------------------------------

def model_from_args(args: argparse.Namespace, device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """The IFBFNet that train.py's arguments describe, on ``device`` (channels_last if they say so).

    Training passes the heads' 1/4-resolution logits to the loss (``upsample_logits=False``); eval
    mode always returns full-size logits, so the same construction serves training and inference."""
    from ifbf_fast.models import build_model
    from ifbf_fast.nn import norm_act

    kind = {"bn": "bn_leaky_relu"}.get(args.norm, args.norm)
    model = build_model({"backbone": args.backbone, "num_classes": args.num_classes,
                         "output_stride": args.output_stride, "spatial_channels": args.spatial_channels,
                         "aspp": args.aspp, "skip": args.skip, "fbf": args.fbf, "spatial": args.spatial,
                         "aux": args.aux, "norm_act": norm_act(kind), "pretrained": args.pretrained,
                         "upsample_logits": False})
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def load_checkpoint(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                    channels_last: Optional[bool] = None) -> Tuple[torch.nn.Module, argparse.Namespace]:
    """(model in eval mode with the checkpoint's weights, the checkpoint's saved arguments).

    Raises ``CheckpointError`` for a missing or unreadable file, a file train.py did not write, or
    weights that do not fit the model its arguments describe."""
    from ifbf_fast.engine.config import model_meta

    path = os.fspath(path)
    checkpoint = ck.read(path, map_location="cpu")
    args = argparse.Namespace(**checkpoint.args)
    args.pretrained = None          # the ImageNet file of the training machine is neither needed nor there
    if channels_last is not None:
        args.channels_last = channels_last
    try:
        ck.check_meta(checkpoint.meta, model_meta(args), path)
        model = model_from_args(args, device)
        model.load_state_dict(checkpoint.model)
    except ck.CheckpointMismatch as exc:
        # Here both sides come from the file (its meta vs its own saved arguments): no option fixes
        # it, so it is a bad checkpoint (exit code 1), not train.py's usage error (exit code 2).
        raise ck.CheckpointError(str(exc)) from None
    except ck.CheckpointError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ck.CheckpointError(f"checkpoint {path}: cannot rebuild its model ({first})") from exc
    model.eval()
    return model, args


def load_model(path: Union[str, os.PathLike], device: Union[str, torch.device, None] = None,
               channels_last: Optional[bool] = None) -> "Segmenter":
    """A :class:`Segmenter` for a train.py checkpoint (``best.pt`` or ``iter_XXXXXXXX.pt``).

    ``device``: ``"cuda"``, ``"cpu"``, a ``torch.device``; ``None``: the GPU if there is one.
    ``channels_last``: override the layout saved in the checkpoint."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, args = load_checkpoint(path, device, channels_last)
    return Segmenter(model, args, device)


# --- the segmenter ------------------------------------------------------------------------------

def _amp_mode(amp: Union[str, bool, None]) -> str:
    if amp is None or amp is False:
        return "off"
    return "auto" if amp is True else str(amp)


class Segmenter:
    """A model in eval mode with its preprocessing and test-time settings (see the module docstring).

    Attributes: ``model`` (the ``torch.nn.Module``), ``args`` (the checkpoint's saved arguments),
    ``device``, ``num_classes``, ``classes`` (the class table the checkpoint records, see
    :func:`class_table`), ``class_names``, ``mean`` / ``std`` (per RGB channel, 0..1 scale, as
    ``ifbf_fast.data.IMAGENET_MEAN`` / ``IMAGENET_STD``), ``crop_size`` (the training crop, the
    sliding-window default) and ``channels_last``.
    """

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace, device: torch.device):
        from ifbf_fast.data import IMAGENET_MEAN, IMAGENET_STD

        self.model, self.args, self.device = model, args, torch.device(device)
        self.num_classes = int(args.num_classes)
        self.classes = class_table(args)
        self.class_names = list(self.classes.names)
        self.mean, self.std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
        self.channels_last = bool(getattr(args, "channels_last", False))
        c = getattr(args, "crop_size", None)
        self.crop_size = (int(c), int(c)) if isinstance(c, int) else tuple(int(v) for v in c) if c else None
        # float32 constants exactly as the loader's normalize() computes them (float64 * 255, rounded)
        mean255 = (np.asarray(self.mean, np.float64) * 255).astype(np.float32)
        std255 = (np.asarray(self.std, np.float64) * 255).astype(np.float32)
        self._mean255 = torch.from_numpy(mean255).view(1, 3, 1, 1).to(self.device)
        self._std255 = torch.from_numpy(std255).view(1, 3, 1, 1).to(self.device)

    def __repr__(self) -> str:
        return (f"Segmenter({self.args.backbone} IFBFNet, {self.num_classes} classes, on {self.device}, "
                f"mean={self.mean}, std={self.std} of RGB 0..255)")

    # preprocessing
    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """(H, W, 3) or (N, H, W, 3) uint8 RGB -> (N, 3, H, W) normalised float32 on the device."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x[None] if x.dim() == 3 else x
        x = x.permute(0, 3, 1, 2).float()
        return ((x - self._mean255) / self._std255).contiguous()

    def settings(self, mode: str = "whole", crop: Optional[Sequence[int]] = None,
                 stride: Optional[Sequence[int]] = None) -> Tuple[Optional[Tuple[int, int]], Optional[Tuple[int, int]]]:
        """(crop, stride) of a sliding window: ``crop``, else the training crop; (None, None) for whole."""
        return window(mode, crop, stride, self.crop_size)

    def _autocast(self, amp):
        from ifbf_fast.utils.runtime import autocast_factory, resolve_amp

        return autocast_factory(resolve_amp(_amp_mode(amp), self.device), self.device)

    # prediction
    @torch.no_grad()
    def logits(self, x: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False, mode: str = "whole",
               crop: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None,
               max_batch: Optional[int] = 8, amp: Union[str, bool, None] = "off") -> torch.Tensor:
        """fp32 logits (N, C, H, W) of a normalised batch ``x`` (N, 3, H, W), averaged over views."""
        crop_hw, stride_hw = self.settings(mode, crop, stride)
        return ev.predict(self.model, x.to(self.device), tuple(scales), flip, self._autocast(amp), mode=mode,
                          crop_size=crop_hw, stride=stride_hw, max_batch=max_batch or None,
                          channels_last=self.channels_last)

    def predict(self, image: Union[ImageLike, Sequence[ImageLike]], scales: Sequence[float] = (1.0,),
                flip: bool = False, mode: str = "whole", crop: Optional[Sequence[int]] = None,
                stride: Optional[Sequence[int]] = None, max_batch: Optional[int] = 8,
                amp: Union[str, bool, None] = "off"):
        """Train ids at the input size: (H, W) uint8 (int64 beyond 256 classes) numpy.

        ``image``: an (H, W, 3) uint8 RGB array or an image path; or a batch: a list of those (returns
        a list; the images may differ in size) or an (N, H, W, 3) array (returns (N, H, W)).
        ``scales`` / ``flip``: test-time views, logits averaged at full resolution. ``mode="slide"``:
        overlapping ``crop`` tiles (default: the training crop) every ``stride`` (default: 2/3 of the
        crop), averaged. ``max_batch``: at most this many inputs (views or tiles) per forward, images
        grouped the same way (0 or None: no cap). ``amp``: ``"off"``, ``"auto"`` (or True), ``"bf16"``,
        ``"fp16"``."""
        kw = dict(scales=scales, flip=flip, mode=mode, crop=crop, stride=stride, max_batch=max_batch, amp=amp)
        if isinstance(image, np.ndarray) and image.ndim == 4:
            if image.dtype != np.uint8 or image.shape[-1] != 3:
                raise ValueError(f"an image batch must be an RGB uint8 array (N, H, W, 3); got shape "
                                 f"{tuple(image.shape)} dtype {image.dtype}")
            if not len(image):
                return np.zeros(image.shape[:3], self._dtype())
            return np.stack(self._predict_many(list(image), **kw))
        if isinstance(image, (list, tuple)):
            return self._predict_many([self._read(im, f"image {i}") for i, im in enumerate(image)], **kw)
        return self._predict_many([self._read(image, "image")], **kw)[0]

    def _dtype(self):
        return np.uint8 if self.num_classes <= 256 else np.int64

    def _read(self, image: ImageLike, what: str) -> np.ndarray:
        if isinstance(image, (str, os.PathLike)):
            from ifbf_fast.data import read_image

            return read_image(os.fspath(image))
        return _check_image(image, what)

    def _predict_many(self, images: List[np.ndarray], max_batch: Optional[int], **kw) -> List[np.ndarray]:
        """Consecutive images of one size go through ``logits`` together, ``max_batch`` at a time."""
        out: List[np.ndarray] = []
        i = 0
        while i < len(images):
            j = i + 1
            while j < len(images) and (not max_batch or j - i < max_batch) and images[j].shape == images[i].shape:
                j += 1
            pred = self.logits(self.to_tensor(np.stack(images[i:j])), max_batch=max_batch, **kw).argmax(1)
            out += list(pred.to(torch.uint8 if self._dtype() == np.uint8 else torch.int64).cpu().numpy())
            i = j
        return out

    def evaluate(self, loader, scales: Sequence[float] = (1.0,), flip: bool = False, mode: str = "whole",
                 crop: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None,
                 max_batch: Optional[int] = 8, amp: Union[str, bool, None] = "off",
                 progress: Optional[Callable] = None,
                 on_prediction: Optional[Callable[[List[str], torch.Tensor], None]] = None) -> Dict[str, object]:
        """mIoU, per-class IoU, pixel accuracy on ``loader`` (``ifbf_fast.data.build_loader(train=False)``
        batches: already normalised); all processes combined (see ``ifbf_fast.engine.evaluate``)."""
        crop_hw, stride_hw = self.settings(mode, crop, stride)
        return ev.evaluate(self.model, loader, self.num_classes, self.device, tuple(scales), flip,
                           self._autocast(amp), self.channels_last, progress, mode=mode, crop_size=crop_hw,
                           stride=stride_hw, max_batch=max_batch or None, on_prediction=on_prediction)

    # colours
    def colorize(self, train_ids: np.ndarray) -> np.ndarray:
        """(H, W) train ids -> (H, W, 3) uint8 RGB in the colours of the checkpoint's class table (the
        Cityscapes palette for Cityscapes and the synthetic city; ignore: black)."""
        return self.classes.colorize(train_ids)

    def overlay(self, image: ImageLike, train_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """The colour mask of ``train_ids`` blended over ``image`` (array or path) with weight ``alpha``."""
        return overlay(self._read(image, "image"), self.colorize(train_ids), alpha)


def class_table(args: argparse.Namespace):
    """The class table a checkpoint's saved arguments record (``args.classes``, written by train.py from
    the dataset's table); for a checkpoint from before tables were recorded: Cityscapes' with 19
    classes, else names "0", "1", ... in grey levels."""
    from ifbf_fast.data.classes import CITYSCAPES, ClassTable, generic_table

    record = getattr(args, "classes", None)
    if isinstance(record, dict):
        try:
            table = ClassTable.from_dict(record, "the class table of the checkpoint's arguments")
        except ValueError as exc:
            raise ck.CheckpointError(str(exc)) from None
        if table.num_classes == int(args.num_classes):
            return table
    return CITYSCAPES if int(args.num_classes) == CITYSCAPES.num_classes else generic_table(args.num_classes)


def write_mask(out_dir: str, name: str, train_ids: np.ndarray, classes) -> str:
    """Write (H, W) train ids as the dataset's mask PNG ``OUT/NAME.png`` (mask values of ``classes``,
    the folder layout's ids; ignore as its ignore_id); returns the path."""
    path = os.path.join(out_dir, name + ".png")
    write_png(path, classes.to_mask_ids(np.asarray(train_ids)))
    return path


def _check_image(image, what: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"shape {tuple(image.shape)} dtype {image.dtype}" if isinstance(image, np.ndarray) else \
            type(image).__name__
        raise ValueError(f"{what} must be an RGB uint8 array (H, W, 3) or an image path; got {desc}")
    return image


# --- colours and output files -------------------------------------------------------------------

def colorize(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 RGB in the Cityscapes palette (``ifbf_fast.data.PALETTE``)."""
    from ifbf_fast.data import colorize as _colorize

    return _colorize(train_ids)


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``alpha`` of the colour mask over the RGB image, uint8."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * color.astype(np.float32)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def submission_name(name: str) -> Tuple[str, str]:
    """(city, file name) of the submission PNG for an image name or stem: ``berlin_000123_000019``
    or ``berlin_000123_000019_leftImg8bit.png`` -> ``("berlin", "berlin_000123_000019_leftImg8bit.png")``."""
    from cityscapesscripts.helpers.csHelpers import getCsFileInfo

    base = os.path.basename(name)
    stem = os.path.splitext(base)[0] if base.lower().endswith(EXTENSIONS) else base
    parts = stem.split("_")
    if len(parts) < 3 or not (parts[1].isdigit() and parts[2].isdigit()):
        raise InferenceError(f"{name}: not a Cityscapes file name (CITY_SEQ_FRAME[_leftImg8bit].png); "
                             f"--format submission needs them")
    info = getCsFileInfo("_".join(parts[:3]) + "_leftImg8bit.png")
    return info.city, f"{info.city}_{info.sequenceNb}_{info.frameNb}_leftImg8bit.png"


def write_png(path: str, array: np.ndarray) -> None:
    """Write an (H, W) gray or (H, W, 3) RGB uint8 PNG, creating folders; a clear error on failure."""
    import cv2

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = array[:, :, ::-1] if array.ndim == 3 else array
    if not cv2.imwrite(path, np.ascontiguousarray(data)):
        raise InferenceError(f"cannot write {path}")


def write_submission(out_dir: str, name: str, train_ids: np.ndarray) -> str:
    """Write (H, W) trainIds as the benchmark's labelIds PNG for image ``name``; returns the path."""
    from ifbf_fast.data import to_label_ids

    city, file = submission_name(name)
    path = os.path.join(out_dir, city, file)
    write_png(path, to_label_ids(np.asarray(train_ids)))
    return path


# --- command-line options shared by evaluate, predict and export --------------------------------
#
# The three command lines follow train.py's (``ifbf_fast.engine.config``): its ``Parser`` (argparse
# errors are one line, exit code 2), its ``HelpFormatter`` (no "(default: True)" on switches, no default
# where there is none), its ``finite_float`` (NaN and inf refused by the type). A mistake an option fixes
# (a value out of range, a path that does not exist, a --crop/--stride the checkpoint or the image
# cannot take) exits with 2; an unreadable checkpoint or image, or data that is not a Cityscapes layout,
# with 1 (``report``).

class InferenceUsageError(InferenceError, UsageError):
    """An option value that cannot work with this checkpoint, data or image (a sliding window the
    checkpoint gives no crop for, an input path that does not exist): exit code 2, as argparse's errors.
    Both an ``InferenceError`` (what the API raises) and a ``UsageError`` (what the command lines exit
    with 2 for)."""


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """train.py's argparse: one-line errors with exit code 2, its help formatter."""
    from ifbf_fast.engine.config import HelpFormatter, Parser

    return Parser(prog=prog, description=description, formatter_class=HelpFormatter)


def existing_file(p: argparse.ArgumentParser, option: str, path: Optional[str], what: str) -> None:
    """``p.error`` (exit 2) unless ``path`` (the value of ``option``) is None or an existing file."""
    if path is not None and not os.path.isfile(path):
        kind = "a folder, not a file" if os.path.isdir(path) else "no such file"
        p.error(f"{option} {path}: {kind} (expected {what})")


def report(prog: str, exc: BaseException) -> int:
    """Print the one-line message of a user error (``preflight.user_errors``) and return its exit code:
    2 for a usage error, 1 for the rest."""
    from ifbf_fast.engine.preflight import exit_code

    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    return exit_code(exc)


def add_inference_options(p: argparse.ArgumentParser) -> None:
    """Options of ``ifbf_fast.evaluate`` and ``ifbf_fast.predict``: test-time augmentation and runtime."""
    from ifbf_fast import ops
    from ifbf_fast.engine.config import finite_float

    g = p.add_argument_group("inference")
    g.add_argument("--mode", choices=ev.MODES, default="whole",
                   help="whole: the full image in one forward; slide: overlapping --crop tiles, averaged")
    g.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="sliding-window tile (> 0) with --mode slide; default: the training crop saved in the "
                        "checkpoint")
    g.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="sliding-window step (> 0, at most the crop) with --mode slide; default: two thirds of "
                        "the crop")
    g.add_argument("--scales", type=finite_float, nargs="+", default=[1.0],
                   help="test scales (> 0), logits averaged at full resolution (paper: 0.5 0.75 1.0 1.25 1.5 "
                        "1.75)")
    g.add_argument("--flip", action="store_true", help="also average the horizontally flipped image")
    g = p.add_argument_group("runtime")
    g.add_argument("--amp", nargs="?", const="auto", choices=("auto", "off", "bf16", "fp16"), default="off",
                   help="mixed precision (--amp alone: auto = bf16 where the GPU supports it, else fp16; off on "
                        "the CPU)")
    g.add_argument("--impl", choices=ops.IMPLS, default=None,
                   help="fused-op implementation; default: the IFBF_IMPL environment variable, else auto")
    g.add_argument("--channels-last", action="store_true",
                   help="run the model in channels_last layout; default: the layout saved in the checkpoint")
    g.add_argument("--max-batch", type=int, default=8,
                   help="at most this many inputs (images x flips, or tiles) per forward, 0: all at once (a "
                        "1.75-scale sliding window over a 1024x2048 image makes about 36 tiles of 876x876)")


def check_inference_options(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """argparse errors (one line, exit 2) for values the types cannot express; ``--max-batch 0``
    becomes ``None``. What needs the checkpoint (a stride larger than its training crop) is
    ``window``'s, before any work."""
    if any(s <= 0 for s in a.scales):
        p.error(f"--scales must be positive; got {' '.join(f'{s:g}' for s in a.scales)}")
    for name in ("crop", "stride"):
        v = getattr(a, name)
        if v is not None and min(v) <= 0:
            p.error(f"--{name} must be positive; got {v[0]} {v[1]}")
    if a.mode == "whole" and (a.crop is not None or a.stride is not None):
        given = "--crop" if a.crop is not None else "--stride"
        p.error(f"{given}: --crop/--stride are for --mode slide (the mode is whole)")
    if a.crop is not None and a.stride is not None and (a.stride[0] > a.crop[0] or a.stride[1] > a.crop[1]):
        p.error(f"--stride {a.stride[0]} {a.stride[1]} must not exceed --crop {a.crop[0]} {a.crop[1]} (pixels "
                f"between tiles would get no prediction)")
    if a.max_batch is not None and a.max_batch < 0:
        p.error(f"--max-batch must be >= 0 (0: all at once); got {a.max_batch}")
    if a.max_batch == 0:
        a.max_batch = None


def window(mode: str, crop: Optional[Sequence[int]], stride: Optional[Sequence[int]],
           default_crop: Optional[Sequence[int]]) -> Tuple[Optional[Tuple[int, int]], Optional[Tuple[int, int]]]:
    """(crop, stride) of a sliding window: ``crop``, else ``default_crop`` (the checkpoint's training
    crop); (None, None) for ``mode="whole"``. ``InferenceUsageError`` for a window the checkpoint cannot
    complete (no crop saved, a stride larger than its crop), so the command lines exit with 2 before
    any work instead of failing inside the first prediction."""
    if mode not in ev.MODES:
        raise ValueError(f"mode must be one of {ev.MODES}; got {mode!r}")
    if mode != "slide":
        if crop is not None or stride is not None:
            raise ValueError("crop/stride are for mode='slide'")
        return None, None
    crop = ev._pair(crop, "crop") if crop is not None else (ev._pair(default_crop, "crop") if default_crop else None)
    if crop is None:
        raise InferenceUsageError("mode slide: give a crop (--crop H W): the checkpoint records no training crop")
    stride = ev._pair(stride, "stride") if stride is not None else None
    if stride is not None and (stride[0] > crop[0] or stride[1] > crop[1]):
        raise InferenceUsageError(f"--stride {stride[0]} {stride[1]} must not exceed the crop {crop[0]}x{crop[1]} "
                                  f"(the checkpoint's training crop unless --crop is given): pixels between tiles "
                                  f"would get no prediction")
    return tuple(crop), stride


def options(a: argparse.Namespace) -> dict:
    """The keyword arguments of ``Segmenter.predict`` / ``evaluate`` from parsed inference options."""
    return dict(scales=tuple(a.scales), flip=a.flip, mode=a.mode, crop=a.crop, stride=a.stride,
                max_batch=a.max_batch, amp=a.amp)

