"""End-to-end training step (pytest-benchmark): images/s and peak memory of four set-ups, same batch and crop.

    python -m pytest bench/bench_train_step.py --benchmark-only --benchmark-columns=median,iqr,rounds

One step is ``ifbf_fast.engine.trainer.train_one_step`` (forward under autocast, IFBF loss = OHEM(out) +
0.4 OHEM(aux), backward, SGD momentum step, the finite-loss check), on a fixed random batch (labels
with ~10% ignored pixels), after warm-up steps (compilation, momentum buffers, allocator).

Providers (one benchmark group per configuration, printed side by side):

* ``reference``: BatchNorm2d + LeakyReLU (cuDNN/ATen) and impl "reference" (``fbf_ref``, the topk OHEM):
  the plain-PyTorch set-up one would train without this project;
* ``compiled_reference``: the same model under ``torch.compile`` (the loss stays eager: the reference
  OHEM reads the host and would break the graph anyway);
* ``fast``: InPlace-ABN-Sync and impl "fast" on CUDA (Triton FBF and OHEM, CUDA ABN). On the CPU,
  impl "auto": the C++ ABN kernels, with FBF and OHEM on their references (Triton needs CUDA);
* ``compiled_fast``: the fast model under ``torch.compile`` (the custom ops stay single graph nodes).

Configurations: on CUDA IFBFNet-R101, batch 2, crop 876, bf16 autocast (the training recipe's
crop and precision); on the CPU IFBFNet-R18, batch 2, crop 128, fp32, eager only (compiling a training
step takes minutes on a few CPU cores; the compiled cases skip there, saying so).
``extra_info``: ``images_per_s`` at the median, ``peak_bytes`` (CUDA allocator peak of one step beyond
the model and optimizer state; on the CPU the peak of live tensor storages), the configuration.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

import pytest
import torch

from conftest import device_name, peak_bytes

GPU_CONFIG = {"backbone": "resnet101", "batch": 2, "crop": 876, "amp": os.environ.get("IFBF_BENCH_AMP", "bf16")}
CPU_CONFIG = {"backbone": "resnet18", "batch": 2, "crop": 128, "amp": "off"}
PROVIDERS = ("reference", "compiled_reference", "fast", "compiled_fast")
# provider: (norm_act kind, impl on CUDA, impl on the CPU, compiled)
SETUPS: Dict[str, Tuple[str, str, str, bool]] = {
    "reference": ("bn_leaky_relu", "reference", "reference", False),
    "compiled_reference": ("bn_leaky_relu", "reference", "reference", True),
    "fast": ("inplace_abn_sync", "fast", "auto", False),
    "compiled_fast": ("inplace_abn_sync", "fast", "auto", True),
}
IGNORE_FRAC = 0.1


def config_for(device: torch.device) -> Dict[str, object]:
    return dict(GPU_CONFIG if device.type == "cuda" else CPU_CONFIG)


def make_step(provider: str, device: torch.device, backbone: str, batch: int, crop: int,
              amp: str) -> Tuple[Callable[[], object], str]:
    """(step, impl): ``step()`` runs one training step of ``provider`` under its implementation."""
    from ifbf_fast import ops
    from ifbf_fast.engine.trainer import amp_setup, train_one_step
    from ifbf_fast.models import build_model
    from ifbf_fast.nn import IFBFLoss, norm_act

    kind, cuda_impl, cpu_impl, compiled = SETUPS[provider]
    impl = cuda_impl if device.type == "cuda" else cpu_impl
    torch.manual_seed(0)
    # the fast set-ups build the model as train.py does: the loss upsamples the 1/4-resolution logits
    # (fused into the OHEM kernels); the reference set-ups upsample in the model, as one would without us
    model = build_model({"backbone": backbone, "num_classes": 19, "norm_act": norm_act(kind),
                         "upsample_logits": kind == "bn_leaky_relu"}).to(device)
    model.train()
    if compiled:
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        model = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    autocast, scaler, _ = amp_setup(amp, device)
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 19, (batch, crop, crop), generator=gen)
    label[torch.rand(label.shape, generator=gen) < IGNORE_FRAC] = 255
    batch_ = {"image": torch.randn(batch, 3, crop, crop, generator=gen).to(device), "label": label.to(device)}
    loss_fn = IFBFLoss()

    def step():
        with ops.use_impl(impl):
            out = train_one_step(model, loss_fn, batch_, optimizer, scaler, autocast, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return step, impl


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, perf, device, provider):
    cfg = config_for(device)
    if SETUPS[provider][3] and device.type != "cuda":
        pytest.skip("torch.compile of a training step takes minutes on a few CPU cores; compiled cases run on CUDA")
    benchmark.group = "train_step {backbone} b{batch} crop{crop} {amp} {dev}".format(dev=device.type, **cfg)
    step, impl = make_step(provider, device, **cfg)
    warmup = 3 if device.type == "cuda" else 1
    for _ in range(warmup):
        if step() is None:
            pytest.fail(f"{provider}: the warm-up step's loss was not finite")
    peak = peak_bytes(step, device)
    rounds = 10 if device.type == "cuda" else 3
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    perf.record(benchmark, peak_bytes=peak, provider=provider, impl=impl, norm_act=SETUPS[provider][0],
                images_per_s=cfg["batch"] / benchmark.stats.stats.median, device_name=device_name(device), **cfg)
