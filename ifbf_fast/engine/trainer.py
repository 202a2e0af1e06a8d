"""The training loop of train.py: the paper's recipe (DESIGN section 3) on one or several processes.

``main(argv)`` only wires things: parse the arguments, start the processes (one per GPU over NCCL,
``--procs N`` CPU processes over gloo, or whatever ``torchrun`` started), and call ``train(args)`` in
each. ``train_one_step`` and :func:`ifbf_fast.engine.evaluate.evaluate` are plain functions that
receive the autocast context and the loss scaler explicitly.

Exact resume: the augmentation of every sample is a function of ``(seed, epoch, index)`` (see
``ifbf_fast.data.loader``), the global torch RNG (dropout) is re-seeded from ``(seed, rank,
iteration)`` before every step, and a checkpoint records the epoch and how many batches of it were
consumed, so N steps + resume + N steps replays exactly the batches and random draws of 2N steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from ifbf_fast import ops
from ifbf_fast.utils import dist as du
from ifbf_fast.utils.runtime import SetupError, autocast_factory, resolve_amp, select_device

from . import checkpoint as ck
from .config import dump_yaml, model_meta, parse_args, to_dict
from .evaluate import evaluate
from .logger import Logger


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


# --- runtime -----------------------------------------------------------------------------------

def amp_setup(mode: str, device: torch.device):
    """(autocast factory, GradScaler or None, resolved mode) for ``--amp``: fp16 gets a loss scaler."""
    mode = resolve_amp(mode, device)
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    return autocast_factory(mode, device), scaler, mode


def poly_warmup(max_iters: int, warmup_iters: int, power: float) -> Callable[[int], float]:
    """Learning-rate factor at step ``it``: poly decay ``(1 - it/max)^power`` times a linear warm-up
    ``(it + 1) / warmup`` over the first ``warmup_iters`` steps (paper 4.1)."""
    def factor(it: int) -> float:
        decay = max(0.0, 1.0 - it / max_iters) ** power
        return decay * min(1.0, (it + 1) / warmup_iters) if warmup_iters > 0 else decay
    return factor


# --- building ----------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from ifbf_fast.models import build_model as _build
    from ifbf_fast.nn import norm_act

    kind = {"bn": "bn_leaky_relu"}.get(args.norm, args.norm)
    model = _build({"backbone": args.backbone, "num_classes": args.num_classes,
                    "output_stride": args.output_stride, "spatial_channels": args.spatial_channels,
                    "aspp": args.aspp, "skip": args.skip, "fbf": args.fbf, "spatial": args.spatial,
                    "aux": args.aux, "norm_act": norm_act(kind), "pretrained": args.pretrained,
                    # the loss upsamples the heads' 1/4-resolution logits (fused into OHEM on the fast path)
                    "upsample_logits": False})
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace):
    """SGD over the paper's two learning-rate groups, and the poly + warm-up schedule."""
    from ifbf_fast.models import param_groups

    groups = param_groups(model, args.lr, args.lr_mult)
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_warmup(args.iters, args.warmup_iters,
                                                                         args.poly_power))
    return optimizer, scheduler


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


# --- one step ----------------------------------------------------------------------------------

def train_one_step(model, loss_fn, batch: Dict[str, torch.Tensor], optimizer, scaler, autocast,
                   device: torch.device, channels_last: bool = False) -> Optional[Dict[str, torch.Tensor]]:
    """Forward, loss, backward and optimizer step. Returns the detached loss terms, or ``None`` when the
    loss was not finite on some rank: then no rank steps (the decision is all-reduced, so DDP's
    collectives stay matched) and the caller does not advance the schedule."""
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = batch["label"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        outputs = model(images)
    terms = loss_fn({k: v.float() for k, v in outputs.items()}, labels)
    finite = torch.isfinite(terms["loss"].detach()).to(torch.float32)
    if du.is_dist():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() == 0.0:
        return None
    if scaler is not None:
        scaler.scale(terms["loss"]).backward()
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() < scale_before:      # inf/NaN gradients: the step was skipped
            return None
    else:
        terms["loss"].backward()
        optimizer.step()
    return {k: v.detach() for k, v in terms.items()}


# --- the loop ----------------------------------------------------------------------------------

def train(args: argparse.Namespace, local_rank: int = 0) -> Dict[str, object]:
    """Train with ``args`` in this process (rank).

    Returns ``{"eval": last evaluation result, "losses": total loss of every step taken in this call,
    "iteration": the final step}``. ``--impl`` applies for the duration of the call only.
    """
    with ops.use_impl(args.impl):
        return _train(args, local_rank)


def _train(args: argparse.Namespace, local_rank: int) -> Dict[str, object]:
    from ifbf_fast.data import CLASS_NAMES
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
    optimizer, scheduler = build_optimizer(model, args)
    autocast, scaler, amp_name = amp_setup(args.amp, device)
    loss_fn = IFBFLoss(aux_weight=args.aux_weight, keep_ratio=args.keep_ratio, thresh=args.ohem_thresh)

    start_iter, epoch, consumed, best = 0, 0, 0, -1.0
    resume = _resume_path(args)
    if resume:
        state = ck.load(resume, map_location=device)
        ck.check_meta(state["meta"], model_meta(args), resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_iter, epoch, consumed = state["iteration"], state["epoch"], state["batches_in_epoch"]
        if "rng" in state:    # the primary's generators; each step re-seeds torch from (seed, rank, step) anyway
            ck.set_rng_state(state["rng"])
        best = state.get("best_miou", -1.0)
        log.info(f"resumed from {resume} at step {start_iter}")

    net = model
    if du.is_dist():
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
        loss_fn = torch.compile(loss_fn)

    train_loader, val_loader, loader_name = build_loaders(args, root, device, rank, world)
    if du.is_primary():
        os.makedirs(args.out, exist_ok=True)
        dump_yaml(args, os.path.join(args.out, "args.yaml"))
    log.info(f"{args.backbone} IFBFNet, {sum(p.numel() for p in model.parameters()):,} parameters; "
             f"{world} process(es) on {device.type}; amp {amp_name}; impl {ops.get_impl()}; "
             f"{loader_name} loader; data {root}")

    def run_eval() -> Dict[str, object]:
        # The unwrapped model: DDP would broadcast buffers at every forward, and ranks may hold
        # different numbers of validation images.
        return evaluate(model, val_loader, args.num_classes, device, args.eval_scales, args.eval_flip, autocast,
                        args.channels_last)

    def save(iteration: int, epoch_: int, consumed_: int, miou: Optional[float]) -> None:
        nonlocal best
        if not du.is_primary():
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                 "iteration": iteration, "epoch": epoch_, "batches_in_epoch": consumed_,
                 "best_miou": max(best, miou if miou is not None else -1.0), "rng": ck.rng_state(),
                 "meta": model_meta(args), "args": to_dict(args)}
        ck.save_atomic(state, os.path.join(args.out, ck.CKPT_PATTERN.format(iteration)))
        ck.prune(args.out, args.keep_last)
        if miou is not None and miou > best:
            best = miou
            ck.save_atomic(state, os.path.join(args.out, "best.pt"))

    model.train()
    it, nonfinite, result = start_iter, 0, {}
    # One device buffer for the loss history: no host sync per step, no allocation per step.
    history = torch.zeros(max(0, args.iters - start_iter), device=device)
    log.start(total=args.iters, initial=start_iter)
    while it < args.iters:
        train_loader.set_epoch(epoch)
        if consumed:
            train_loader.sampler.skip_batches(consumed, args.batch_size)
        t0 = time.perf_counter()
        for batch in train_loader:
            torch.manual_seed(_step_seed(args.seed, rank, it))
            terms = train_one_step(net, loss_fn, batch, optimizer, scaler, autocast, device, args.channels_last)
            consumed += 1
            if terms is None:
                nonfinite += 1
                log.info(f"step {it}: non-finite loss or gradients, step skipped ({nonfinite} in a row)")
                if nonfinite >= args.max_nonfinite:
                    raise TrainingError(f"{nonfinite} consecutive steps had a non-finite loss or gradients "
                                        f"(last at step {it}); lower --lr, check the data, or try --amp off")
                continue
            nonfinite = 0
            history[it - start_iter] = terms["loss"]
            scheduler.step()
            it += 1
            dt = time.perf_counter() - t0
            log.step(it, terms, optimizer.param_groups[0]["lr"], args.batch_size * world / dt, device)
            evaluated = args.eval_every and it % args.eval_every == 0 or it == args.iters
            miou = None
            if evaluated:
                result = run_eval()
                miou = result["miou"]
                log.eval(it, result, CLASS_NAMES if args.num_classes == len(CLASS_NAMES) else None)
            if (args.ckpt_every and it % args.ckpt_every == 0) or it == args.iters or evaluated:
                save(it, epoch, consumed, miou)
            if it >= args.iters:
                break
            t0 = time.perf_counter()          # images/s counts the step and its data, not evaluation
        else:
            epoch, consumed = epoch + 1, 0
    log.close()
    return {"eval": result, "losses": history[: it - start_iter].tolist(), "iteration": it}


def _step_seed(seed: int, rank: int, iteration: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + iteration) % (2 ** 63)


def _resume_path(args: argparse.Namespace) -> Optional[str]:
    if not args.resume:
        return None
    if args.resume == "latest":
        path = ck.latest(args.out)
        if path is None:
            raise TrainingError(f"--resume: no checkpoint iter_*.pt in {args.out}")
        return path
    return args.resume


# --- processes ---------------------------------------------------------------------------------

def _worker(local_rank: int, args: argparse.Namespace, world: int, port: int, backend: str) -> None:
    with du.local_group(local_rank, world, port, backend):
        if backend == "gloo":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        train(args, local_rank)
    du.exit_worker()


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def launch(args: argparse.Namespace) -> Dict[str, object]:
    """Run ``train`` in as many processes as asked: torchrun's, ``--gpus N``, or ``--procs N``."""
    if _under_torchrun():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if (args.gpus != 0 and torch.cuda.is_available()) else "gloo"
        with du.group(lambda: dist.init_process_group(backend)):
            return train(args, local_rank)
    gpus = args.gpus if args.gpus is not None else (1 if torch.cuda.is_available() else 0)
    world, backend = (gpus, "nccl") if gpus > 1 else (args.procs if gpus == 0 else 1, "gloo")
    if world <= 1:
        return train(args)
    # spawn ends every rank when one dies (it terminates the others and raises here).
    torch.multiprocessing.spawn(_worker, args=(args, world, du.free_port(), backend), nprocs=world, join=True)
    return {}


def main(argv=None) -> int:
    from ifbf_fast.data.cityscapes import DataReadError, DatasetLayoutError

    args = parse_args(argv)
    try:
        launch(args)
    except (TrainingError, SetupError, ck.CheckpointError, DatasetLayoutError, DataReadError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 1
    if _under_torchrun():
        # A torchrun rank is this process: leave as a spawned worker does (du.exit_worker), so that the
        # static-destructor abort seen after collectives cannot turn a finished rank into a failed one.
        du.exit_worker()
    return 0
