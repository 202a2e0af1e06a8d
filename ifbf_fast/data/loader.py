"""Reference torch/OpenCV data loader (the DALI pipeline's ground truth).

``build_loader`` returns a ``torch.utils.data.DataLoader`` whose batches are

    {"image": float32 (N, 3, H, W), "label": uint8 (N, H, W), "name": list[str] (file stems)}

Labels are train ids with 255 = ignore, in the dataset's ``ClassTable.label_dtype``
(``classes.label_dtype``: the narrowest of uint8 / int16 / int32 holding every train id and 255, which
is uint8 for Cityscapes and every ``classes.yaml``). The losses, metrics and the OHEM kernels take them
as they are: 1 byte per pixel through the host-to-device copy and the loss, not int64's 8.

Training (``train=True``): every rank builds the same permutation of the split from
``(seed, epoch)`` (call ``loader.set_epoch(epoch)``, or ``loader.sampler.set_epoch``, before each
epoch, as with ``DistributedSampler``), drops the tail so that it divides by ``world_size`` and
takes every ``world_size``-th index from ``rank``; the DataLoader then drops the last incomplete
batch. So all ranks run the same number of steps, shards are disjoint, and no batch is empty or
short. Each sample's augmentation parameters come from its own generator
``np.random.default_rng([seed, epoch, index])`` (``sample_generator``), so they depend neither on
the number of workers nor on the number of ranks: the DALI pipeline can reproduce them exactly.
``loader.sampler.skip_batches(n, batch_size)`` after ``set_epoch`` resumes mid-epoch exactly.

Evaluation (``train=False``): no shuffling, rank ``r`` gets indices ``r, r + world_size, ...`` with
no padding and no drop, so every image is seen exactly once across ranks (ranks may then run one
step more or less than each other: all-reduce the confusion matrix after the loop, not per step).
The default batch size is 1 because full-size images may differ in size.

Workers: ``worker_init_fn`` seeds ``torch``, ``numpy`` and ``random`` in each worker from
``(seed, epoch, rank, worker_id)`` (for any user code that draws from the global generators) and
limits OpenCV to one thread per worker (the machines are shared; parallelism comes from workers).
``build_loader`` with workers also sets the parent's OpenCV to one thread first: a worker forked
while the parent's OpenCV thread pool exists deadlocks in its first OpenCV call.
"""

from __future__ import annotations

import random

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .cityscapes import CityscapesDataset
from .folder import open_dataset
from .transforms import (DEFAULT_CROP, DEFAULT_SCALES, IMAGENET_MEAN, IMAGENET_STD, AugParams,
                         TrainTransform, eval_transform, sample_params)


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator that draws the ``AugParams`` of dataset ``index`` in ``epoch``."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def params_for(seed: int, epoch: int, index: int, image_hw, scales=DEFAULT_SCALES,
               crop_size=DEFAULT_CROP, flip_prob: float = 0.5) -> AugParams:
    """The ``AugParams`` the reference loader uses for dataset ``index`` in ``epoch``: what a DALI
    pipeline feeds (e.g. through ``fn.external_source``) to reproduce it exactly. ``image_hw`` can
    come from the PNG header (``cityscapes.png_size``) without decoding."""
    return sample_params(sample_generator(seed, epoch, index), image_hw, scales, crop_size,
                         flip_prob)


class ShardedSampler(Sampler):
    """DistributedSampler-like sampler yielding ``(index, epoch)`` keys.

    The epoch travels with every key, so that the dataset (copied into worker processes, possibly
    persistent ones) never holds a stale epoch.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.skip = 0  # leading indices of this epoch not yielded (mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; also clears any ``skip_batches``."""
        self.epoch = int(epoch)
        self.skip = 0

    def skip_batches(self, num_batches: int, batch_size: int) -> None:
        """Resume mid-epoch: this epoch (until the next ``set_epoch``) starts after the first
        ``num_batches`` batches of ``batch_size``. Call it after ``set_epoch``. Since every
        sample's augmentation is keyed by ``(seed, epoch, index)``, the remaining batches are
        exactly those an uninterrupted run would have seen, without loading the skipped ones."""
        skip = int(num_batches) * int(batch_size)
        full = self.size // self.world_size if self.drop_last else len(self._order())
        if not 0 <= skip <= full:
            raise ValueError(f"cannot skip {num_batches} batches of {batch_size}: this rank has "
                             f"{full} samples per epoch")
        self.skip = skip

    def indices(self) -> list[int]:
        """This rank's dataset indices for the current epoch, in order (after any skip)."""
        return self._order()[self.skip:]

    def _order(self) -> list[int]:
        if self.shuffle:
            # identical on every rank; keyed by (seed, epoch) rather than DistributedSampler's
            # seed + epoch, so that seed 1 epoch 0 does not replay seed 0 epoch 1
            order = np.random.default_rng([int(self.seed), int(self.epoch)]).permutation(self.size)
            order = order.tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:
            order = order[: self.size - self.size % self.world_size]
        return order[self.rank::self.world_size]

    def __iter__(self):
        epoch = self.epoch
        return iter([(i, epoch) for i in self.indices()])

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // self.world_size - self.skip
        return len(range(self.rank, self.size, self.world_size)) - self.skip


class SegmentationSet(Dataset):
    """Wraps ``CityscapesDataset`` or ``FolderDataset`` (``base.classes``: its class table): training
    applies ``TrainTransform`` with the per-sample generator, evaluation ``eval_transform``. Items
    are dicts of torch tensors plus the name; a key is ``(index, epoch)`` or a bare index (epoch 0).
    Labels come in ``base.classes.label_dtype`` (the transform must have been built with it)."""

    def __init__(self, base: CityscapesDataset, transform: TrainTransform | None, seed: int = 0,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.base, self.transform, self.seed = base, transform, seed
        self.mean, self.std = mean, std
        self.label_dtype = base.classes.label_dtype
        if transform is not None and transform.label_dtype != self.label_dtype:
            raise ValueError(f"SegmentationSet: the transform gives {transform.label_dtype} labels, the class "
                             f"table {self.label_dtype} (build it with label_dtype=base.classes.label_dtype)")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, label, name = self.base.load(index)
        if self.transform is not None:
            image, label = self.transform(image, label, sample_generator(self.seed, epoch, index))
        else:
            image, label = eval_transform(image, label, self.mean, self.std, self.label_dtype)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "name": name}


def collate(items: list[dict]) -> dict:
    """Stack into the batch contract; a clear error when full-size images differ in size."""
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        names = ", ".join(it["name"] for it in items)
        raise ValueError(f"cannot batch images of different sizes {sorted(shapes)} ({names}); "
                         f"use batch_size=1 for full-size evaluation")
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.stack([it["label"] for it in items]),
            "name": [it["name"] for it in items]}


class WorkerInit:
    """``worker_init_fn``: seeds from ``(seed, epoch, rank, worker_id)``; the epoch is read from
    the sampler when the workers start (every epoch unless ``persistent_workers``)."""

    def __init__(self, seed: int, rank: int, sampler: ShardedSampler):
        self.seed, self.rank, self.sampler = seed, rank, sampler

    def worker_seed(self, worker_id: int) -> int:
        key = [int(self.seed), int(self.sampler.epoch), int(self.rank), int(worker_id)]
        return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint32)[0])

    def __call__(self, worker_id: int) -> None:
        s = self.worker_seed(worker_id)
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)
        cv2.setNumThreads(1)


class SegmentationLoader(DataLoader):
    """A DataLoader with ``set_epoch`` forwarded to its ``ShardedSampler``."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def build_loader(root, split: str, batch_size: int | None = None, crop_size=DEFAULT_CROP,
                 scales=DEFAULT_SCALES, train: bool | None = None, workers: int = 2,
                 seed: int = 0, rank: int = 0, world_size: int = 1, *, flip_prob: float = 0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, pin_memory: bool = False,
                 persistent_workers: bool = False, prefetch_factor: int | None = None
                 ) -> SegmentationLoader:
    """The reference loader over ``split`` of ``root``, a Cityscapes or a folder layout
    (``ifbf_fast.data.folder``; see the module docstring).

    ``train`` defaults to ``split == "train"``; ``batch_size`` (per rank) to 4 in training and 1 in
    evaluation (docs/DESIGN.md section 3). ``crop_size``, ``scales`` and ``flip_prob`` only matter in
    training. Raises ``DatasetLayoutError`` for a bad layout and ``ValueError`` when a training
    rank would get no full batch.
    """
    if train is None:
        train = split == "train"
    if batch_size is None:
        batch_size = 4 if train else 1
    base = open_dataset(root, split)
    transform = (TrainTransform(scales, crop_size, flip_prob, mean, std, label_dtype=base.classes.label_dtype)
                 if train else None)
    dataset = SegmentationSet(base, transform, seed, mean, std)
    sampler = ShardedSampler(len(base), rank, world_size, shuffle=train, seed=seed,
                             drop_last=train)
    if train and len(sampler) < batch_size:
        raise ValueError(
            f"split {split!r} has {len(base)} images: {len(sampler)} per rank for {world_size} "
            f"rank(s), fewer than one batch of {batch_size}; lower batch_size or world_size")
    extra = {}
    if workers > 0:
        # OpenCV's thread pool does not survive fork: a worker forked while the parent's pool exists
        # (started by any earlier cv2 call, e.g. the synthetic city or the preflight check) hangs in
        # its first cv2 call. One thread in the parent tears the pool down before the workers fork.
        cv2.setNumThreads(1)
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return SegmentationLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate, pin_memory=pin_memory, drop_last=train,
        worker_init_fn=WorkerInit(seed, rank, sampler),
        generator=torch.Generator().manual_seed(seed), **extra)
