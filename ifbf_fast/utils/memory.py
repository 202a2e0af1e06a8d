"""Device-independent memory account of one IFBFNet training step, on fake tensors.

:func:`step_account` runs train.py's step, :class:`ifbf_fast.engine.step.TrainStep` (forward under
autocast, IFBFLoss on the heads' 1/4-resolution logits which the loss upsamples, backward, the finite
checks, fused SGD with momentum buffers, the flat norm-buffer snapshot), on fake tensors
(``FakeTensorMode``): every op computes shapes, dtypes and strides only, so an R101 step at crop 876
takes seconds on a CPU and the numbers do not depend on the machine. It counts:

* ``state``: the live bytes before a steady-state step (weights, the previous step's gradients,
  momentum buffers, norm buffers and their backup, the batch on the device, the schedule's table);
* ``step``: the step's peak of live bytes beyond that (:class:`LiveStorages`: a dispatch mode that
  registers every storage an op allocates, with a finaliser on each) -- what
  ``torch.cuda.max_memory_allocated() - memory_allocated()`` measures around one step on a GPU;
* ``saved``: the distinct storages packed for backward (:func:`count_saved`), weights left out.

What this leaves out: the caching allocator's rounding and fragmentation, cuDNN/cuBLAS workspaces and
the kernels' own scratch buffers (the fake kernels allocate outputs only). ``ifbf_fast.plan`` adds a
factor measured on a GPU for those.

The fake tensors are CPU tensors (the autograd engine wants a real CUDA device for the backward of
CUDA tensors, fake or not): fp32 counts are the same on either device; with bf16/fp16 the autocast op
lists are the CPU's, which differ from CUDA's in places (CUDA autocast runs bilinear upsampling in
fp32). Two stand-ins, both because fake tensors hold no values: the reference OHEM reads its labels on
the host, so the reference loss is :func:`ohem_ref_static` (the same ops for a batch whose labels are
all valid); the Triton ops are taken on fake CPU tensors under :func:`fast_paths_assumed`.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import time
import weakref
from typing import Callable, Dict, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
NUM_CLASSES = 19


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


def ohem_ref_static(logits: torch.Tensor, target: torch.Tensor, keep_ratio: float = 0.75) -> torch.Tensor:
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


class StaticReferenceLoss(torch.nn.Module):
    """IFBFLoss on the reference path with :func:`ohem_ref_static` for the OHEM: the reference upsamples
    the 1/4-resolution logits (bilinear, ``align_corners=False``) and runs the topk OHEM on them."""

    def __init__(self, aux_weight: float = 0.4, keep_ratio: float = 0.75):
        super().__init__()
        self.aux_weight, self.keep_ratio = aux_weight, keep_ratio

    def _ohem(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            logits = torch.nn.functional.interpolate(logits, size=target.shape[-2:], mode="bilinear",
                                                     align_corners=False)
        return ohem_ref_static(logits, target, self.keep_ratio)

    def forward(self, outputs: Dict[str, torch.Tensor], target: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self._ohem(outputs["out"], target)
        if "aux" in outputs and self.aux_weight:
            aux = self._ohem(outputs["aux"], target)
            return {"loss": out + self.aux_weight * aux, "out": out.detach(), "aux": aux.detach()}
        return {"loss": out, "out": out.detach()}


@contextlib.contextmanager
def fast_paths_assumed() -> Iterator[None]:
    """Let the switch pick the Triton ops on fake CPU tensors: their availability probes accept CPU
    tensors only under the interpreter. Nothing runs (the fake kernels stand in), so the probes are
    told so for the duration. The kernel modules are imported first, with the environment as it is,
    so that their import-time mode (compiled or interpreted) is not changed for the rest of the process.
    """
    fbf_kernels = importlib.import_module("ifbf_fast.kernels.fbf")
    ohem_kernels = importlib.import_module("ifbf_fast.kernels.ohem_ce")
    importlib.import_module("ifbf_fast.kernels.ohem_ce_upsampled")
    saved = fbf_kernels.INTERPRETER, os.environ.get("TRITON_INTERPRET"), ohem_kernels.INTERPRETER
    fbf_kernels.INTERPRETER = ohem_kernels.INTERPRETER = True
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        fbf_kernels.INTERPRETER, ohem_kernels.INTERPRETER = saved[0], saved[2]
        if saved[1] is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved[1]


def step_account(model_fn: Callable[[], torch.nn.Module], crop: int, batch: int, amp: str = "off",
                 impl: str = "fast", channels_last: bool = False, aux_weight: float = 0.4,
                 keep_ratio: float = 0.75, steps: int = 2, real: bool = False,
                 count_saved_bytes: bool = False, by_producer: Optional[Dict[str, int]] = None) -> Dict[str, object]:
    """Account ``steps`` training steps of :class:`TrainStep` over ``model_fn()`` and report the last
    (the first finds no gradients yet; a steady-state step finds the previous step's).

    ``impl``: "fast" (Triton FBF/OHEM, C++ ABN) or "reference" (the loss through
    :class:`StaticReferenceLoss`). ``real=True`` runs on real CPU tensors instead of fake ones (for the
    tests: the same count over a step that computes). Returns bytes: ``param`` (the weights), ``state``
    (live before the step), ``step`` (the step's peak beyond ``state``), ``peak`` (their sum), ``grads``
    (the gradients, part of ``state``: the step frees and remakes them) and
    ``saved`` (bytes saved for backward, weights and norm buffers left out, with ``count_saved_bytes``;
    ``by_producer`` then receives them by producing op), ``saved_tensors``, plus ``seconds``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ifbf_fast import ops
    from ifbf_fast.engine.step import FlatBuffers, TrainStep, fused_sgd
    from ifbf_fast.nn import IFBFLoss

    dtype = AMP[amp]
    t0 = time.perf_counter()
    fake = contextlib.nullcontext() if real else FakeTensorMode()
    assume = contextlib.nullcontext() if real or impl == "reference" else fast_paths_assumed()
    with fake, torch.device("cpu"), assume, ops.use_impl(impl):
        model = model_fn()
        if channels_last:      # Module.to(memory_format=...) without its swap, which fake parameters refuse
            for t in [*model.parameters(), *model.buffers()]:
                if t.dim() == 4:
                    t.data = t.data.contiguous(memory_format=torch.channels_last)
        model.train()
        buffers = FlatBuffers(model)
        optimizer = fused_sgd(list(model.parameters()), lr=0.01, momentum=0.9, weight_decay=5e-4)
        loss_fn = (StaticReferenceLoss(aux_weight, keep_ratio) if impl == "reference"
                   else IFBFLoss(aux_weight=aux_weight, keep_ratio=keep_ratio))

        def autocast():
            return torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None)

        step = TrainStep(model, model, loss_fn, optimizer, None, torch.device("cpu"), autocast,
                         fp16=amp == "fp16", channels_last=channels_last, buffers=buffers)
        batch_ = {"image": torch.randn(batch, 3, crop, crop),
                  "label": torch.randint(0, NUM_CLASSES, (batch, crop, crop), dtype=torch.uint8)}
        weights = {_storage(t)._cdata for t in [*model.parameters(), *model.buffers()]}
        tracker = LiveStorages()
        saved: Dict[int, int] = {}
        with tracker:
            for t in [*model.parameters(), *buffers.flats, *buffers.backups, *batch_.values(),
                      *(s["momentum_buffer"] for s in optimizer.state.values()), step.one, step.counters]:
                tracker.track(t)
            if step.loss_scale is not None:
                tracker.track(step.loss_scale.scale)
            for i in range(steps):
                grads = False          # the previous step's gradients (no reference kept: zero_grad frees them)
                for p in model.parameters():
                    if p.grad is not None:
                        tracker.track(p.grad)
                        grads = True
                before = tracker.current
                tracker.reset_peak()
                with count_saved(weights, by_producer) if count_saved_bytes and i == steps - 1 else \
                        contextlib.nullcontext({}) as saved_now:
                    step(batch_)
                saved = dict(saved_now)
        # A first step finds no gradients; a steady-state one finds the previous step's, which its
        # zero_grad frees before the backward makes new ones: the same peak, with the gradients counted
        # in the state (as a GPU measurement around a steady-state step counts them).
        new_grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
        grad_bytes = 0 if grads else new_grads
    return {"param": sum(p.numel() * p.element_size() for p in model.parameters()), "state": before + grad_bytes,
            "step": tracker.peak - before - grad_bytes, "peak": tracker.peak, "grads": new_grads,
            "saved": sum(saved.values()), "saved_tensors": len(saved), "seconds": time.perf_counter() - t0}
