"""Validation: whole-image inference, optional multi-scale and flip, mIoU from a confusion matrix.

Multi-scale + flip (paper 4.3.4: scales 0.5-1.75 with flip) averages the logits at full input
resolution. Each rank evaluates its own shard of the images and the confusion matrix is all-reduced,
so every image counts exactly once whatever the number of processes.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .metrics import ConfusionMatrix


def main_logits(output) -> torch.Tensor:
    """The main logits of a model output: IFBFNet returns ``{"out": ..., ["aux": ...]}``."""
    if isinstance(output, dict):
        return output["out"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,),
            flip: bool = False, autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """Full-resolution fp32 logits of ``images`` (N, 3, H, W), averaged over scales and flips."""
    n, _, h, w = images.shape
    total: Optional[torch.Tensor] = None
    count = 0
    for scale in scales:
        if scale == 1.0:
            x = images
        else:
            size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            with autocast():
                logits = main_logits(model(xi))
            logits = logits.float()
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
            count += 1
    return total / count


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Dict[str, torch.Tensor]], num_classes: int,
             device: torch.device, scales: Sequence[float] = (1.0,), flip: bool = False,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext,
             channels_last: bool = False, progress: Optional[Callable[[Iterable], Iterable]] = None
             ) -> Dict[str, object]:
    """mIoU, per-class IoU and pixel accuracy of ``model`` on ``loader`` (all ranks combined).

    ``loader`` yields ``{"image": (N,3,H,W) float, "label": (N,H,W) int}`` batches with trainIds
    (255 = ignore). The model is put in eval mode and restored to its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    try:
        batches = progress(loader) if progress is not None else loader
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = batch["label"].to(device, non_blocking=True)
            logits = predict(model, images, scales, flip, autocast)
            cm.update(logits.argmax(1), labels)
    finally:
        model.train(was_training)
    cm.all_reduce()
    return cm.compute()
