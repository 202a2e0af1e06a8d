"""End-to-end training step (pytest-benchmark): images/s and peak memory, same batch and crop.

    python -m pytest bench/bench_train_step.py --benchmark-only --benchmark-columns=median,iqr,rounds

One step is :class:`ifbf_fast.engine.step.TrainStep`, what train.py runs: forward under autocast, IFBF
loss = OHEM(out) + 0.4 OHEM(aux) on the heads' 1/4-resolution logits (the loss upsamples them),
backward, the device-side finite checks, fused SGD with momentum, the norm-buffer snapshot/restore.
A fixed random batch (labels with ~10% ignored pixels), after warm-up steps (compilation, allocator).
The step reads nothing on the host; the bench synchronises after each step to time it.

Set-ups (``impl``), each eager, compiled (``torch.compile`` of model + loss, mode "default") and with
CUDA graphs (mode "reduce-overhead"), in channels_last and NCHW:

* ``reference``: BatchNorm2d + LeakyReLU (cuDNN/ATen), ``fbf_ref`` and the topk OHEM: the plain-PyTorch
  set-up one would train without this project (its OHEM reads the host, so its compiled step has a
  graph break and cannot be captured: the reduce-overhead reference runs what torch can capture);
* ``fast``: InPlace-ABN-Sync and impl "fast" on CUDA (Triton FBF and OHEM, CUDA ABN); on the CPU impl
  "auto" (the C++ ABN; FBF and OHEM on their references: Triton needs CUDA there);
* ``floor``: the same network with every norm and activation an identity, plain concatenation for the
  FBFs and the mean of the logits for the loss: what the step costs with the memory-bound ops free.
  ``fast`` against ``floor`` says what InPlace-ABN, FBF and OHEM still cost at all.

On CUDA: IFBFNet-R101, batch 2, crop 876, bf16 (the recipe's crop and precision). On the CPU:
IFBFNet-R18, batch 2, crop 128, fp32, eager NCHW only (compiling a step takes minutes on a few cores).
``extra_info``: ``images_per_s`` at the median, ``peak_bytes`` (allocator peak of one step beyond model
and optimizer state; on the CPU the peak of live tensor storages), the configuration.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

from conftest import device_name, peak_bytes
from ifbf_fast.engine.step import fused_sgd
from ifbf_fast.nn import NormAct

GPU_CONFIG = {"backbone": "resnet101", "batch": 2, "crop": 876, "amp": os.environ.get("IFBF_BENCH_AMP", "bf16")}
CPU_CONFIG = {"backbone": "resnet18", "batch": 2, "crop": 128, "amp": "off"}
IMPLS = ("reference", "fast", "floor")
MODES = ("eager", "compiled", "cudagraphs")
LAYOUTS = ("channels_last", "nchw")
PROVIDERS = tuple(f"{impl}_{mode}" for mode in MODES for impl in IMPLS)
COMPILE_MODES = {"eager": None, "compiled": "default", "cudagraphs": "reduce-overhead"}
IGNORE_FRAC = 0.1


def config_for(device: torch.device) -> Dict[str, object]:
    return dict(GPU_CONFIG if device.type == "cuda" else CPU_CONFIG)


class _FloorNormAct(NormAct):
    """The cheapest stand-in for a norm + activation: nothing at all."""

    def __init__(self):
        pass

    def __call__(self, num_features: int, activation: Optional[str] = None) -> torch.nn.Module:
        return torch.nn.Identity()

    def act(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return x


def _floor_loss(outputs: Dict[str, torch.Tensor], labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    loss = outputs["out"].mean() + 0.4 * outputs["aux"].mean() if "aux" in outputs else outputs["out"].mean()
    return {"loss": loss}


def make_step(provider: str, device: torch.device, backbone: str, batch: int, crop: int, amp: str,
              layout: str = "nchw") -> Tuple[Callable[[], object], str]:
    """(step, impl): ``step()`` runs one training step of ``provider`` (``<impl>_<mode>``)."""
    from ifbf_fast import ops
    from ifbf_fast.engine.step import FlatBuffers, TrainStep
    from ifbf_fast.engine.trainer import amp_setup
    from ifbf_fast.models import build_model
    from ifbf_fast.nn import IFBFLoss, norm_act

    kind, mode = provider.rsplit("_", 1)
    impl = {"reference": "reference", "fast": "fast" if device.type == "cuda" else "auto", "floor": "reference"}[kind]
    torch.manual_seed(0)
    na = _FloorNormAct() if kind == "floor" else norm_act("bn_leaky_relu" if kind == "reference" else "inplace_abn_sync")
    model = build_model({"backbone": backbone, "num_classes": 19, "norm_act": na, "fbf": kind != "floor",
                         "upsample_logits": False}).to(device)
    channels_last = layout == "channels_last"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    buffers = FlatBuffers(model)
    optimizer = fused_sgd(list(model.parameters()), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    autocast, amp_mode = amp_setup(amp, device)
    loss_fn = _floor_loss if kind == "floor" else IFBFLoss()
    step_fn = TrainStep(model, model, loss_fn, optimizer, None, device, autocast, fp16=amp_mode == "fp16",
                        channels_last=channels_last, buffers=buffers)
    if COMPILE_MODES[mode] is not None:
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        step_fn.compile(COMPILE_MODES[mode])
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 19, (batch, crop, crop), generator=gen, dtype=torch.uint8)
    label[torch.rand(label.shape, generator=gen) < IGNORE_FRAC] = 255
    batch_ = {"image": torch.randn(batch, 3, crop, crop, generator=gen).to(device), "label": label.to(device)}

    def step():
        with ops.use_impl(impl):
            out = step_fn(batch_)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return step, impl


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, perf, device, provider, layout):
    cfg = config_for(device)
    mode = provider.rsplit("_", 1)[1]
    if device.type != "cuda" and (mode != "eager" or layout != "nchw"):
        pytest.skip("on the CPU only the eager NCHW steps run (compiling a training step takes minutes on a "
                    "few cores; CUDA graphs need CUDA)")
    benchmark.group = "train_step {backbone} b{batch} crop{crop} {amp} {dev} {layout}".format(
        dev=device.type, layout=layout, **cfg)
    step, impl = make_step(provider, device, layout=layout, **cfg)
    warmup = 3 if device.type == "cuda" else 1
    for _ in range(warmup):
        if float(step()["skipped"]):
            pytest.fail(f"{provider}: a warm-up step's loss or gradients were not finite")
    peak = peak_bytes(step, device)
    rounds = 10 if device.type == "cuda" else 3
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    perf.record(benchmark, peak_bytes=peak, provider=provider, impl=impl, layout=layout, mode=mode,
                images_per_s=cfg["batch"] / benchmark.stats.stats.median, device_name=device_name(device), **cfg)
