"""Building a training run: everything ``train.py`` sets up before its first step.

:func:`build_run` returns a :class:`Run`: the device, the data root (after the preflight check), the
model (and its DDP wrapper), the fused SGD and its device-side schedule, the loss, the sync-free
:class:`~ifbf_fast.engine.step.TrainStep`, both loaders, the logger, and the position to start from
(a fresh run, or the checkpoint ``--resume`` found). The loop (``ifbf_fast.engine.trainer``) only
steps, logs, evaluates and saves.

The order matters and is the same on every rank: seed, build the model (the same initial weights
everywhere), flatten its buffers (before DDP wraps it, so a skipped step restores them in place),
check ``--out`` (rank 0), resume, wrap, compile, then the loaders.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ifbf_fast import ops
from ifbf_fast.utils import dist as du
from ifbf_fast.utils.runtime import autocast_factory, resolve_amp, select_device

from . import checkpoint as ck
from .config import dump_yaml, model_meta, to_dict
from .logger import Logger
from .step import DeviceSchedule, FlatBuffers, TrainStep, fused_sgd


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


def amp_setup(mode: str, device: torch.device):
    """(autocast factory, resolved mode) for ``--amp``; fp16's loss scale lives in :class:`TrainStep`."""
    mode = resolve_amp(mode, device)
    return autocast_factory(mode, device), mode


def poly_warmup(max_iters: int, warmup_iters: int, power: float) -> Callable[[int], float]:
    """Learning-rate factor at step ``it``: poly decay ``(1 - it/max)^power`` times a linear warm-up
    ``(it + 1) / warmup`` over the first ``warmup_iters`` steps (paper 4.1)."""
    def factor(it: int) -> float:
        decay = max(0.0, 1.0 - it / max_iters) ** power
        return decay * min(1.0, (it + 1) / warmup_iters) if warmup_iters > 0 else decay
    return factor


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The run's IFBFNet (one construction for training and inference: ``ifbf_fast.inference``)."""
    from ifbf_fast.inference import model_from_args
    return model_from_args(args, device)


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace):
    """(fused SGD over the paper's two learning-rate groups, the poly + warm-up schedule on the device).

    The schedule follows the steps taken: a step skipped for a non-finite loss does not advance it.
    """
    from ifbf_fast.models import param_groups

    groups = param_groups(model, args.lr, args.lr_mult)
    optimizer = fused_sgd(groups, args.lr, args.momentum, args.weight_decay)
    device = next(model.parameters()).device
    schedule = DeviceSchedule(optimizer, poly_warmup(args.iters, args.warmup_iters, args.poly_power),
                              args.iters, device)
    return optimizer, schedule


def prepare_data(args: argparse.Namespace) -> str:
    """The dataset root: ``--data``, or the synthetic city generated (once) into ``--synthetic-dir``;
    then the preflight check, so a bad file stops the run before any training step."""
    from ifbf_fast.data import check_dataset, generate_city

    root = args.data
    if root is None:
        root = args.synthetic_dir
        if du.is_primary():
            generate_city(root, seed=args.seed)
    if du.is_dist():
        dist.barrier()
    report = check_dataset(root, ("train", "val"))
    if not report.ok:
        raise TrainingError(f"dataset {root} failed the preflight check:\n{report.format()}")
    return root


def build_loaders(args: argparse.Namespace, root: str, device: torch.device, rank: int, world: int):
    """(train loader, val loader, name): DALI or the reference loader, with one batch contract."""
    from ifbf_fast.data import build_dali_loader, build_loader, dali_available

    from .preflight import check_train_size

    check_train_size(args, root, world)     # one line, not the loader's ValueError
    use_dali = args.loader == "dali" or (args.loader == "auto" and dali_available())
    if args.loader == "dali" and not dali_available():
        raise TrainingError("--loader dali: nvidia-dali is not importable (pip install nvidia-dali-cuda130)")
    make = build_dali_loader if use_dali else build_loader
    extra = {"device": device} if use_dali else {}
    train_loader = make(root, "train", args.batch_size, args.crop_size, args.scales, train=True,
                        workers=args.workers, seed=args.seed, rank=rank, world_size=world,
                        pin_memory=device.type == "cuda", **extra)
    val_loader = make(root, "val", 1, train=False, workers=min(args.workers, 2), seed=args.seed,
                      rank=rank, world_size=world, **extra)
    return train_loader, val_loader, "dali" if use_dali else "torch"


@dataclass
class Run:
    """One process's share of a training run, ready for its first step."""

    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    log: Logger
    root: str                       # the dataset, after the preflight check
    model: torch.nn.Module          # the unwrapped model (state_dict, evaluation)
    optimizer: torch.optim.Optimizer
    step: TrainStep                 # one sync-free training step over the (DDP-wrapped) model
    autocast: Callable
    train_loader: object
    val_loader: object
    start_iter: int = 0             # steps already taken (resume)
    epoch: int = 0
    consumed: int = 0               # batches of ``epoch`` already consumed
    best_miou: float = -1.0

    def checkpoint(self, iteration: int, epoch: int, consumed: int, best_miou: float) -> ck.TrainingCheckpoint:
        """This run's state as the one checkpoint layout (``ifbf_fast.engine.checkpoint``)."""
        return ck.TrainingCheckpoint(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), step=self.step.state_dict(),
            iteration=iteration, epoch=epoch, batches_in_epoch=consumed, best_miou=best_miou,
            rng=ck.rng_state(), meta=model_meta(self.args), args=to_dict(self.args))


def build_run(args: argparse.Namespace, local_rank: int = 0) -> Run:
    """Everything the loop needs (the module text gives the order and why)."""
    from ifbf_fast.nn import IFBFLoss

    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    device = select_device(args.gpus, local_rank)
    # --memory-format auto: channels_last on CUDA (the layout the fused kernels and cuDNN are fastest
    # in), NCHW on the CPU. Saved in the checkpoint's arguments, so evaluate/predict use the same.
    args.channels_last = args.memory_format == "channels_last" or (args.memory_format == "auto"
                                                                    and device.type == "cuda")
    rank, world = du.rank(), du.world_size()
    log = Logger(args, enabled=du.is_primary())
    root = prepare_data(args)

    torch.manual_seed(args.seed)          # the same initial weights on every rank and every run
    model = build_model(args, device)
    buffers = FlatBuffers(model)          # before DDP wraps the model: a skipped step restores them in place
    optimizer, schedule = build_optimizer(model, args)
    autocast, amp_name = amp_setup(args.amp, device)
    loss_fn = IFBFLoss(aux_weight=args.aux_weight, keep_ratio=args.keep_ratio, thresh=args.ohem_thresh)

    if du.is_primary():   # writable, room for two checkpoints: found now, not at the first checkpoint write
        from .preflight import prepare_output
        prepare_output(args, model, log.info)
    from .preflight import resume_state
    path, resumed = resume_state(args, device, log.info)
    if resumed is not None:
        model.load_state_dict(resumed.model)
        optimizer.load_state_dict(resumed.optimizer)
        if resumed.rng is not None:   # the primary's generators; each step re-seeds torch from (seed, rank, step) anyway
            ck.set_rng_state(resumed.rng)
        log.info(f"resumed from {path} at step {resumed.iteration}")

    net = model
    if du.is_dist():
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    step = TrainStep(net, model, loss_fn, optimizer, schedule, device, autocast, fp16=amp_name == "fp16",
                     channels_last=args.channels_last, buffers=buffers)
    step.load_state_dict(resumed.step if resumed is not None else {})   # schedule position, loss scale, counters
    if args.compile:
        step.compile(args.compile_mode)

    train_loader, val_loader, loader_name = build_loaders(args, root, device, rank, world)
    if du.is_primary():
        os.makedirs(args.out, exist_ok=True)
        dump_yaml(args, os.path.join(args.out, "args.yaml"))
    log.info(f"{args.backbone} IFBFNet, {sum(p.numel() for p in model.parameters()):,} parameters; "
             f"{world} process(es) on {device.type}; amp {amp_name}; impl {ops.get_impl()}; "
             f"{loader_name} loader; data {root}")
    run = Run(args, device, rank, world, log, root, model, optimizer, step, autocast, train_loader, val_loader)
    if resumed is not None:
        run.start_iter, run.epoch, run.consumed = resumed.iteration, resumed.epoch, resumed.batches_in_epoch
        run.best_miou = resumed.best_miou
    return run
