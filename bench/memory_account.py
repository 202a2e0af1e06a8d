"""Device-independent memory account of one IFBFNet training step: reference path vs fast path.

    python bench/memory_account.py                      # IFBFNet-R101, crop 876, batch 2, fp32
    python bench/memory_account.py --amp bf16 --backbone resnet50 --crop 512

The step is ``train_one_step``'s (ifbf_fast/engine/trainer.py): forward (under autocast with ``--amp``),
the IFBF loss (OHEM(out) + 0.4 OHEM(aux)) on the fp32 logits, backward, SGD with momentum. It runs on
fake tensors (``FakeTensorMode``): every op computes shapes, dtypes and strides only, so an R101 step
at crop 876 takes seconds on a CPU and the numbers do not depend on the machine. Two counts:

* saved for backward: the distinct storages packed by ``torch.autograd.graph.saved_tensors_hooks``
  during forward + loss, parameters and buffers left out (they exist anyway). Casts of the weights
  made by autocast are counted: the step holds them until backward.
* peak: the largest sum of live storages during the step (``LiveStorages``: a dispatch mode that
  registers every storage an op allocates, with a finaliser on each); ``peak_step`` is that peak minus
  what was live before the step (parameters, buffers, the batch, the momentum buffers of step 1).

What this leaves out: the caching allocator's rounding and fragmentation, cuDNN/cuBLAS workspaces
and the kernels' own scratch buffers (the fake kernels allocate outputs only). It is a lower bound on
``torch.cuda.max_memory_allocated`` and compares paths like for like; a GPU run of
``bench/bench_train_step.py`` records the real peaks.

The fake tensors are CPU tensors: the autograd engine wants a real CUDA device for the backward of
CUDA tensors, fake or not. fp32 counts are the same on either device; with ``--amp bf16`` the
autocast op lists are the CPU's, which differ from CUDA's in places (CUDA autocast runs bilinear
upsampling in fp32, CPU autocast in bf16).

Paths (``PATHS``): ``fast`` = InPlace-ABN-Sync + impl "fast" (Triton FBF and OHEM, C++ ABN), with the
model built as train.py builds it (``upsample_logits=False``: the loss upsamples the 1/4-resolution
logits inside the fused OHEM kernels);
``reference_abn`` = the ABN reference module + impl "reference"; ``bn_leaky_relu`` = BatchNorm2d +
LeakyReLU + impl "reference" (the plain-PyTorch set-up one would train without this project).

Two stand-ins, both because fake tensors hold no values:
* the reference OHEM reads its labels on the host (label check, number of valid pixels); the account
  uses :func:`ohem_ref_static`, the same ops with those reads replaced by their values for a batch
  whose labels are all valid (tests/test_memory_account.py checks it against the reference: value,
  gradient and saved bytes);
* the switch takes the Triton ops on CPU tensors only under the interpreter; nothing runs here (the
  fake kernels registered in ops/fbf.py and ops/ohem_ce.py stand in), so ``fast_paths_assumed`` tells
  the availability probes so for the duration of the account.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import sys
import time
import weakref
from typing import Callable, Dict, Iterator, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ifbf_fast import ops

# name: (norm_act kind, implementation)
PATHS: Dict[str, tuple] = {
    "bn_leaky_relu": ("bn_leaky_relu", "reference"),
    "reference_abn": ("abn", "reference"),
    "fast": ("inplace_abn_sync", "fast"),
}
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
AUX_WEIGHT, KEEP_RATIO, NUM_CLASSES = 0.4, 0.75, 19


# --- counting ----------------------------------------------------------------------------------------

def _storage(t: torch.Tensor):
    return t.untyped_storage()


class LiveStorages(TorchDispatchMode):
    """Sum of the bytes of the live storages: every storage an op allocates (an output storage that is
    none of its inputs') is registered once, with a finaliser that takes it off when the storage dies;
    ``track`` registers tensors that existed before; ``peak`` is the largest sum seen."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        st = _storage(t)
        key = st._cdata
        if key in self.live:
            return
        self.live[key] = st.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output on an input's storage (a view, an in-place op) allocated nothing, even where that
        # storage predates the tracking (a parameter updated in place).
        inputs = {_storage(t)._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _storage(t)._cdata not in inputs:
                self.track(t)
        return out


@contextlib.contextmanager
def count_saved(exclude: set, by_producer: Optional[Dict[str, int]] = None) -> Iterator[Dict[int, int]]:
    """Distinct storages packed for backward (``{storage id: bytes}``), those in ``exclude`` left out.
    ``by_producer`` (optional) sums the same bytes by the autograd node that produced each tensor."""
    seen: Dict[int, int] = {}

    def pack(t):
        st = _storage(t)
        if st._cdata not in exclude and st._cdata not in seen:
            seen[st._cdata] = st.nbytes()
            if by_producer is not None:
                node = type(t.grad_fn).__name__ if t.grad_fn is not None else "(leaf or no grad)"
                key = f"{node.replace('GeneratedBackwardFor_', '')} {str(t.dtype).replace('torch.', '')}"
                by_producer[key] = by_producer.get(key, 0) + st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


# --- the pieces of the step --------------------------------------------------------------------------

def ohem_ref_static(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float = KEEP_RATIO) -> torch.Tensor:
    """``ops.ohem_cross_entropy_ref`` op for op (thresh None), for targets whose every label is valid:
    its label check is skipped and n_valid is the pixel count, so fake tensors can run it."""
    target = target.long()
    valid = target != 255
    logp = torch.log_softmax(logits.float(), dim=1)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    loss = -logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    kept = torch.zeros_like(valid)
    k = int(math.ceil(float(keep_ratio) * valid.numel()))
    flat_valid = torch.arange(valid.numel(), device=valid.device)
    top = loss.detach().flatten()[flat_valid].topk(k).indices
    kept.view(-1)[flat_valid[top]] = True
    total = torch.where(kept, loss, torch.zeros_like(loss)).sum()
    return total / kept.sum().clamp_min(1).to(total.dtype)


def step_loss(outputs: Dict[str, torch.Tensor], labels: torch.Tensor, impl: str) -> torch.Tensor:
    """IFBFLoss on ``train_one_step``'s fp32 logits: the fast op, or the reference stand-in."""
    if impl == "reference":
        ohem: Callable = ohem_ref_static
    else:
        from ifbf_fast.nn import OHEMCrossEntropy
        module = OHEMCrossEntropy(KEEP_RATIO)               # upsamples 1/4-resolution logits as train.py's loss

        def ohem(x, t):
            with ops.use_impl(impl):
                return module(x, t)
    logits = {k: v.float() for k, v in outputs.items()}
    return ohem(logits["out"], labels) + AUX_WEIGHT * ohem(logits["aux"], labels)


@contextlib.contextmanager
def fast_paths_assumed() -> Iterator[None]:
    """Let the switch pick the Triton ops on fake CPU tensors: their availability probes accept CPU
    tensors only under the interpreter. Nothing runs (the fake kernels stand in), so the probes are
    told so for the duration. The kernel modules are imported first, with the environment as it is,
    so that their import-time mode (compiled or interpreted) is not changed for the rest of the process.
    """
    import os

    fbf_kernels = importlib.import_module("ifbf_fast.kernels.fbf")
    importlib.import_module("ifbf_fast.kernels.ohem_ce")
    importlib.import_module("ifbf_fast.kernels.ohem_ce_upsampled")
    saved = fbf_kernels.INTERPRETER, os.environ.get("TRITON_INTERPRET")
    fbf_kernels.INTERPRETER = True
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        fbf_kernels.INTERPRETER = saved[0]
        if saved[1] is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved[1]


def account(path: str, backbone: str = "resnet101", crop: int = 876, batch: int = 2, amp: str = "off",
            device: str = "cpu", steps: int = 2) -> Dict[str, object]:
    """Run ``steps`` fake training steps on ``path`` and count the last one (the first creates the SGD
    momentum buffers, which a steady-state step finds already there)."""
    from ifbf_fast.models import build_model
    from ifbf_fast.nn import norm_act

    kind, impl = PATHS[path]
    dev = torch.device(device)
    t0 = time.perf_counter()
    with FakeTensorMode(), dev, fast_paths_assumed(), ops.use_impl(impl):
        model = build_model({"backbone": backbone, "num_classes": NUM_CLASSES, "norm_act": norm_act(kind),
                             "upsample_logits": impl == "reference"})
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        images = torch.randn(batch, 3, crop, crop)
        labels = torch.zeros(batch, crop, crop, dtype=torch.int64)
        state = {_storage(t)._cdata for t in list(model.parameters()) + list(model.buffers())}
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        tracker = LiveStorages()
        with tracker:
            for t in list(model.parameters()) + list(model.buffers()) + [images, labels]:
                tracker.track(t)
            for _ in range(steps):
                for buf in optimizer.state.values():
                    tracker.track(buf["momentum_buffer"])
                optimizer.zero_grad(set_to_none=True)
                before = tracker.current
                tracker.reset_peak()
                producers: Dict[str, int] = {}
                with count_saved(state, producers) as saved:
                    with torch.autocast(dev.type, AMP[amp] or torch.float32, enabled=AMP[amp] is not None):
                        outputs = model(images)
                    loss = step_loss(outputs, labels, impl)
                saved_bytes = sum(saved.values())
                saved_count = len(saved)
                del outputs, saved
                loss.backward()
                del loss
                optimizer.step()
    return {"path": path, "norm_act": kind, "impl": impl, "backbone": backbone, "crop": crop, "batch": batch,
            "amp": amp, "param_bytes": param_bytes, "saved_bytes": saved_bytes, "saved_tensors": saved_count,
            "saved_by_producer": dict(sorted(producers.items(), key=lambda kv: -kv[1])), "live_before_step": before, "peak": tracker.peak, "peak_step": tracker.peak - before,
            "seconds": time.perf_counter() - t0}


def format_table(rows) -> str:
    """Markdown table of :func:`account` results, with each path's share of the first row's bytes."""
    base = rows[0]
    lines = [f"IFBFNet ({base['backbone']}), crop {base['crop']}, batch {base['batch']}, amp {base['amp']}: "
             f"one training step on fake tensors (live tensor bytes; allocator overhead not counted)", "",
             "| path | norm-act | impl | saved for backward (MiB) | vs first | peak of step (MiB) | vs first |"
             " peak incl. state (MiB) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    mib = 2.0 ** 20
    for r in rows:
        lines.append(f"| {r['path']} | {r['norm_act']} | {r['impl']} | {r['saved_bytes'] / mib:,.0f} | "
                     f"{r['saved_bytes'] / base['saved_bytes']:.0%} | {r['peak_step'] / mib:,.0f} | "
                     f"{r['peak_step'] / base['peak_step']:.0%} | {r['peak'] / mib:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--crop", type=int, default=876)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--amp", choices=list(AMP), default="off")
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    p.add_argument("--breakdown", action="store_true", help="also list the saved bytes by producing op")
    args = p.parse_args(argv)
    rows = [account(path, args.backbone, args.crop, args.batch, args.amp) for path in args.paths]
    print(format_table(rows))
    if args.breakdown:
        for r in rows:
            top = list(r["saved_by_producer"].items())[:8]
            print(f"\n{r['path']}: saved for backward by the op that produced the tensor (MiB): "
                  + ", ".join(f"{k} {v / 2 ** 20:,.0f}" for k, v in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
