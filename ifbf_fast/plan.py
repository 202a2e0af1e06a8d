"""Memory planner: the peak GPU memory of one training step, before any data is read.

    python -m ifbf_fast.plan --config configs/ifbfnet_r101_cityscapes.yaml --gpu-memory 24GiB
    python train.py --config configs/ifbfnet_r101_cityscapes.yaml --data DIR --plan --gpu-memory 24GiB

The prediction, per GPU (per process), is

    state + ALLOCATOR_FACTOR * step + CONTEXT_BYTES

* ``state``: what is live before a steady-state step: fp32 weights, their gradients (left from the
  previous step), SGD momentum buffers, the norm buffers and their backup (``FlatBuffers``), the batch;
* ``step``: the step's own peak of live tensor bytes beyond ``state`` (activations saved for backward,
  the loss's temporaries, the gradients while they are created), counted on fake tensors by
  :func:`ifbf_fast.utils.memory.step_account` over train.py's :class:`~ifbf_fast.engine.step.TrainStep`
  with the run's backbone, crop, batch, AMP mode, norm, implementation and memory format;
* ``ALLOCATOR_FACTOR`` = 1.18: what the fake-tensor count leaves out (the caching allocator's rounding
  to 512-byte blocks and 2 MiB segments, cuDNN/cuBLAS workspaces, kernel scratch buffers, CUDA
  autocast's fp32 bilinear upsampling). Measured once: bench/results/nvidia-h200-ba7a6d620556.json
  records ``max_memory_allocated() - memory_allocated()`` around one eager IFBFNet-R101 step at crop
  876, batch 2, bf16 on an H200: 2,615,933,440 B on the fast path (InPlace-ABN-Sync, impl fast) and
  4,227,117,568 B on the reference (BatchNorm2d + LeakyReLU, impl reference). The account of the same
  configurations (NCHW, as that bench ran) gives 2,224,003,988 B and 3,988,821,532 B (``step``),
  ratios 1.176 and 1.060; the factor is the larger, rounded up, so that the plan errs on the side of
  fitting less. (The fast path is what train.py runs by default; why the two ratios differ has not
  been measured. A GPU run of bench/bench_train_step.py beside this account would re-measure both.)
* ``CONTEXT_BYTES`` = 512 MiB: the CUDA context and the cuDNN/cuBLAS handles, which the allocator does
  not see (not measured in that file: a typical figure for a recent driver, an assumption).

A plan fits when the prediction is at most ``1 - SAFETY`` (90%) of the GPU's total memory
(``torch.cuda.get_device_properties`` on a GPU, else ``--gpu-memory``). The suggestions (largest
batch at this crop, largest crop, a multiple of 8, at this batch) scale ``step`` linearly with the
number of pixels per step, batch x crop^2, from the one account (see :func:`predict`; tests/test_plan.py
checks the linearity), so a plan that fits costs one fake step: seconds for R101 at crop 876 on two CPU
cores; one that does not fit checks its suggestions with an account each.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, Optional

import torch

from ifbf_fast.engine.config import parse_memory  # noqa: F401  (the --gpu-memory type; also this module's API)

ALLOCATOR_FACTOR = 1.18
CONTEXT_BYTES = 512 * 2 ** 20
SAFETY = 0.10
GiB = 2.0 ** 30

def _settings(args: argparse.Namespace) -> Dict[str, object]:
    """What the plan accounts, resolved as a GPU run resolves ``auto``: bf16 (fp16 on a GPU without
    bf16), channels_last, the fast ops unless ``--impl reference``."""
    from ifbf_fast.utils.runtime import resolve_amp

    if args.amp == "auto":
        amp = resolve_amp("auto", torch.device("cuda")) if torch.cuda.is_available() else "bf16"
    else:
        amp = args.amp
    return {"amp": amp, "channels_last": args.memory_format in ("auto", "channels_last"),
            "impl": "reference" if (args.impl or os.environ.get("IFBF_IMPL", "auto")) == "reference" else "fast"}


def gpu_memory(args: argparse.Namespace) -> Optional[tuple]:
    """(bytes, name) of the memory planned against: ``--gpu-memory`` if given, else the first visible
    GPU's total, else None (the CPU, nothing to plan against)."""
    if getattr(args, "gpu_memory", None):
        return int(args.gpu_memory), "--gpu-memory"
    if torch.cuda.is_available() and args.gpus != 0:
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), props.name
    return None


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The IFBFNet of ``args`` as ``ifbf_fast.inference.model_from_args`` builds it for training, without
    its move to a device (fake parameters cannot be swapped by ``Module.to``) and without the
    pretrained weights (the account needs shapes only)."""
    from ifbf_fast.models import build_model as build
    from ifbf_fast.nn import norm_act

    return build({"backbone": args.backbone, "num_classes": args.num_classes, "output_stride": args.output_stride,
                  "spatial_channels": args.spatial_channels, "aspp": args.aspp, "skip": args.skip, "fbf": args.fbf,
                  "spatial": args.spatial, "aux": args.aux, "norm_act": norm_act({"bn": "bn_leaky_relu"}.get(
                      args.norm, args.norm)), "pretrained": None, "upsample_logits": False})


def _account(args: argparse.Namespace, batch: int, crop: int, s: Dict[str, object]) -> Dict[str, object]:
    from ifbf_fast.utils.memory import step_account

    return step_account(lambda: build_model(args), crop, batch, s["amp"], s["impl"], s["channels_last"],
                        args.aux_weight, args.keep_ratio, steps=1)


def _predicted(acc: Dict[str, object], factor: float, context: int) -> int:
    return int(acc["state"] + factor * acc["step"] + context)


def predict(args: argparse.Namespace, total: Optional[int] = None, factor: float = ALLOCATOR_FACTOR,
            context: int = CONTEXT_BYTES) -> Dict[str, object]:
    """The plan of ``args`` (train.py's parsed options) against ``total`` bytes (None: no suggestions).

    Returns the settings, ``state``/``step`` (the account's live bytes), ``live`` (their sum: the peak
    of live tensor bytes, without allocator or context), ``predicted`` (the formula of the module
    docstring), and with ``total``: ``fits``, ``max_batch`` (at this crop) and ``max_crop`` (at this
    batch, a multiple of 8), each 0 where even the smallest does not fit.

    The suggestions scale the step's live bytes *with* the gradients (``step + grads``: what the step
    holds beyond the weights, momentum and buffers) in proportion to batch x crop^2. That is exact
    where activations dominate (tests/test_plan.py) and an over-estimate for larger steps where the
    gradients do (the backward's end is then the peak, which does not grow with the batch): a
    suggestion above the run's batch or crop fits. Below it (a plan that does not fit) the estimate can
    be low, so it is checked with its own account and lowered until it fits.
    """
    s = _settings(args)
    acc = _account(args, args.batch_size, args.crop_size, s)
    seconds = acc["seconds"]
    plan = dict(s, backbone=args.backbone, norm=args.norm, crop=args.crop_size, batch=args.batch_size,
                state=acc["state"], step=acc["step"], grads=acc["grads"], live=acc["state"] + acc["step"],
                predicted=_predicted(acc, factor, context), factor=factor, context=context)
    if total is not None:
        usable = (1.0 - SAFETY) * total
        fixed = acc["state"] + context - factor * acc["grads"]
        per_pixel = factor * (acc["step"] + acc["grads"]) / (args.batch_size * args.crop_size ** 2)
        room = max(usable - fixed, 0.0)
        max_batch = int(room // (per_pixel * args.crop_size ** 2))
        max_crop = int(math.sqrt(room / (per_pixel * args.batch_size)) // 8 * 8)
        fits = plan["predicted"] <= usable
        if not fits:       # below the run's own size: check the estimate with an account (see above)
            for _ in range(4):
                if max_batch < 1:
                    break
                check = _account(args, max_batch, args.crop_size, s)
                seconds += check["seconds"]
                if _predicted(check, factor, context) <= usable:
                    break
                max_batch -= 1
            for _ in range(4):
                if max_crop < 8:
                    break
                check = _account(args, args.batch_size, max_crop, s)
                seconds += check["seconds"]
                if _predicted(check, factor, context) <= usable:
                    break
                max_crop -= 8
        plan.update(total=total, budget=usable, fits=fits, max_batch=max(0, max_batch), max_crop=max(0, max_crop))
    plan["seconds"] = seconds
    return plan


def _g(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def summary(plan: Dict[str, object], where: str = "") -> str:
    """One line: the prediction against the GPU's memory (and whether it fits)."""
    head = (f"memory plan: {plan['backbone']} crop {plan['crop']} batch {plan['batch']} amp {plan['amp']} "
            f"{plan['norm']} {'channels_last' if plan['channels_last'] else 'nchw'} impl {plan['impl']}: "
            f"predicted peak {_g(plan['predicted'])} per GPU")
    if "total" not in plan:
        return head
    verdict = "fits" if plan["fits"] else "does not fit"
    return (f"{head} of {_g(plan['total'])}{f' ({where})' if where else ''}: {verdict} "
            f"(largest batch at crop {plan['crop']}: {plan['max_batch']}; "
            f"largest crop at batch {plan['batch']}: {plan['max_crop']})")


def report(plan: Dict[str, object], where: str = "") -> str:
    """The full plan (``--plan``): the terms of the prediction and the suggestions."""
    lines = [summary(plan, where),
             f"  state (weights, gradients, momentum, norm buffers + backup, batch): {_g(plan['state'])}",
             f"  step (peak of live activations and temporaries, fake-tensor account): {_g(plan['step'])}",
             f"  x {plan['factor']:.2f} allocator overhead + {_g(plan['context'])} CUDA context "
             f"= {_g(plan['predicted'])} predicted ({_g(plan['live'])} live tensor bytes)"]
    if "total" in plan:
        lines.append(f"  usable with a {SAFETY:.0%} margin: {_g(plan['budget'])} of {_g(plan['total'])}; "
                     f"largest --batch-size at --crop-size {plan['crop']}: {plan['max_batch']}; largest "
                     f"--crop-size at --batch-size {plan['batch']}: {plan['max_crop']}")
    else:
        lines.append("  no GPU here: give --gpu-memory (e.g. 11GiB, 80GB, 24000MiB) to plan against one")
    lines.append(f"  (accounted in {plan['seconds']:.1f} s)")
    return "\n".join(lines)


def _primary() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def gate(args: argparse.Namespace) -> bool:
    """train.py's check before any process starts: ``--plan`` prints the plan (True: nothing to train);
    otherwise, with a GPU or ``--gpu-memory``, print the one-line prediction (primary rank) and raise
    ``UsageError`` (exit 2) when it does not fit, unless ``--no-plan-check``. On the CPU without
    ``--gpu-memory`` nothing is accounted (the CPU run is not slowed)."""
    from ifbf_fast.utils.runtime import UsageError

    target = gpu_memory(args)
    if getattr(args, "plan", False):
        plan = predict(args, target[0] if target else None)
        if _primary():
            print(report(plan, target[1] if target else ""), flush=True)
        return True
    if target is None or not getattr(args, "plan_check", True):
        return False
    plan = predict(args, target[0])
    if _primary():
        print(summary(plan, target[1]), flush=True)
    if not plan["fits"]:
        raise UsageError(
            f"--batch-size {plan['batch']} --crop-size {plan['crop']}: predicted peak {_g(plan['predicted'])} "
            f"per GPU exceeds {1 - SAFETY:.0%} of {_g(plan['total'])} ({target[1]}); use --batch-size "
            f"{plan['max_batch']} or --crop-size {plan['max_crop']}, or --no-plan-check to try anyway")
    return False


def main(argv=None) -> int:
    """``python -m ifbf_fast.plan [train.py options]``: print the plan; 0, or 2 for a bad option."""
    from ifbf_fast.engine.config import parse_args

    args = parse_args(argv)
    target = gpu_memory(args)
    print(report(predict(args, target[0] if target else None), target[1] if target else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
