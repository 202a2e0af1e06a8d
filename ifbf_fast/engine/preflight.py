"""Checks of train.py that need the data, the model or a checkpoint, done before the first step.

``ifbf_fast.engine.config`` checks what the options alone decide; this module checks the rest, each
as one line naming the option, file or value (``UsageError``, exit code 2, where another option value
fixes it):

* ``check_pretrained``: ``--pretrained`` holds a state_dict of this backbone (loaded with
  ``weights_only=True``: a pickle of objects, malicious or not, is refused unexecuted).
* ``check_train_size``: one batch per process fits in the train split.
* ``prepare_output``: ``--out`` can be created and written, and has room for two checkpoints (a new
  checkpoint is written beside the previous one before that is pruned); temporary files an
  interrupted checkpoint write left there are removed. Found at the first checkpoint write, these
  cost up to ``--ckpt-every`` steps of work.
* ``resume_state``: the checkpoint to resume from (the newest in ``--out`` that loads, saying which
  it skipped), checked against this run: the model, the norm family (InPlace-ABN's affine is
  ``|w| + eps``, BatchNorm's ``w``: the same state_dict keys, other weights), the batch size (the
  position inside the epoch counts batches) and ``--iters`` beyond the checkpoint's step.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Callable, Optional, Tuple

import torch

from ifbf_fast.utils.runtime import UsageError

from . import checkpoint as ck
from .config import model_meta, norm_family


class RankError(RuntimeError):
    """A spawned rank stopped on a user error: its one-line message, prefixed with the rank, and its
    exit code (the parent re-raises it instead of torch's ProcessRaisedException traceback)."""

    def __init__(self, rank: int, message: str, code: int):
        super().__init__(f"rank {rank}: {message}")
        self.exit_code = code


def user_errors(*extra: type) -> tuple:
    """The exception types that are the user's mistake (bad option, file, data, checkpoint): the
    command line prints their one-line message instead of a traceback."""
    from ifbf_fast.data.cityscapes import DataReadError, DatasetLayoutError

    return (UsageError, ck.CheckpointError, DatasetLayoutError, DataReadError, RankError, *extra)


def exit_code(exc: BaseException) -> int:
    """2 for usage errors (as argparse), 1 for the rest."""
    return int(getattr(exc, "exit_code", 1))


# --- inputs -------------------------------------------------------------------------------------

def check_pretrained(args: argparse.Namespace) -> None:
    """Load ``--pretrained`` into this backbone built on the meta device (no memory, no compute): the
    same checks ``build_model`` makes later (a loadable weights-only file, a dict of tensors, every key
    and shape of the backbone), but before any process or data is set up."""
    if args.pretrained is None:
        return
    from ifbf_fast.models import load_pretrained, resnet
    from ifbf_fast.nn import norm_act

    kind = {"bn": "bn_leaky_relu"}.get(args.norm, args.norm)
    with torch.device("meta"):
        backbone = resnet(args.backbone, output_stride=args.output_stride, norm_act=norm_act(kind))
    try:
        load_pretrained(backbone, args.pretrained)
    except (OSError, ValueError, TypeError) as exc:
        msg = str(exc).removeprefix("load_pretrained: ")
        if exc.__cause__ is not None and "not a loadable" in msg:    # torch.load's message runs long
            msg = (f"is not a loadable torch state_dict: {ck.load_error_reason(exc.__cause__)} (expected "
                   f"torch.save(model.state_dict(), PATH))")
        raise UsageError(f"--pretrained {args.pretrained}: {msg}") from exc


def check_train_size(args: argparse.Namespace, root: str, world: int) -> None:
    """One full batch per process must fit in the train split (training drops the short last batch)."""
    from ifbf_fast.data import find_pairs, is_folder_layout, list_samples
    from ifbf_fast.data.prepare import detect_form, find_prepared_pairs

    if is_folder_layout(root):
        find = list_samples
    else:
        find = find_pairs if detect_form(root, "train") == "png" else find_prepared_pairs
    n = len(find(root, "train"))
    per_rank = n // world
    if per_rank < args.batch_size:
        fix = f"use --batch-size {per_rank} or less" if per_rank else "use fewer processes"
        raise UsageError(f"--batch-size {args.batch_size}: the train split of {root} has {n} image(s), "
                         f"{per_rank} per process for {world} process(es), fewer than one batch; {fix}")


# --- the output folder --------------------------------------------------------------------------

def checkpoint_bytes(model: torch.nn.Module, momentum: float) -> int:
    """Estimated size of one checkpoint: the model's state_dict, SGD's momentum buffer (one per
    parameter) and a margin for the rest (schedule, RNG states, arguments)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return state + (params if momentum else 0) + (1 << 20)


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def prepare_output(args: argparse.Namespace, model: torch.nn.Module,
                   log: Callable[[str], None] = print) -> None:
    """Create ``--out``, prove it writable, check room for two checkpoints and remove stale
    temporaries; ``UsageError`` naming the folder otherwise. For the process that writes (rank 0)."""
    out = args.out
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from exc
    if not os.path.isdir(out):
        raise UsageError(f"--out {out}: not a folder")
    probe = os.path.join(out, f".write_test.{os.getpid()}")
    try:   # os.access is no proof (root, read-only mounts, ACLs): write a byte and remove it
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"--out {out}: the folder is not writable ({exc.strerror or exc})") from exc
    removed = ck.remove_stale_temporaries(out)
    if removed:
        log(f"removed {len(removed)} temporary file(s) an interrupted checkpoint write left in {out}")
    need = 2 * checkpoint_bytes(model, args.momentum)
    free = shutil.disk_usage(out).free
    if free < need:
        raise UsageError(f"--out {out}: {_mib(free)} free, but two checkpoints of this model need about "
                         f"{_mib(need)} (a new one is written before the old one is pruned); free some "
                         f"space or choose another --out")


# --- resume -------------------------------------------------------------------------------------

def resume_state(args: argparse.Namespace, map_location,
                 log: Callable[[str], None] = print) -> Tuple[Optional[str], Optional[ck.TrainingCheckpoint]]:
    """(path, checkpoint) to resume from, or (None, None) without ``--resume``.

    ``--resume`` alone takes the newest ``iter_*.pt`` in ``--out`` that loads, logging each newer one
    it skipped; ``--resume CKPT`` takes that file. The checkpoint is checked against this run (module
    docstring) before anything is loaded into the model."""
    if not args.resume:
        return None, None
    if args.resume == "latest":
        path, state, skipped = ck.load_newest(args.out, map_location)
        if path is None:
            why = f" (none loads: {skipped[0]})" if skipped else ""
            raise ck.CheckpointError(f"--resume: no usable checkpoint iter_*.pt in {args.out}{why}")
        for line in skipped:
            log(f"--resume: skipped {line}")
        if skipped:
            log(f"--resume: falling back to {path}, the newest checkpoint that loads")
    else:
        path, state = args.resume, ck.load(args.resume, map_location)
    checkpoint = ck.TrainingCheckpoint.from_dict(state, path, resume=True)
    check_resumable(checkpoint, args, path)
    return path, checkpoint


def check_resumable(checkpoint: ck.TrainingCheckpoint, args: argparse.Namespace, path: str) -> None:
    """Refuse a checkpoint this run cannot continue exactly (``CheckpointMismatch``, one line)."""
    ck.check_meta(checkpoint.meta, model_meta(args), path)
    saved = checkpoint.args
    norm = saved.get("norm")
    if norm is not None and norm_family(norm) != norm_family(args.norm):
        affine = {"abn": "InPlace-ABN's |w| + eps", "bn": "BatchNorm's w"}
        raise ck.CheckpointMismatch(
            f"--norm {args.norm}: checkpoint {path} was trained with --norm {norm}, whose affine differs "
            f"({affine[norm_family(norm)]} vs {affine[norm_family(args.norm)]}); resume with --norm {norm}")
    batch = saved.get("batch_size")
    if batch is not None and batch != args.batch_size:   # the epoch position counts batches of that size
        raise ck.CheckpointMismatch(
            f"--batch-size {args.batch_size}: checkpoint {path} was made with --batch-size {batch} (its position "
            f"in the epoch counts batches of {batch}); resume with --batch-size {batch}")
    if checkpoint.iteration >= args.iters:
        raise ck.CheckpointMismatch(
            f"--iters {args.iters}: checkpoint {path} is already at step {checkpoint.iteration}; nothing to train "
            f"(pass --iters above {checkpoint.iteration} to train on)")
