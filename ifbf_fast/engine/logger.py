"""What a user sees during training, and the record a run leaves beside its checkpoints.

* the console: a progress bar with ETA, images/s, loss terms, learning rate and memory on a terminal;
  without one (nohup, a job scheduler) plain periodic lines with the same values and the ETA;
* ``OUT/train.log``: every line the console shows (info lines, step lines, evaluation tables), always
  plain text, appended across resumes;
* ``OUT/metrics.jsonl``: one JSON object per log interval (``{"step", "loss", ..., "lr",
  "images_per_s", "eta_s", "skipped"}``) and per evaluation (``{"step", "eval": {"miou", "pixel_acc",
  "iou": {class: value}}}``), for plotting without TensorBoard;
* TensorBoard (``OUT/tb``, installed by requirements.txt): the same scalars, per-class IoU, and colour
  predictions of a few validation images at every evaluation.

Only the primary rank logs. Nothing here reads the device except at a log interval (one read, shared
with the trainer's counters) and at evaluations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, Optional, Sequence

import numpy as np
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


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Logger:
    def __init__(self, args: argparse.Namespace, enabled: bool = True):
        self.enabled = enabled
        self.progress = bool(getattr(args, "progress", True)) and sys.stderr.isatty()
        self.log_every = args.log_every
        self.images_per_step = args.batch_size
        self.total = args.iters
        self.files_failed = False
        self.bar = None
        self.tb = None
        self.text = None
        self.jsonl = None
        self.images_per_s = 0.0
        self.out = args.out
        self.tb_failed = False

    @property
    def board(self):
        """The TensorBoard writer, created at the first record (nothing is written into --out before the
        run has passed its checks); None where tensorboard is missing or the folder unwritable."""
        if self.tb is None and self.enabled and not self.tb_failed:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(self.out, "tb"))
            except Exception:   # the text record still works
                self.tb_failed = True
        return self.tb

    def _open_files(self) -> None:
        if self.text is None and self.enabled and not self.files_failed:
            try:
                os.makedirs(self.out, exist_ok=True)
                self.text = open(os.path.join(self.out, "train.log"), "a", buffering=1)
                self.jsonl = open(os.path.join(self.out, "metrics.jsonl"), "a", buffering=1)
            except OSError:     # an unwritable --out is reported by the trainer's output check
                self.files_failed = True

    def _write(self, text: str) -> None:
        self._open_files()
        if self.text is not None:
            self.text.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}\n")

    def _record(self, obj: dict) -> None:
        self._open_files()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(obj) + "\n")

    def info(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)
        self._write(text)

    def start(self, total: int, initial: int = 0, images_per_step: Optional[int] = None) -> None:
        self.total = total
        if images_per_step:
            self.images_per_step = images_per_step
        if self.enabled and self.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")

    def step(self, it: int, terms: Dict[str, torch.Tensor], lr, images_per_s: Optional[float],
             device: torch.device, skipped: int = 0) -> None:
        """Called every step; reads ``terms`` and ``lr`` (device tensors) only every ``log_every`` steps.
        ``images_per_s`` is the last measured rate (None between the trainer's reads); ``skipped`` the
        steps skipped since the last log line."""
        if not self.enabled:
            return
        if images_per_s is not None:
            self.images_per_s = images_per_s
        if self.bar is not None:
            self.bar.update(1)
        if it % self.log_every:
            return
        lr = float(lr)
        values = {k: float(v) for k, v in terms.items() if k != "skipped"}   # one host sync per log_every steps
        rate = self.images_per_s
        eta = (self.total - it) * self.images_per_step / rate if rate > 0 else float("nan")
        text = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        line = (f"step {it}/{self.total}: {text} lr {lr:.3e} {rate:.1f} img/s mem {_memory(device)} "
                f"eta {format_eta(eta)}")
        if self.bar is not None:
            self.bar.set_postfix_str(f"{text} lr {lr:.2e} {rate:.1f} img/s mem {_memory(device)}")
        else:
            print(line, flush=True)
        self._write(line)
        self._record({"step": it, **values, "lr": lr, "images_per_s": rate,
                      "eta_s": eta if math.isfinite(eta) else None, "skipped": skipped})
        if self.board is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, it)
            self.tb.add_scalar("train/lr", lr, it)
            self.tb.add_scalar("train/images_per_s", rate, it)

    def eval(self, it: int, result: Dict[str, object], class_names: Optional[Sequence[str]],
             images: Optional[Sequence[np.ndarray]] = None) -> None:
        """The IoU table, the metrics record, and in TensorBoard the scalars, per-class IoU and
        ``images``: (H, W, 3) uint8 panels (image | prediction) of a few validation images."""
        if not self.enabled:
            return
        self.info(f"evaluation at step {it}:\n{format_table(result, class_names)}")
        names = list(class_names) if class_names else [str(i) for i in range(len(result["iou"]))]
        ious = {n: (None if v != v else v) for n, v in zip(names, result["iou"])}
        self._record({"step": it, "eval": {"miou": result["miou"], "pixel_acc": result["pixel_acc"], "iou": ious}})
        if self.board is not None:
            self.tb.add_scalar("val/mIoU", result["miou"], it)
            self.tb.add_scalar("val/pixel_acc", result["pixel_acc"], it)
            for n, v in ious.items():
                if v is not None:
                    self.tb.add_scalar(f"val_iou/{n}", v, it)
            for i, img in enumerate(images or ()):
                self.tb.add_image(f"val_prediction/{i}", img, it, dataformats="HWC")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        for f in (self.text, self.jsonl):
            if f is not None:
                f.close()
        self.text = self.jsonl = None
