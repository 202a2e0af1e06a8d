"""What a user sees during training: a progress bar with ETA, images/s, loss terms, learning rate and
memory; the per-class IoU table after each evaluation; TensorBoard scalars when tensorboard is
installed. Only the primary rank logs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence

import torch

from .metrics import format_table


def _memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
    try:
        import resource
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}G rss"
    except ImportError:  # pragma: no cover - not on Linux
        return "n/a"


class Logger:
    def __init__(self, args: argparse.Namespace, enabled: bool = True):
        self.enabled = enabled
        self.progress = bool(getattr(args, "progress", True)) and sys.stderr.isatty()
        self.log_every = args.log_every
        self.bar = None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(args.out, "tb"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def info(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def start(self, total: int, initial: int = 0) -> None:
        if self.enabled and self.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")

    def step(self, it: int, terms: Dict[str, torch.Tensor], lr, images_per_s: Optional[float],
             device: torch.device) -> None:
        """Called every step; reads ``terms`` and ``lr`` (device tensors) only every ``log_every`` steps.
        ``images_per_s`` is the last measured rate (None between the trainer's reads)."""
        if not self.enabled:
            return
        if images_per_s is not None:
            self.images_per_s = images_per_s
        if self.bar is not None:
            self.bar.update(1)
        if it % self.log_every:
            return
        images_per_s = getattr(self, "images_per_s", 0.0)
        lr = float(lr)
        values = {k: float(v) for k, v in terms.items() if k != "skipped"}   # one host sync per log_every steps
        text = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix_str(f"{text} lr {lr:.2e} {images_per_s:.1f} img/s mem {_memory(device)}")
        else:
            print(f"step {it}: {text} lr {lr:.3e} {images_per_s:.1f} img/s mem {_memory(device)}", flush=True)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, it)
            self.tb.add_scalar("train/lr", lr, it)
            self.tb.add_scalar("train/images_per_s", images_per_s, it)

    def eval(self, it: int, result: Dict[str, object], class_names: Optional[Sequence[str]]) -> None:
        if not self.enabled:
            return
        self.info(f"evaluation at step {it}:\n{format_table(result, class_names)}")
        if self.tb is not None:
            self.tb.add_scalar("val/mIoU", result["miou"], it)
            self.tb.add_scalar("val/pixel_acc", result["pixel_acc"], it)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
