"""The training loop of train.py: the paper's recipe (docs/DESIGN.md section 3) on one or several processes.

``main(argv)`` only wires things: parse the arguments, start the processes (one per GPU over NCCL,
``--procs N`` CPU processes over gloo, or whatever ``torchrun`` started), and call ``train(args)`` in
each. One step is :class:`ifbf_fast.engine.step.TrainStep` (sync-free: the host reads the losses and
the skip counters only every ``--log-every`` steps and at evaluations and checkpoints);
:func:`ifbf_fast.engine.evaluate.evaluate` receives the autocast context explicitly.

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

import numpy as np
import torch
import torch.distributed as dist

from ifbf_fast import ops
from ifbf_fast.plan import gate as plan_gate
from ifbf_fast.utils import dist as du
from ifbf_fast.utils.runtime import SetupError, autocast_factory, resolve_amp, select_device

from . import checkpoint as ck
from .config import dump_yaml, model_meta, parse_args, to_dict
from .evaluate import evaluate
from .logger import Logger
from .step import DeviceSchedule, FlatBuffers, TrainStep, fused_sgd


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


# --- runtime -----------------------------------------------------------------------------------

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


# --- building ----------------------------------------------------------------------------------

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
    buffers = FlatBuffers(model)          # before DDP wraps the model: a skipped step restores them in place
    optimizer, schedule = build_optimizer(model, args)
    autocast, amp_name = amp_setup(args.amp, device)
    loss_fn = IFBFLoss(aux_weight=args.aux_weight, keep_ratio=args.keep_ratio, thresh=args.ohem_thresh)
    resumed_step: dict = {}

    start_iter, epoch, consumed, best = 0, 0, 0, -1.0
    if du.is_primary():   # writable, room for two checkpoints: found now, not at the first checkpoint write
        from .preflight import prepare_output
        prepare_output(args, model, log.info)
    resume, state = _resume_path(args, device, log)
    if resume:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        resumed_step = state.get("step", {})      # schedule position, loss scale, skip counters
        start_iter, epoch, consumed = state["iteration"], state["epoch"], state["batches_in_epoch"]
        if "rng" in state:    # the primary's generators; each step re-seeds torch from (seed, rank, step) anyway
            ck.set_rng_state(state["rng"])
        best = state.get("best_miou", -1.0)
        log.info(f"resumed from {resume} at step {start_iter}")

    net = model
    if du.is_dist():
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    step = TrainStep(net, model, loss_fn, optimizer, schedule, device, autocast, fp16=amp_name == "fp16",
                     channels_last=args.channels_last, buffers=buffers)
    step.load_state_dict(resumed_step)
    if args.compile:
        step.compile(args.compile_mode)

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
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step.state_dict(),
                 "iteration": iteration, "epoch": epoch_, "batches_in_epoch": consumed_,
                 "best_miou": max(best, miou if miou is not None else -1.0), "rng": ck.rng_state(),
                 "meta": model_meta(args), "args": to_dict(args)}
        ck.save_atomic(state, os.path.join(args.out, ck.CKPT_PATTERN.format(iteration)))
        ck.prune(args.out, args.keep_last)
        if miou is not None and miou > best:
            best = miou
            ck.save_atomic(state, os.path.join(args.out, "best.pt"))

    model.train()
    it, result = start_iter, {}
    # One device buffer for the loss history: no host sync per step, no allocation per step.
    history = torch.zeros(max(0, args.iters - start_iter), device=device)
    meter = _Throughput(args.batch_size * world, start_iter)
    skipped_since_log = 0
    log.start(total=args.iters, initial=start_iter, images_per_step=args.batch_size * world)
    while it < args.iters:
        train_loader.set_epoch(epoch)
        if consumed:
            train_loader.sampler.skip_batches(consumed, args.batch_size)
        for batch in train_loader:
            torch.manual_seed(_step_seed(args.seed, rank, it))
            terms = step(batch)
            consumed += 1
            history[it - start_iter] = terms["loss"]
            it += 1
            evaluated = bool(args.eval_every and it % args.eval_every == 0) or it == args.iters
            saving = bool(args.ckpt_every and it % args.ckpt_every == 0) or it == args.iters or evaluated
            rate = None
            if it % args.log_every == 0 or saving:
                # The host's one read of the interval (it waits for the device: the rate is then exact).
                counters = step.read_counters()
                check_counters(counters, it, args, log)
                skipped_since_log += counters["skipped"]
                rate = meter.rate(it)
            log.step(it, terms, optimizer.param_groups[0]["lr"], rate, device, skipped_since_log)
            if it % args.log_every == 0:
                skipped_since_log = 0
            miou = None
            if evaluated:
                result = run_eval()
                miou = result["miou"]
                log.eval(it, result, CLASS_NAMES if args.num_classes == len(CLASS_NAMES) else None,
                         preview(model, args, device, root) if log.board is not None else None)
            if saving:
                save(it, epoch, consumed, miou)
                meter.restart(it)              # images/s counts the steps and their data, not evaluation
            if it >= args.iters:
                break
        else:
            epoch, consumed = epoch + 1, 0
    log.close()
    return {"eval": result, "losses": history[: it - start_iter].tolist(), "iteration": it}


def preview(model: torch.nn.Module, args: argparse.Namespace, device: torch.device, root: str,
            n: int = 2, width: int = 512) -> list:
    """(H, W, 3) uint8 panels (image | prediction in the Cityscapes palette) of the first ``n``
    validation images, for TensorBoard; the model is left in training mode."""
    import cv2

    from ifbf_fast.data.cityscapes import list_images
    from ifbf_fast.inference import Segmenter

    paths = list_images(root, "val")[:n]
    if not paths:
        return []
    try:
        # eval mode: running statistics are used and left alone (a synced norm layer in training mode
        # would also wait for a collective that the other ranks never join)
        model.eval()
        segmenter = Segmenter(model, args, device)
        preds = segmenter.predict(paths)
        panels = []
        for path, pred in zip(paths, preds):
            image = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            panel = np.concatenate([image, segmenter.colorize(np.asarray(pred))], axis=1)
            scale = width * 2 / panel.shape[1]
            panels.append(cv2.resize(panel, (width * 2, max(1, round(panel.shape[0] * scale))),
                                     interpolation=cv2.INTER_AREA) if scale < 1 else panel)
        return panels
    finally:
        model.train()


def check_counters(counters: Dict[str, int], it: int, args: argparse.Namespace, log: Logger) -> None:
    """Act on what the device counted since the last read (:meth:`TrainStep.read_counters`)."""
    if counters["bad_labels"]:
        raise TrainingError(
            f"by step {it}: {counters['bad_labels']} label pixel(s) hold an id outside [0, {args.num_classes}) "
            f"that is not the ignore id 255 (those steps were skipped); check the label files with "
            f"python -m ifbf_fast.data.check DIR, and --num-classes")
    if counters["skipped"]:
        log.info(f"step {it}: {counters['skipped']} of the last {counters['steps']} step(s) skipped: non-finite "
                 f"loss or gradients (weights, optimizer state, norm statistics and schedule left as they were)")
    if counters["max_consecutive"] >= args.max_nonfinite:
        raise TrainingError(f"{counters['max_consecutive']} consecutive steps had a non-finite loss or gradients "
                            f"(by step {it}); lower --lr, check the data, or try --amp off")


class _Throughput:
    """Images per second between two host reads (each read waits for the device, so the interval is
    the device's time too, not only the host's)."""

    def __init__(self, images_per_step: int, it: int):
        self.images_per_step = images_per_step
        self.restart(it)

    def restart(self, it: int) -> None:
        self.t0, self.it0 = time.perf_counter(), it

    def rate(self, it: int) -> float:
        dt = time.perf_counter() - self.t0
        value = (it - self.it0) * self.images_per_step / dt if dt > 0 else 0.0
        self.restart(it)
        return value


def _step_seed(seed: int, rank: int, iteration: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + iteration) % (2 ** 63)


def _resume_path(args: argparse.Namespace, device: torch.device, log: Logger):
    """(path, state) to resume from or (None, None): the newest checkpoint in --out that loads (or
    --resume CKPT), checked against this run (:func:`ifbf_fast.engine.preflight.resume_state`)."""
    from .preflight import resume_state

    return resume_state(args, device, log.info)


# --- processes ---------------------------------------------------------------------------------

def _worker(local_rank: int, args: argparse.Namespace, world: int, port: int, backend: str,
            errors=None) -> None:
    """One spawned rank. A user error (bad option, file, data, checkpoint) goes to the parent as
    (rank, exit code, message) through ``errors`` before the group is torn down (so it is there
    before a peer can fail on the closed connection), and the rank leaves with that code: the parent
    prints the one line instead of torch's ProcessRaisedException traceback."""
    from .preflight import exit_code, user_errors

    known = user_errors(TrainingError)
    try:
        with du.local_group(local_rank, world, port, backend):
            if backend == "gloo":
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
            try:
                train(args, local_rank)
            except known as exc:
                if errors is not None:
                    errors.put((local_rank, exit_code(exc), str(exc)))
                raise
    except known as exc:
        if errors is None:
            raise
        sys.stderr.flush()
        os._exit(exit_code(exc))
    du.exit_worker()


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def launch(args: argparse.Namespace) -> Dict[str, object]:
    """Run ``train`` in as many processes as asked: torchrun's, ``--gpus N``, or ``--procs N``."""
    if plan_gate(args):                   # --plan: printed, nothing to train; a plan that cannot fit: UsageError
        return {}
    if _under_torchrun():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if (args.gpus != 0 and torch.cuda.is_available()) else "gloo"
        with du.group(lambda: dist.init_process_group(backend)):
            return train(args, local_rank)
    import logging

    from ifbf_fast.utils.runtime import check_gpus

    from .preflight import RankError

    gpus = check_gpus(args.gpus)          # one line here, not a failed NCCL set-up in every rank
    world, backend = (gpus, "nccl") if gpus > 1 else (args.procs if gpus == 0 else 1, "gloo")
    if world <= 1:
        return train(args)
    # spawn ends every rank when one dies (it terminates the others and raises here).
    mp = torch.multiprocessing
    errors = mp.get_context("spawn").SimpleQueue()
    # spawn logs a warning for every peer it terminates after a failure: noise beside the one line
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        mp.spawn(_worker, args=(args, world, du.free_port(), backend, errors), nprocs=world, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        if errors.empty():            # not a user error: a crash, keep its traceback
            raise
        rank, code, message = errors.get()      # the first rank that failed
        raise RankError(rank, message, code) from None
    return {}


def main(argv=None) -> int:
    """train.py: 0 on success; a user error prints one line (``train.py: error: ...``) and returns 2
    for a usage error (an option that does not fit the data, checkpoint, folder or machine), 1 for the
    rest (bad data files, an unreadable checkpoint, a run that cannot go on)."""
    from .preflight import check_pretrained, exit_code, user_errors

    args = parse_args(argv)
    try:
        check_pretrained(args)            # before any process or data is set up
        launch(args)
    except user_errors(TrainingError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    if _under_torchrun():
        # A torchrun rank is this process: leave as a spawned worker does (du.exit_worker), so that the
        # static-destructor abort seen after collectives cannot turn a finished rank into a failed one.
        du.exit_worker()
    return 0
