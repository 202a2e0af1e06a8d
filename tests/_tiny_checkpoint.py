"""A tiny train.py checkpoint made without training (for the inference and export tests).

``write_tiny_checkpoint`` parses train.py's options (ResNet-18, a small crop), builds the model the
trainer builds, gives its norm layers and FBF modules non-trivial weights and statistics (a freshly
initialised model has running mean 0 / variance 1 and FBF gates of exactly 0.5, which would hide a
wrong swap of the norm layers or a lost FBF), and saves the trainer's checkpoint layout
(engine/trainer.py ``save``): model, optimizer, scheduler, scaler, position, RNG, ``meta``, ``args``.
Building and saving takes about a second, against about a minute for a two-step training run.
"""
import os

import torch

from ifbf_fast.engine import checkpoint as ck
from ifbf_fast.engine.config import model_meta, parse_args, to_dict
from ifbf_fast.inference import model_from_args


def write_tiny_checkpoint(folder: str, norm: str = "inplace_abn_sync", crop: int = 64, seed: int = 0) -> str:
    os.makedirs(folder, exist_ok=True)
    args = parse_args(["--data", folder, "--out", folder, "--backbone", "resnet18", "--crop-size", str(crop),
                       "--norm", norm, "--iters", "2", "--warmup-iters", "1", "--gpus", "0"])
    args.channels_last = False          # what the trainer resolves --memory-format auto to on the CPU
    torch.manual_seed(seed)
    model = model_from_args(args, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point() and t.dim() == 1:        # norm scales
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif t.is_floating_point() and "fbf" in name:        # FBF 1x1 convolution (zero at init)
                t.copy_(0.05 * torch.randn(t.shape, generator=g))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": {}, "iteration": 0, "epoch": 0, "batches_in_epoch": 0, "best_miou": -1.0,
             "rng": ck.rng_state(), "meta": model_meta(args), "args": to_dict(args)}
    path = os.path.join(folder, "best.pt")
    ck.save_atomic(state, path)
    return path
