"""The training loop of train.py: the paper's recipe (docs/DESIGN.md section 3) on one or several processes.

``main(argv)`` only wires things: parse the arguments, start the processes
(:func:`ifbf_fast.engine.launch.launch`: one per GPU over NCCL, ``--procs N`` CPU processes over gloo,
or whatever ``torchrun`` started), and call ``train(args)`` in each. ``train`` builds the run
(:func:`ifbf_fast.engine.build.build_run`) and hands it to :class:`Loop`, which steps, logs, evaluates
and saves. One step is :class:`ifbf_fast.engine.step.TrainStep` (sync-free: the host reads the losses
and the skip counters only every ``--log-every`` steps and at evaluations and checkpoints);
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
from typing import Dict, Iterator, Optional

import numpy as np
import torch

from ifbf_fast import ops
from ifbf_fast.plan import gate as plan_gate
from ifbf_fast.utils import dist as du

from . import checkpoint as ck
from .build import Run, TrainingError, build_run
from .build import amp_setup, build_optimizer, poly_warmup  # noqa: F401  (re-exported: tests and bench use them)
from .config import parse_args
from .evaluate import evaluate
from .launch import launch as launch_ranks
from .launch import under_torchrun
from .logger import Logger


def train(args: argparse.Namespace, local_rank: int = 0) -> Dict[str, object]:
    """Train with ``args`` in this process (rank).

    Returns ``{"eval": last evaluation result, "losses": total loss of every step taken in this call,
    "iteration": the final step}``. ``--impl`` applies for the duration of the call only; without it the
    choice in force at the start (``set_impl``, else ``IFBF_IMPL``, else auto) is resolved once and held
    for the run, so that the ops' switch is a list look-up per call instead of an environment read.
    """
    with ops.use_impl(args.impl or ops.get_impl()):
        return Loop(build_run(args, local_rank)).run()


class Loop:
    """Steps until ``--iters``: log every ``--log-every`` steps (the host's one read of the interval),
    evaluate every ``--eval-every`` and at the end, save every ``--ckpt-every``, at every evaluation
    and at the end."""

    def __init__(self, run: Run):
        self.r, self.args = run, run.args
        self.it, self.best, self.result = run.start_iter, run.best_miou, {}
        # One device buffer for the loss history: no host sync per step, no allocation per step.
        self.history = torch.zeros(max(0, self.args.iters - run.start_iter), device=run.device)
        self.meter = _Throughput(self.args.batch_size * run.world, run.start_iter)
        self.skipped_since_log = 0

    def batches(self) -> Iterator[tuple]:
        """(epoch, batches of it consumed after this one, batch), epoch after epoch, from the resume position."""
        r, epoch, consumed = self.r, self.r.epoch, self.r.consumed
        while True:
            r.train_loader.set_epoch(epoch)
            if consumed:
                r.train_loader.sampler.skip_batches(consumed, self.args.batch_size)
            for batch in r.train_loader:
                consumed += 1
                yield epoch, consumed, batch
            epoch, consumed = epoch + 1, 0

    def run(self) -> Dict[str, object]:
        r, args = self.r, self.args
        r.model.train()
        r.log.start(total=args.iters, initial=r.start_iter, images_per_step=args.batch_size * r.world)
        batches = self.batches()
        while self.it < args.iters:
            epoch, consumed, batch = next(batches)
            torch.manual_seed(_step_seed(args.seed, r.rank, self.it))
            terms = r.step(batch)
            self.history[self.it - r.start_iter] = terms["loss"]
            self.it += 1
            self.after_step(terms, epoch, consumed)
        r.log.close()
        return {"eval": self.result, "losses": self.history[: self.it - r.start_iter].tolist(),
                "iteration": self.it}

    def after_step(self, terms: dict, epoch: int, consumed: int) -> None:
        r, args, it = self.r, self.args, self.it
        evaluated = bool(args.eval_every and it % args.eval_every == 0) or it == args.iters
        saving = bool(args.ckpt_every and it % args.ckpt_every == 0) or it == args.iters or evaluated
        rate = None
        if it % args.log_every == 0 or saving:
            # The host's one read of the interval (it waits for the device: the rate is then exact).
            counters = r.step.read_counters()
            check_counters(counters, it, args, r.log)
            self.skipped_since_log += counters["skipped"]
            rate = self.meter.rate(it)
        r.log.step(it, terms, r.optimizer.param_groups[0]["lr"], rate, r.device, self.skipped_since_log)
        if it % args.log_every == 0:
            self.skipped_since_log = 0
        miou = self.evaluate() if evaluated else None
        if saving:
            self.save(epoch, consumed, miou)
            self.meter.restart(it)              # images/s counts the steps and their data, not evaluation

    def evaluate(self) -> float:
        from ifbf_fast.inference import class_table

        r, args = self.r, self.args
        # The unwrapped model: DDP would broadcast buffers at every forward, and ranks may hold
        # different numbers of validation images.
        self.result = evaluate(r.model, r.val_loader, args.num_classes, r.device, args.eval_scales, args.eval_flip,
                               r.autocast, args.channels_last)
        r.log.eval(self.it, self.result, class_table(args).names,
                   preview(r.model, args, r.device, r.root) if r.log.board is not None else None)
        return self.result["miou"]

    def save(self, epoch: int, consumed: int, miou: Optional[float]) -> None:
        """A periodic checkpoint (the older ones pruned to ``--keep-last``), and ``best.pt`` when ``miou``
        is the best so far. Rank 0 only."""
        if not du.is_primary():
            return
        best = max(self.best, miou if miou is not None else -1.0)
        state = self.r.checkpoint(self.it, epoch, consumed, best)
        state.save(os.path.join(self.args.out, ck.CKPT_PATTERN.format(self.it)))
        ck.prune(self.args.out, self.args.keep_last)
        if miou is not None and miou > self.best:
            state.save(os.path.join(self.args.out, "best.pt"))
        self.best = best


def preview(model: torch.nn.Module, args: argparse.Namespace, device: torch.device, root: str,
            n: int = 2, width: int = 512) -> list:
    """(H, W, 3) uint8 panels (image | prediction in the colours of the dataset's class table) of the
    first ``n`` validation images, for TensorBoard; the model is left in training mode."""
    import cv2

    from ifbf_fast.data import list_samples
    from ifbf_fast.inference import Segmenter

    paths = [s.image_path for s in list_samples(root, "val")[:n]]
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


# --- processes ---------------------------------------------------------------------------------

def launch(args: argparse.Namespace) -> Dict[str, object]:
    """Run ``train`` in as many processes as asked: torchrun's, ``--gpus N``, or ``--procs N``
    (:func:`ifbf_fast.engine.launch.launch`); ``--plan`` prints the memory plan instead."""
    from .preflight import user_errors

    if plan_gate(args):                   # --plan: printed, nothing to train; a plan that cannot fit: UsageError
        return {}
    return launch_ranks(train, args, args.gpus, args.procs, user_errors(TrainingError)) or {}


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
    if under_torchrun():
        # A torchrun rank is this process: leave as a spawned worker does (du.exit_worker), so that the
        # static-destructor abort seen after collectives cannot turn a finished rank into a failed one.
        du.exit_worker()
    return 0
