"""Data-loading throughput (pytest-benchmark): the reference torch/OpenCV loader vs the DALI loader
reading PNGs and reading prepared .npy arrays.

    python -m pytest bench/bench_data.py --benchmark-columns=median,iqr,rounds

Training batches as in docs/DESIGN.md section 3: 2048x1024 inputs (synthetic full-size city, 8 train
images, generated once into a temporary folder, ~15 s), random scale {0.5..2.0}, crop 876, flip,
batch 4. One round is one epoch (2 batches). Every provider gets the same CPU parallelism
(``THREADS``: DataLoader worker processes for the reference, DALI CPU threads for DALI; env
``IFBF_BENCH_THREADS``, default: the CPU count, at most 8) and delivers its batches on the device
used: on a CUDA machine the DALI graph runs with GPU operators and the reference's batches are
copied to the GPU (pinned memory) so both end with the same tensors on the same device. The
providers share one group so that they print side by side; ``extra_info`` holds images/s at the
median time, the device, the threads and the input form.
"""

from __future__ import annotations

import os

import pytest
import torch

from ifbf_fast.data import build_loader, generate_city

pytest.importorskip("nvidia.dali")

from ifbf_fast.data.dali import build_dali_loader  # noqa: E402
from ifbf_fast.data.prepare import prepare  # noqa: E402

N_IMAGES, HEIGHT, WIDTH, CROP, BATCH = 8, 1024, 2048, 876, 4
THREADS = int(os.environ.get("IFBF_BENCH_THREADS", min(8, os.cpu_count() or 1)))
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
PROVIDERS = ("reference", "dali_png", "dali_npy")


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench_data")
    png = generate_city(str(base / "png"), n_train=N_IMAGES, n_val=1, height=HEIGHT, width=WIDTH,
                        seed=0)
    npy = str(base / "npy")
    assert prepare(png, npy, splits=("train",)) == []
    return {"png": png, "npy": npy}


def make_loader(provider: str, roots: dict):
    kw = dict(batch_size=BATCH, crop_size=CROP, train=True, workers=THREADS, seed=0)
    if provider == "reference":
        return build_loader(roots["png"], "train", pin_memory=DEVICE.type == "cuda",
                            persistent_workers=True, **kw)
    form = provider.split("_")[1]
    return build_dali_loader(roots[form], "train", device=DEVICE, form=form, **kw)


def run_epoch(loader, epoch: list) -> int:
    """One epoch with the batches moved to DEVICE (a no-op for DALI); returns images seen."""
    loader.set_epoch(epoch[0])
    epoch[0] += 1
    seen = 0
    for batch in loader:
        image = batch["image"].to(DEVICE, non_blocking=True)
        label = batch["label"].to(DEVICE, non_blocking=True)
        seen += min(image.shape[0], label.shape[0])
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return seen


@pytest.mark.parametrize("provider", PROVIDERS)
def test_data_throughput(benchmark, data_roots, provider):
    loader = make_loader(provider, data_roots)
    epoch = [0]
    benchmark.group = f"data train crop{CROP} {WIDTH}x{HEIGHT} {DEVICE.type} threads{THREADS}"
    seen = benchmark.pedantic(run_epoch, args=(loader, epoch), rounds=3, iterations=1,
                              warmup_rounds=1)
    assert seen == N_IMAGES
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "images_per_s": N_IMAGES / median, "provider": provider, "device": str(DEVICE),
        "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
        "threads": THREADS, "batch": BATCH, "crop": CROP, "input": f"{WIDTH}x{HEIGHT}"})
