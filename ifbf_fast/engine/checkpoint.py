"""Checkpoints: one layout, written atomically, loaded with ``weights_only=True``, checked for compatibility.

The layout (:class:`TrainingCheckpoint`, the only place that names its keys) is a dict of tensors and
plain Python values (so ``weights_only=True`` can load it):

==================  =====================================================================
``model``           the model's state_dict
``optimizer``       the optimizer's state_dict (momentum buffers, learning-rate groups)
``step``            :meth:`ifbf_fast.engine.step.TrainStep.state_dict`: the schedule position,
                    fp16 loss scale, skip counters
``iteration``       steps taken so far (the next step's index)
``epoch``           the epoch of the next batch, ``batches_in_epoch`` how many of its batches
                    were consumed (the loader skips them on resume)
``best_miou``       the best validation mIoU so far (-1 before the first evaluation)
``rng``             :func:`rng_state` of the primary process
``meta``            what must match for the weights to fit (``engine.config.model_meta``)
``args``            every resolved train.py argument (evaluate/predict/export rebuild the model
                    from it)
==================  =====================================================================

The trainer writes it (:meth:`TrainingCheckpoint.save`), resume reads it (:func:`read`), and
inference (evaluate, predict, export) reads the same object.

Crash safety: a checkpoint is written to ``.NAME.tmp.PID`` beside its final name and renamed, so a
kill at any moment leaves the old file or the new one. A kill during the write leaves the temporary
file; ``remove_stale_temporaries`` deletes those (ours only, by name, and only when the writing
process is gone) when a run starts. ``load_newest`` skips a latest checkpoint that does not load
(cut short by a full disk, say) and falls back to the newest one that does.
"""
from __future__ import annotations

import glob
import os
import random
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

CKPT_PATTERN = "iter_{:08d}.pt"
#: the temporary names ``save_atomic`` writes (``.iter_00000150.pt.tmp.4711``, ``.best.pt.tmp.4711``)
TMP_RE = re.compile(r"^\.(iter_\d+|best)\.pt\.tmp\.(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, unreadable, or made for another model."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint that this run's options do not fit (another model, norm, batch size...):
    a usage error, exit code 2 like argparse's."""

    exit_code = 2


def tmp_path(path: str) -> str:
    """The temporary file ``save_atomic`` writes ``path`` through (same folder, so the rename is atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str) -> List[str]:
    """Delete the temporary files an interrupted ``save_atomic`` left in ``folder`` (each the size of a
    checkpoint): only names of the form ``TMP_RE``, and only when the process that wrote them is gone
    (or is this one, which is not writing yet). Returns the paths removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        m = TMP_RE.match(name)
        if m is None:
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        path = os.path.join(folder, name)
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def save_atomic(obj: dict, path: str) -> None:
    """Write ``obj`` to ``path`` so that a crash at any moment leaves either the old file or the new
    one, never a truncated file: write to a temporary file in the same folder, fsync, rename.

    A failed write (the disk filled up since the run's output check, the folder went away) raises
    ``CheckpointError`` naming the file and the reason; the temporary file is removed and the older
    checkpoints are untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = tmp_path(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:   # torch.save reports a failed write as a RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().split("\n")[0]
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}); the older checkpoints are "
                              f"untouched") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_error_reason(exc: BaseException) -> str:
    """A short reason for a failed ``torch.load(..., weights_only=True)``: torch's message opens with
    paragraphs of advice (to load with weights_only=False, which runs whatever the file holds); the
    reason is the refused global, or the unpickler's complaint, further down."""
    text = str(exc)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return (f"it pickles Python objects such as {found.group(1)}; weights_only loading refused it, "
                f"nothing in it was run")
    if "Weights only load failed" in text:
        tail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else ""
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        return f"not a torch.save file, or a damaged one ({lines[0] if lines else 'unpickling failed'})"
    first = (text.strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first.split('. ')[0]}"


def load(path: str, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a clear error names the file on failure."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} could not be read ({load_error_reason(exc)})") from exc
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"checkpoint {path} is not an ifbf_fast checkpoint (no 'model' entry)")
    return obj


def load_newest(folder: str, map_location="cpu") -> Tuple[Optional[str], Optional[dict], List[str]]:
    """(path, state, skipped) of the newest periodic checkpoint in ``folder`` that loads; ``skipped``
    holds one line per newer checkpoint that did not (truncated, corrupt), newest first. ``(None, None,
    skipped)`` when none loads or there is none."""
    skipped = []
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load(path, map_location), skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    return None, None, skipped


def check_meta(saved: Dict[str, object], current: Dict[str, object], path: str) -> None:
    """Refuse a checkpoint of another model, naming every field that differs."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointMismatch(f"checkpoint {path} was made for another model: " + "; ".join(diffs))


def list_checkpoints(folder: str) -> List[str]:
    """Periodic checkpoints in ``folder``, oldest first."""
    paths = [p for p in glob.glob(os.path.join(glob.escape(folder), "iter_*.pt"))
             if re.search(r"iter_(\d+)\.pt$", p)]
    return sorted(paths, key=lambda p: int(re.search(r"iter_(\d+)\.pt$", p).group(1)))


def latest(folder: str) -> Optional[str]:
    paths = list_checkpoints(folder)
    return paths[-1] if paths else None


def prune(folder: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` periodic checkpoints (``best.pt`` is never touched)."""
    for path in list_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        os.remove(path)


def rng_state() -> dict:
    """Every RNG the training loop draws from, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the layout ---------------------------------------------------------------------------------

@dataclass
class TrainingCheckpoint:
    """What train.py saves and reads back (the module text lists the fields)."""

    model: dict
    meta: dict
    args: dict
    optimizer: Optional[dict] = None
    step: dict = field(default_factory=dict)
    iteration: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_miou: float = -1.0
    rng: Optional[dict] = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in _FIELDS}

    def save(self, path: str) -> None:
        """Write atomically (:func:`save_atomic`)."""
        save_atomic(self.to_dict(), path)

    @classmethod
    def from_dict(cls, state: dict, path: str, resume: bool = False) -> "TrainingCheckpoint":
        """The checkpoint in ``state`` (as :func:`load` returned it). ``CheckpointError`` naming ``path``
        when it has no ``args``/``meta`` (not written by train.py), or, with ``resume``, no
        ``iteration``/``optimizer`` to continue from."""
        if not isinstance(state.get("args"), dict) or not isinstance(state.get("meta"), dict):
            raise CheckpointError(f"checkpoint {path} is not an ifbf_fast checkpoint (no 'args'/'meta' entries)")
        if resume and (not isinstance(state.get("iteration"), int) or not isinstance(state.get("optimizer"), dict)):
            raise CheckpointError(f"checkpoint {path} is not a train.py checkpoint (no 'iteration'/'optimizer' "
                                  f"entries to resume from)")
        return cls(**{k: state[k] for k in _FIELDS if k in state})


_FIELDS = tuple(TrainingCheckpoint.__dataclass_fields__)


def read(path: str, map_location="cpu", resume: bool = False) -> TrainingCheckpoint:
    """:func:`load` + :meth:`TrainingCheckpoint.from_dict`: a train.py checkpoint or one line naming the file."""
    return TrainingCheckpoint.from_dict(load(path, map_location), path, resume)
