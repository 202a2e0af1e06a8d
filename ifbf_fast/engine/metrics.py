"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

The matrix is accumulated on the device (one ``bincount`` per batch, no host sync) and all-reduced
across ranks before the numbers are read, so every rank reports the same figures whatever the
sharding. A class that appears in neither the ground truth nor the predictions has no IoU (NaN) and
does not count in the mean, as in the official Cityscapes evaluation.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ifbf_fast.utils.dist import all_reduce_sum


class ConfusionMatrix:
    """``num_classes x num_classes`` counts: rows are the ground truth, columns the prediction."""

    def __init__(self, num_classes: int, device=None, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` hold class ids of the same shape, any integer dtype (the
        loaders' labels are uint8); ignored pixels skip."""
        if pred.shape != target.shape:
            raise ValueError(f"ConfusionMatrix.update: prediction {tuple(pred.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        n = self.num_classes
        # Widened before any arithmetic: target * n + pred reaches n * n - 1, which wraps in uint8 (the
        # loaders' label dtype) from n = 16 on; bincount wants int64 anyway. Evaluation only, not the step.
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        valid = (target != self.ignore_index) & (target >= 0) & (target < n)
        # Ignored pixels go to an extra bin that is dropped, so no boolean indexing (no host sync).
        index = torch.where(valid, target * n + pred.clamp(0, n - 1), torch.full_like(target, n * n))
        self.mat += torch.bincount(index, minlength=n * n + 1)[: n * n].view(n, n)

    def all_reduce(self) -> "ConfusionMatrix":
        all_reduce_sum(self.mat)
        return self

    def reset(self) -> None:
        self.mat.zero_()

    def compute(self) -> Dict[str, object]:
        """Per-class IoU (NaN where the class is absent from prediction and ground truth), mIoU,
        pixel accuracy and mean class accuracy, as Python floats/lists."""
        mat = self.mat.double().cpu()
        tp = mat.diag()
        gt = mat.sum(1)
        pred = mat.sum(0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
        total = mat.sum()
        present = ~torch.isnan(iou)
        return {
            "iou": iou.tolist(),
            "miou": float(iou[present].mean()) if bool(present.any()) else float("nan"),
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mean_acc": float(acc[~torch.isnan(acc)].mean()) if bool((~torch.isnan(acc)).any()) else float("nan"),
            "pixels": int(total),
        }


def format_table(result: Dict[str, object], class_names: Optional[Sequence[str]] = None) -> str:
    """A per-class IoU table with the class names, then mIoU and pixel accuracy."""
    ious = result["iou"]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(ious))]
    width = max(len(n) for n in names + ["class"])
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    for name, iou in zip(names, ious):
        cell = "    n/a" if iou != iou else f"{100 * iou:7.2f}"
        lines.append(f"{name:<{width}}  {cell}")
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}  {100 * result['miou']:7.2f}")
    lines.append(f"{'pixel acc':<{width}}  {100 * result['pixel_acc']:7.2f}")
    return "\n".join(lines)
