"""The training step, sync-free: forward, loss, backward and optimizer step without a host read.

The GPU must never wait for the host. A step that reads a tensor on the host (``loss.item()``, a
``bool`` of a flag, ``GradScaler.get_scale()``) drains the launch queue: the backward then starts from
an empty queue and every small kernel of it pays its launch latency in full. So everything a step
decides, it decides on the device, and the host reads the outcome only every ``--log-every`` steps
(:meth:`TrainStep.read_counters`).

The non-finite rule, on the device: a step whose loss or gradients are not finite (on any rank) changes
nothing, bitwise: weights, momentum buffers, norm running statistics, the learning-rate schedule and
the loss scale's growth counter stay as they were. The pieces:

* :class:`FlatBuffers` keeps every buffer of the model (the norm layers' running statistics and
  counters) as a view into one flat tensor per dtype, so one copy snapshots them before the forward and
  one ``where`` restores them after a bad step (the forward has already written the batch's statistics
  into them by then, NaN included).
* The optimizer is ``torch.optim.SGD(fused=True)``: its kernel takes a ``found_inf`` tensor and leaves
  parameters and momentum buffers untouched when it is set, the mechanism AMP uses, with no host read.
  Momentum buffers are created as zeros up front (fused SGD would otherwise create them uninitialised
  on the first step, skipped or not); ``momentum * 0 + g`` is ``g`` bitwise, as the first step wants.
* :class:`DeviceSchedule` holds each parameter group's learning rate as a device tensor looked up in a
  precomputed table by the number of steps *taken*, so a skipped step does not advance the schedule.
* fp16: :class:`LossScale` is GradScaler's dynamic scale kept on the device (``_amp_update_scale_``).

``--iters`` counts steps attempted; a skipped step counts but does not advance the schedule, and the log
says how many were skipped. Device launches the step adds to the model's: a snapshot and a restore per
buffer dtype, the finite checks (one multi-tensor launch per ~100 gradients), one fused SGD launch per
parameter group and a handful of scalar updates.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ifbf_fast.utils import dist as du


class FlatBuffers:
    """Every buffer of ``model`` as a view into one flat tensor per dtype (in place: call it after the
    model is on its device and in its memory format, before DDP wraps it).

    Buffers keep their shapes, names and ``state_dict`` entries; in-place updates (BatchNorm's and
    InPlace-ABN's running statistics) land in the flat tensor. ``load_state_dict`` copies in place too.
    """

    def __init__(self, model: torch.nn.Module):
        groups: Dict[tuple, List[tuple]] = {}
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.numel() > 0:
                    groups.setdefault((buf.dtype, buf.device), []).append((module, name, buf))
        self.flats: List[torch.Tensor] = []
        for items in groups.values():
            flat = torch.cat([b.detach().reshape(-1) for _, _, b in items])
            offset = 0
            for module, name, buf in items:
                n = buf.numel()
                module._buffers[name] = flat[offset:offset + n].view(buf.shape)
                offset += n
            self.flats.append(flat)
        self.backups = [torch.empty_like(f) for f in self.flats]

    def snapshot(self) -> None:
        for flat, backup in zip(self.flats, self.backups):
            backup.copy_(flat)

    def restore_where(self, bad: torch.Tensor) -> None:
        """Put the snapshot back where ``bad`` (a 0-d/1-element bool tensor on the device) is set."""
        for flat, backup in zip(self.flats, self.backups):
            torch.where(bad, backup, flat, out=flat)


class DeviceSchedule:
    """Each parameter group's learning rate as a (1,) device tensor: ``base_lr * factor(taken)``.

    ``factor(t)`` (the poly + warm-up of :func:`ifbf_fast.engine.trainer.poly_warmup`) is tabulated once
    for ``t = 0 .. total``; :meth:`apply` looks up the row of the current ``taken`` count with one
    ``index_select`` for all groups, :meth:`advance` adds 1 to ``taken`` where the step was good.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float], total: int,
                 device: torch.device):
        self.optimizer = optimizer
        base = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        factors = torch.tensor([factor(t) for t in range(total + 1)], dtype=torch.float64)
        self.table = (torch.tensor(base, dtype=torch.float64)[:, None] * factors[None, :]).float().to(device)
        self.taken = torch.zeros(1, dtype=torch.int64, device=device)
        self.lr = torch.empty(len(base), 1, dtype=torch.float32, device=device)
        for g, b in zip(optimizer.param_groups, base):
            g["initial_lr"] = b
        self.bind()
        self.apply()

    def bind(self) -> None:
        """(Re)attach the lr tensors to the optimizer's groups (``load_state_dict`` replaces them)."""
        for i, g in enumerate(self.optimizer.param_groups):
            g["lr"] = self.lr[i]

    def apply(self) -> None:
        torch.index_select(self.table, 1, self.taken, out=self.lr)

    def advance(self, good: torch.Tensor) -> None:
        self.taken.add_(good)

    def state_dict(self) -> dict:
        return {"taken": int(self.taken.item())}

    def load_state_dict(self, state: dict) -> None:
        self.taken.fill_(int(state["taken"]))
        self.bind()
        self.apply()


class LossScale:
    """fp16 dynamic loss scale on the device (GradScaler's rule: x0.5 on a bad step, x2 after 2000 good)."""

    def __init__(self, device: torch.device, init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale = torch.full((1,), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros(1, dtype=torch.int32, device=device)
        self.growth_interval = growth_interval

    def update(self, found_inf: torch.Tensor) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, 2.0, 0.5, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": float(self.scale.item()), "growth_tracker": int(self.growth_tracker.item())}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scale.fill_(float(state["scale"]))
            self.growth_tracker.fill_(int(state["growth_tracker"]))


def fused_sgd(groups: Sequence[dict], lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD whose step skips itself on the device when ``optimizer.found_inf`` is set (see the module
    docstring), momentum buffers created as zeros."""
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    if momentum != 0:
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


# counters, one float64 vector so that one read gives them all
_SKIPPED, _CONSEC, _MAX_CONSEC, _BAD_LABELS, _STEPS = range(5)


class TrainStep:
    """``step(batch) -> terms``: one training step with no host read (see the module docstring).

    ``net`` is what the forward calls (the model, or its DDP wrapper); ``model`` the unwrapped module
    (its buffers are flattened here unless ``buffers`` is given: flatten before wrapping in DDP).
    ``autocast`` is a factory of the forward's autocast context; ``fp16`` adds the device loss scale.
    ``terms`` are the loss terms, detached, plus ``"skipped"`` (1.0 where this step was skipped), all on
    the device. :meth:`compile` compiles forward and loss together.
    """

    def __init__(self, net: Callable, model: torch.nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 schedule: Optional[DeviceSchedule], device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 fp16: bool = False, channels_last: bool = False, buffers: Optional[FlatBuffers] = None):
        if not getattr(optimizer, "_step_supports_amp_scaling", False) or not \
                all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("TrainStep needs an optimizer that skips itself on the device: "
                             "torch.optim.SGD(..., fused=True), e.g. ifbf_fast.engine.step.fused_sgd")
        self.net, self.model, self.loss_fn = net, model, loss_fn
        self.optimizer, self.schedule, self.device = optimizer, schedule, device
        self.channels_last = channels_last
        self.buffers = buffers if buffers is not None else FlatBuffers(model)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.loss_scale = LossScale(device) if fp16 else None
        self.autocast = autocast
        self.forward_loss = self._forward_loss
        self.cudagraphs = False
        self.one = torch.ones(1, dtype=torch.float32, device=device)
        self.counters = torch.zeros(5, dtype=torch.float64, device=device)

    def compile(self, mode: str = "default", backend: str = "inductor") -> None:
        """``torch.compile`` forward and loss as one function (AOTAutograd compiles the backward with it).

        The optimizer step, the finite checks and the buffer restore stay eager: a few multi-tensor
        launches. ``mode`` is torch.compile's (``reduce-overhead`` replays the compiled forward and
        backward as CUDA graphs: every step then starts with ``cudagraph_mark_step_begin``).
        """
        self.forward_loss = torch.compile(self._forward_loss, mode=None if mode == "default" else mode,
                                          backend=backend)
        self.cudagraphs = mode == "reduce-overhead"

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        with self.autocast():
            outputs = self.net(images)
        return self.loss_fn({k: v.float() for k, v in outputs.items()}, labels)

    def __call__(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        images = batch["image"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].to(self.device, non_blocking=True)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        self.buffers.snapshot()
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.forward_loss(images, labels)
        loss = terms["loss"]
        if self.loss_scale is not None:
            (loss * self.loss_scale.scale).backward()
            inv_scale = self.loss_scale.scale.reciprocal()
        else:
            loss.backward()
            inv_scale = self.one
        loss = loss.detach()
        found = torch.logical_not(torch.isfinite(loss)).float().reshape(1)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:   # sets found to 1 where a gradient is not finite (and unscales fp16 gradients)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv_scale)
        if du.is_dist():   # the same decision on every rank (DDP's gradients already agree)
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        self.optimizer.grad_scale, self.optimizer.found_inf = None, found
        self.optimizer.step()
        bad = found.bool()
        self.buffers.restore_where(bad)
        if self.loss_scale is not None:
            self.loss_scale.update(found)
        if self.schedule is not None:   # the lr tensors always hold the next step's rate
            self.schedule.advance(torch.logical_not(bad))
            self.schedule.apply()
        self._count(found, terms.get("bad_labels"))
        out = {k: v.detach() for k, v in terms.items() if k != "bad_labels"}
        out["skipped"] = found.reshape(())
        return out

    def _count(self, found: torch.Tensor, bad_labels: Optional[torch.Tensor]) -> None:
        c = self.counters
        f = found.to(torch.float64)
        c.narrow(0, _SKIPPED, 1).add_(f)
        consec = c.narrow(0, _CONSEC, 1)
        consec.add_(1.0).mul_(f)                          # consecutive skips: (n + 1) * f
        longest = c.narrow(0, _MAX_CONSEC, 1)
        torch.maximum(longest, consec, out=longest)
        if bad_labels is not None:
            c.narrow(0, _BAD_LABELS, 1).add_(bad_labels.detach().to(torch.float64).reshape(1))
        c.narrow(0, _STEPS, 1).add_(1.0)

    def read_counters(self) -> Dict[str, int]:
        """The one host read: steps skipped, the longest run of consecutive skips and bad label pixels
        since the last read, and steps since the last read; the per-interval counters restart."""
        skipped, consec, max_consec, bad, steps = (int(v) for v in self.counters.tolist())
        self.counters.copy_(torch.tensor([0.0, consec, consec, 0.0, 0.0], dtype=torch.float64))
        return {"skipped": skipped, "consecutive": consec, "max_consecutive": max_consec,
                "bad_labels": bad, "steps": steps}

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict() if self.schedule is not None else {},
                "loss_scale": self.loss_scale.state_dict() if self.loss_scale is not None else {},
                "counters": self.counters.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if self.schedule is not None and state.get("schedule"):
            self.schedule.load_state_dict(state["schedule"])
        if self.loss_scale is not None:
            self.loss_scale.load_state_dict(state.get("loss_scale") or {})
        if state.get("counters"):
            self.counters.copy_(torch.tensor(state["counters"], dtype=torch.float64))
