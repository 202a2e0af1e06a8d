"""Validation and inference: whole-image or sliding-window, optional multi-scale and flip, mIoU.

``predict`` returns fp32 logits at the input resolution, averaged over every (scale, flip) view
(paper 4.3.4: scales 0.5-1.75 with flip). For one scale, the flipped copy travels in the same
forward batch as the original, and in ``mode="slide"`` all tiles of all images of the batch go
through the model together (in chunks of ``max_batch``), so the device sees few large batches
rather than many small ones.

Sliding window (``mode="slide"``, as mmsegmentation's ``slide_inference``): the (scaled) image is
cut into ``crop_size`` tiles whose top-left corners step by ``stride``, the last row/column clamped
to the border, so tiles overlap wherever the stride is smaller than the crop or the size is not a
multiple of it; each pixel's logits are the mean over the tiles that cover it. An image smaller
than the crop is padded bottom/right with 0 (the normalised mean colour, as in training,
docs/DESIGN.md section 3) up to the crop and the padding is cut off again.

Averaging happens on logits, not probabilities. The views of one scale are summed at that scale and
resized once; bilinear resizing is linear, so this equals resizing every view and then averaging.

``evaluate`` runs ``predict`` over a loader shard, accumulates a confusion matrix and all-reduces it,
so every image counts exactly once whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ifbf_fast.utils.dist import all_reduce_sum

from .metrics import ConfusionMatrix

MODES = ("whole", "slide")
Size2 = Union[int, Sequence[int]]


def main_logits(output) -> torch.Tensor:
    """The main logits of a model output: IFBFNet returns ``{"out": ..., ["aux": ...]}``."""
    if isinstance(output, dict):
        return output["out"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _pair(value: Optional[Size2], name: str) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    h, w = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return h, w


def tile_starts(length: int, crop: int, stride: int) -> List[int]:
    """Start offsets of the tiles along one axis: every ``stride``, the last one clamped so that the
    tiles end at the border; a single tile at 0 when ``length <= crop``."""
    if length <= crop:
        return [0]
    n = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(n)]


def _run(model, x: torch.Tensor, autocast, max_batch: Optional[int], channels_last: bool) -> torch.Tensor:
    """fp32 logits of ``x``, the batch split into chunks of at most ``max_batch``."""
    step = x.shape[0] if not max_batch else max_batch
    outs = []
    for i in range(0, x.shape[0], step):
        chunk = x[i:i + step]
        chunk = chunk.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with autocast():
            logits = main_logits(model(chunk))
        outs.append(logits.float())
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _slide(model, x: torch.Tensor, crop: Tuple[int, int], stride: Tuple[int, int], autocast,
           max_batch: Optional[int], channels_last: bool) -> torch.Tensor:
    """Sliding-window logits of ``x`` (B, 3, H, W) at its own size, averaged over overlapping tiles."""
    b, _, h, w = x.shape
    ph, pw = max(h, crop[0]), max(w, crop[1])
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h))
    boxes = [(y, xx) for y in tile_starts(ph, crop[0], stride[0]) for xx in tile_starts(pw, crop[1], stride[1])]
    tiles = torch.stack([x[:, :, y:y + crop[0], xx:xx + crop[1]] for y, xx in boxes], dim=1)  # (B, T, 3, ch, cw)
    logits = _run(model, tiles.flatten(0, 1), autocast, max_batch, channels_last)
    logits = logits.view(b, len(boxes), *logits.shape[1:])
    total = logits.new_zeros(b, logits.shape[2], ph, pw)
    count = logits.new_zeros(1, 1, ph, pw)
    for t, (y, xx) in enumerate(boxes):
        total[:, :, y:y + crop[0], xx:xx + crop[1]] += logits[:, t]
        count[:, :, y:y + crop[0], xx:xx + crop[1]] += 1
    return (total / count)[:, :, :h, :w]


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,),
            flip: bool = False, autocast: Callable[[], ContextManager] = contextlib.nullcontext, *,
            mode: str = "whole", crop_size: Optional[Size2] = None, stride: Optional[Size2] = None,
            max_batch: Optional[int] = None, channels_last: bool = False) -> torch.Tensor:
    """Full-resolution fp32 logits of ``images`` (N, 3, H, W), averaged over scales and flips.

    ``mode="slide"`` needs ``crop_size`` (int or (h, w)); ``stride`` defaults to two thirds of the
    crop. ``max_batch`` caps the inputs per forward call (images x flips, or tiles); ``None`` = all.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    crop = _pair(crop_size, "crop_size")
    if mode == "slide":
        if crop is None:
            raise ValueError("mode='slide' needs crop_size")
        step = _pair(stride, "stride") or (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
        if step[0] > crop[0] or step[1] > crop[1]:
            raise ValueError(f"stride {step} larger than crop_size {crop} would leave pixels uncovered")
    if not scales:
        raise ValueError("scales must not be empty")
    n, _, h, w = images.shape
    total: Optional[torch.Tensor] = None
    count = 0
    for scale in scales:
        if scale == 1.0:
            x = images
        else:
            size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        views = torch.cat([x, x.flip(-1)]) if flip else x
        if mode == "whole":
            logits = _run(model, views, autocast, max_batch, channels_last)
        else:
            logits = _slide(model, views, crop, step, autocast, max_batch, channels_last)
        if flip:
            logits = logits[:n] + logits[n:].flip(-1)
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        total = logits if total is None else total + logits
        count += 2 if flip else 1
    return total / count


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Dict[str, torch.Tensor]], num_classes: int,
             device: torch.device, scales: Sequence[float] = (1.0,), flip: bool = False,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext,
             channels_last: bool = False, progress: Optional[Callable[[Iterable], Iterable]] = None, *,
             mode: str = "whole", crop_size: Optional[Size2] = None, stride: Optional[Size2] = None,
             max_batch: Optional[int] = None,
             on_prediction: Optional[Callable[[List[str], torch.Tensor], None]] = None) -> Dict[str, object]:
    """mIoU, per-class IoU and pixel accuracy of ``model`` on ``loader`` (all ranks combined).

    ``loader`` yields ``{"image": (N,3,H,W) float, "label": (N,H,W) int[, "name": [str]]}`` batches
    with trainIds (255 = ignore). ``mode``, ``crop_size``, ``stride``, ``max_batch`` go to
    ``predict``; ``on_prediction(names, pred)`` receives each batch's (N, H, W) trainId prediction
    (e.g. to write result files). The model is put in eval mode and restored afterwards.

    Besides ``ConfusionMatrix.compute``'s keys, the result holds ``"images"`` (images evaluated over
    all ranks) and ``"confusion"`` (the all-reduced matrix as nested lists, rows = ground truth).
    """
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    images_seen = torch.zeros((), dtype=torch.int64, device=device)
    try:
        batches = progress(loader) if progress is not None else loader
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = batch["label"].to(device, non_blocking=True)
            logits = predict(model, images, scales, flip, autocast, mode=mode, crop_size=crop_size,
                             stride=stride, max_batch=max_batch, channels_last=channels_last)
            pred = logits.argmax(1)
            cm.update(pred, labels)
            images_seen += images.shape[0]
            if on_prediction is not None:
                names = batch.get("name") or [str(i) for i in range(images.shape[0])]
                on_prediction(list(names), pred)
    finally:
        model.train(was_training)
    cm.all_reduce()
    all_reduce_sum(images_seen)
    result = cm.compute()
    result["images"] = int(images_seen)
    result["confusion"] = cm.mat.cpu().tolist()
    return result
