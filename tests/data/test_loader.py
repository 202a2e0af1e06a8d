"""Reference loader: the batch contract, sharding across ranks, determinism, eval coverage."""

import numpy as np
import pytest
import torch

from ifbf_fast.data import ShardedSampler, build_loader, read_label
from ifbf_fast.data.cityscapes import find_pairs
from ifbf_fast.data.loader import WorkerInit


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_train_batch_contract(city):
    loader = build_loader(city, "train", batch_size=2, crop_size=(48, 40), workers=0, seed=0)
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader) == 3
    for b in batches:
        assert set(b) == {"image", "label", "name"}
        assert b["image"].dtype == torch.float32 and b["image"].shape == (2, 3, 48, 40)
        assert b["label"].dtype == torch.uint8 and b["label"].shape == (2, 48, 40)
        assert isinstance(b["name"], list) and all(isinstance(n, str) for n in b["name"])
        values = set(torch.unique(b["label"]).tolist())
        assert values <= set(range(19)) | {255}


def test_eval_batch_contract(city):
    loader = build_loader(city, "val", workers=0)
    batches = list(loader)
    pairs = find_pairs(city, "val")
    assert len(batches) == len(pairs)
    for b, pair in zip(batches, pairs):
        assert b["image"].shape == (1, 3, 64, 128) and b["image"].dtype == torch.float32
        assert b["name"] == [pair.name]
        assert b["label"].dtype == torch.uint8
        assert np.array_equal(b["label"][0].numpy(), read_label(pair.label_path))


def test_train_sharding_two_ranks(city):
    loaders = [build_loader(city, "train", batch_size=1, crop_size=32, workers=0, seed=5,
                            rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        names = [[n for b in _epoch(ld, epoch) for n in b["name"]] for ld in loaders]
        assert len(names[0]) == len(names[1]) == 3  # 6 images / 2 ranks, equal steps
        assert not set(names[0]) & set(names[1])
        if epoch == 0:
            first = names
    assert first != names  # reshuffled by set_epoch


@pytest.mark.parametrize("world_size", [2, 4])
def test_train_steps_equal_and_never_empty(world_size):
    for n in range(world_size * 2, world_size * 2 + 7):
        seen, steps = [], set()
        for rank in range(world_size):
            s = ShardedSampler(n, rank, world_size, shuffle=True, seed=1)
            idx = [k[0] for k in s]
            assert len(idx) == len(s) == n // world_size
            steps.add(len(idx) // 2)  # batch 2, drop_last
            seen += idx
        assert len(steps) == 1 and steps.pop() >= 1
        assert len(set(seen)) == len(seen)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_eval_covers_every_image_once(world_size):
    for n in (1, 7, 9, 10):
        seen = []
        for rank in range(world_size):
            s = ShardedSampler(n, rank, world_size, shuffle=False, drop_last=False)
            seen += [k[0] for k in s]
            assert len(s) == len(list(s))
        assert sorted(seen) == list(range(n))


def test_eval_loader_sharded_covers_val(city):
    names = []
    for rank in range(2):
        names += [n for b in build_loader(city, "val", workers=0, rank=rank, world_size=2)
                  for n in b["name"]]
    assert sorted(names) == [p.name for p in find_pairs(city, "val")]


def test_determinism_independent_of_workers(city):
    def run(workers, seed):
        ld = build_loader(city, "train", batch_size=2, crop_size=32, workers=workers, seed=seed)
        return _epoch(ld, 1)

    a, b, c = run(0, 7), run(2, 7), run(0, 8)
    for x, y in zip(a, b):
        assert x["name"] == y["name"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert any(not torch.equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_worker_seeds_depend_on_seed_epoch_rank_worker():
    sampler = ShardedSampler(10)
    seeds = set()
    for seed in (0, 1):
        for rank in (0, 1):
            init = WorkerInit(seed, rank, sampler)
            for epoch in (0, 1):
                sampler.set_epoch(epoch)
                for worker in (0, 1):
                    seeds.add(init.worker_seed(worker))
                    assert init.worker_seed(worker) == WorkerInit(seed, rank, sampler).worker_seed(worker)
    assert len(seeds) == 16


def test_too_few_images_for_a_batch(city):
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_loader(city, "train", batch_size=4, crop_size=32, workers=0, world_size=2)


def test_eval_batch_of_mixed_sizes_is_a_clear_error():
    from ifbf_fast.data import collate

    items = [{"image": torch.zeros(3, 4, 4), "label": torch.zeros(4, 4), "name": "a"},
             {"image": torch.zeros(3, 4, 5), "label": torch.zeros(4, 5), "name": "b"}]
    with pytest.raises(ValueError, match="batch_size=1"):
        collate(items)


def test_skip_batches_resumes_mid_epoch(city):
    loader = build_loader(city, "train", batch_size=2, crop_size=32, workers=0, seed=3)
    full = _epoch(loader, 2)
    loader.set_epoch(2)
    loader.sampler.skip_batches(1, 2)
    rest = list(loader)
    assert len(loader) == len(rest) == len(full) - 1
    for x, y in zip(full[1:], rest):
        assert x["name"] == y["name"] and torch.equal(x["image"], y["image"])
    loader.set_epoch(3)  # a new epoch is whole again
    assert len(list(loader)) == len(full)
    with pytest.raises(ValueError, match="cannot skip"):
        loader.sampler.skip_batches(4, 2)


def test_batches_are_augment_of_params_for(city):
    """The contract the DALI pipeline reproduces: sample ``index`` of ``epoch`` is
    ``augment(image, label, params_for(seed, epoch, index, (H, W), scales, crop))``."""
    from ifbf_fast.data import CityscapesDataset, augment, params_for, png_size

    scales, crop = (0.5, 1.0, 1.5), (40, 56)
    loader = build_loader(city, "train", batch_size=2, crop_size=crop, scales=scales,
                          workers=0, seed=11)
    ds = CityscapesDataset(city, "train")
    order = [i for i, _ in (loader.set_epoch(4) or loader.sampler)]
    batch = next(iter(loader))
    for j, index in enumerate(order[:2]):
        image, label, name = ds.load(index)
        assert png_size(ds.samples[index].image_path) == image.shape[:2] == (64, 128)
        p = params_for(11, 4, index, image.shape[:2], scales, crop)
        img, lab = augment(image, label, p, crop)
        assert batch["name"][j] == name
        assert np.array_equal(batch["image"][j].numpy(), img)
        assert batch["label"].dtype == torch.from_numpy(lab).dtype == torch.uint8
        assert np.array_equal(batch["label"][j].numpy(), lab)
