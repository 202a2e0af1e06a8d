"""Device-independent memory account of one IFBFNet training step: reference path vs fast path.

    python bench/memory_account.py                      # IFBFNet-R101, crop 876, batch 2, fp32
    python bench/memory_account.py --amp bf16 --backbone resnet50 --crop 512

A thin command line over :func:`ifbf_fast.utils.memory.step_account` (the counters, the stand-ins and
what the count leaves out are described there; ``ifbf_fast.plan`` predicts GPU memory from the same
account). The step is train.py's :class:`ifbf_fast.engine.step.TrainStep`: forward (under autocast
with ``--amp``), IFBFLoss on the heads' 1/4-resolution logits (the loss upsamples them), backward,
fused SGD with momentum, the norm-buffer snapshot, on fake tensors. Per path it prints:

* saved for backward: the distinct storages packed by ``torch.autograd.graph.saved_tensors_hooks``
  during the step, parameters and buffers left out (they exist anyway). Casts of the weights made by
  autocast are counted: the step holds them until backward.
* peak of step: the largest sum of live storages during a steady-state step beyond what was live
  after its ``zero_grad`` (weights, momentum, norm buffers and backup, the batch): the activations and
  the gradients the backward makes. (``ifbf_fast.plan`` counts the gradients in the state instead, as
  ``max_memory_allocated() - memory_allocated()`` around a GPU step does.) peak incl. state: the whole.

Paths (``PATHS``): ``fast`` = InPlace-ABN-Sync + impl "fast" (Triton FBF and OHEM, C++ ABN);
``reference_abn`` = the ABN reference module + impl "reference"; ``bn_leaky_relu`` = BatchNorm2d +
LeakyReLU + impl "reference" (the plain-PyTorch set-up one would train without this project).
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict

from ifbf_fast.utils.memory import (AMP, NUM_CLASSES, LiveStorages, count_saved,  # noqa: F401 (re-exported)
                                    fast_paths_assumed, ohem_ref_static, step_account)

# name: (norm_act kind, implementation)
PATHS: Dict[str, tuple] = {
    "bn_leaky_relu": ("bn_leaky_relu", "reference"),
    "reference_abn": ("abn", "reference"),
    "fast": ("inplace_abn_sync", "fast"),
}


def account(path: str, backbone: str = "resnet101", crop: int = 876, batch: int = 2, amp: str = "off",
            steps: int = 1) -> Dict[str, object]:
    """The account of one steady-state training step on ``path`` (see :func:`step_account`)."""
    from ifbf_fast.models import build_model
    from ifbf_fast.nn import norm_act

    kind, impl = PATHS[path]
    producers: Dict[str, int] = {}
    r = step_account(lambda: build_model({"backbone": backbone, "num_classes": NUM_CLASSES,
                                          "norm_act": norm_act(kind), "upsample_logits": False}),
                     crop, batch, amp, impl, steps=steps, count_saved_bytes=True, by_producer=producers)
    return {"path": path, "norm_act": kind, "impl": impl, "backbone": backbone, "crop": crop, "batch": batch,
            "amp": amp, "param_bytes": r["param"], "saved_bytes": r["saved"], "saved_tensors": r["saved_tensors"],
            "saved_by_producer": dict(sorted(producers.items(), key=lambda kv: -kv[1])),
            "live_before_step": r["state"] - r["grads"], "peak": r["peak"], "peak_step": r["step"] + r["grads"],
            "seconds": r["seconds"]}


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
