"""DALI loader for Cityscapes and the folder layout (``ifbf_fast.data.folder``): the reference loader's
batches, with the pixel work in DALI.

``build_dali_loader`` takes ``build_loader``'s arguments (plus ``device`` and ``dtype``) and returns
a ``DaliLoader`` with the same batch contract and the same sampler:

    {"image": (N, 3, H, W) float32 (or ``dtype``), "label": uint8 (N, H, W), "name": list[str]}

The label dtype is the reference's, by the same rule (``ClassTable.label_dtype``: uint8 for every
class table): the lookup writes it, and the batch is DALI's output as it is, with no widening copy.

**Pairing and randomness by construction.** Python picks the samples with the reference's
``ShardedSampler`` (``loader.sampler``: same sharding, per-epoch permutation, drop of the tail,
``skip_batches``) and draws each sample's ``AugParams`` with the reference's ``params_for(seed,
epoch, index, (H, W))`` (the size comes from the PNG header, no decode). One ``fn.external_source``
per input receives, per sample, the encoded image bytes, the encoded label bytes of the *same* pair
and the parameters; the DALI graph never draws a random number. So image and label cannot drift
apart, and given the same seed DALI and ``build_loader`` see the same samples with the same
parameters in the same order.

**Graph** (training; ``transforms`` module docstring for the conventions), per sample:

    decode image (RGB) and label (as stored)      fn.decoders.image
    labelIds -> trainIds                          fn.lookup_table (LABEL_TO_TRAIN; folder layout: classes.lut)
    resize to int(H*s+0.5) x int(W*s+0.5)         fn.resize: image linear, no antialias, float out;
                                                  label nearest (floor((j+0.5)*H/h), see below)
    crop the valid window                         fn.slice (start: offsets, shape: min(crop, size))
    flip; normalise; to CHW (image)               fn.crop_mirror_normalize (mirror = flip)
    flip (label)                                  fn.flip
    pad bottom/right to the crop                  fn.pad: image 0 (after normalisation), label 255

Evaluation: decode, lookup, ``crop_mirror_normalize`` (normalise + CHW) only, no resizing.

**Where it runs.** ``device=None`` / CPU: every operator is a CPU operator (``device_id=None``) on
``threads`` DALI threads. ``device=cuda:k``: the image decoder is ``"mixed"`` (it decodes PNG on
CPU threads and copies the pixels to the GPU; JPEG would be decoded on the GPU), the label is
decoded on CPU threads and copied to the GPU, and the
lookup, resize, slice, flip, normalisation and padding run with ``device="gpu"``; the batches are
CUDA tensors on that device. Python reads the file bytes and computes the parameters. The prepared
form (``python -m ifbf_fast.data.prepare``: raw uint8 ``.npy``) skips the decoder: the arrays go in
through ``external_source`` (copied to the GPU first on a GPU).

**Conventions vs the reference** (measured by ``tests/data/test_dali.py``). The label is *exactly*
the documented rule ``src = floor((j + 0.5) * H / h)`` (= ``F.interpolate(mode="nearest-exact")``).
DALI's nearest resize follows it except at ties (``(j + 0.5) * H / h`` an integer), where its
float32 arithmetic falls on either side; a sub-pixel shift of the label's sampling grid
(``tie_shift``, passed as the label resize's ROI) resolves every tie the documented way and moves
no other pixel. The reference (``transforms.nearest_resize``) computes the rule in integers, so
DALI and reference labels are identical, ties included (with Cityscapes sizes ties occur at scales
0.75, 1.25, 1.5 and 1.75). The image: DALI's linear resize uses the same half-pixel centres and clamped edges as
``cv2.INTER_LINEAR``; they differ by float rounding only (< 2e-3 on the 0..255 scale measured,
< 1e-4 after normalisation). The image is resized in full before the crop, like the reference: a
ROI resize of the crop window alone would be cheaper, but float32 ROI offsets near 2048 px move
the samples by ~1e-4 px (image errors ~0.04 on 0..255, label ties).

A file that fails to decode stops the pipeline (DALI cannot skip it): run the preflight
``python -m ifbf_fast.data.check`` first (``train.py`` does). Missing partners, truncated PNGs and
image/label size mismatches are caught in Python before DALI sees the sample (``DataReadError``).
"""

from __future__ import annotations

import functools
import math
from collections import deque

import numpy as np
import torch

from .cityscapes import DataReadError, _read_bytes, find_pairs
from .folder import class_table_of, find_samples, is_folder_layout
from .labels import IGNORE_INDEX, LABEL_TO_TRAIN
from .loader import ShardedSampler, params_for
from .prepare import detect_form, find_prepared_pairs, load_array
from .transforms import (DEFAULT_CROP, DEFAULT_SCALES, IMAGENET_MEAN, IMAGENET_STD, AugParams,
                         _norm_constants, crop_hw, scaled_size)

_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16,
                 np.dtype(np.int32): torch.int32}

_TRAIN_INPUTS = ("image", "label", "size", "start", "shape", "flip", "label_roi_start",
                 "label_roi_end")


def dali_available() -> bool:
    """Whether DALI imports here (for ``--loader auto``)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _device_id(device) -> int | None:
    """``None`` / ``"cpu"`` -> None (CPU operators); ``"cuda"``, ``"cuda:k"``, ``k`` -> GPU id."""
    if device is None:
        return None
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"DALI runs on the CPU or a CUDA device, not {device}")
    return torch.cuda.current_device() if device.index is None else device.index


def build_pipeline(train: bool, batch_size: int, crop_size=DEFAULT_CROP, form: str = "png",
                   threads: int = 2, device_id: int | None = None, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, out_dtype=torch.float32, seed: int = 0, image_layout: str = "CHW",
                   lut=None, label_dtype=np.uint8):
    """The DALI graph (module docstring), fed by name: ``image``, ``label`` (encoded bytes for
    ``form="png"``, uint8 HWC arrays for ``"npy"``; labels as labelIds) and in training ``size``
    (float32 [h, w]), ``start`` ([crop_y, crop_x]), ``shape`` ([vh, vw]), ``flip`` (int32).
    ``image_layout="HWC"`` leaves the normalised image channels-innermost: the torch batch is then a
    channels_last view of it, with no transposition in DALI and no layout copy in torch. ``lut``: the
    mask value -> train id table (the dataset's ``classes.lut``; default Cityscapes' ``LABEL_TO_TRAIN``).
    ``label_dtype``: the labels' dtype out of the lookup (the dataset's ``classes.label_dtype``)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    op_dev = "gpu" if gpu else "cpu"
    ch, cw = crop_hw(crop_size)
    mean255, std255 = _norm_constants(mean, std)
    dali_dtype = types.FLOAT16 if out_dtype == torch.float16 else types.FLOAT
    lut_values = LABEL_TO_TRAIN if lut is None else lut
    dali_label_dtype = {np.dtype(np.uint8): types.UINT8, np.dtype(np.int16): types.INT16,
                        np.dtype(np.int32): types.INT32}[np.dtype(label_dtype)]

    # prefetch_queue_depth=1: DaliLoader keeps its own runs in flight (the dynamic executor lets
    # several scheduled runs overlap), so DALI's first-run prefetch must not ask for extra batches.
    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=1)
    def pipe():
        layout = "HWC" if form == "npy" else None  # encoded bytes have no layout
        image = fn.external_source(name="image", layout=layout)
        label = fn.external_source(name="label", layout=layout)
        if form == "png":
            image = fn.decoders.image(image, device="mixed" if gpu else "cpu",
                                      output_type=types.RGB)
            # ANY_DATA keeps the stored 8-bit values (GRAY could convert a palette/RGB file). The
            # label is decoded by the CPU decoder even on a GPU: PNG decoding runs on CPU threads
            # with either backend, and this keeps ANY_DATA on the path the CPU tests cover.
            label = fn.decoders.image(label, device="cpu", output_type=types.ANY_DATA)
            if gpu:
                label = label.gpu()
        else:
            if gpu:
                image, label = image.gpu(), label.gpu()
        label = fn.lookup_table(label, keys=list(range(256)), values=np.asarray(lut_values).tolist(),
                                default_value=IGNORE_INDEX, dtype=dali_label_dtype, device=op_dev)
        if not train:
            image = fn.crop_mirror_normalize(image, mean=mean255.tolist(), std=std255.tolist(),
                                             output_layout=image_layout, dtype=dali_dtype, device=op_dev)
            return image, label
        size = fn.external_source(name="size")
        start = fn.external_source(name="start")
        shape = fn.external_source(name="shape")
        flip = fn.external_source(name="flip")
        label_roi_start = fn.external_source(name="label_roi_start")
        label_roi_end = fn.external_source(name="label_roi_end")
        image = fn.resize(image, size=size, interp_type=types.INTERP_LINEAR, antialias=False,
                          dtype=types.FLOAT, device=op_dev)
        label = fn.resize(label, size=size, roi_start=label_roi_start, roi_end=label_roi_end,
                          roi_relative=False, interp_type=types.INTERP_NN, antialias=False,
                          device=op_dev)
        image = fn.slice(image, start=start, shape=shape, axis_names="HW", device=op_dev)
        label = fn.slice(label, start=start, shape=shape, axis_names="HW", device=op_dev)
        image = fn.crop_mirror_normalize(image, mirror=flip, mean=mean255.tolist(),
                                         std=std255.tolist(), output_layout=image_layout,
                                         dtype=dali_dtype, device=op_dev)
        label = fn.flip(label, horizontal=flip, device=op_dev)
        image = fn.pad(image, axis_names="HW", shape=[ch, cw], fill_value=0.0, device=op_dev)
        label = fn.pad(label, axis_names="HW", shape=[ch, cw], fill_value=IGNORE_INDEX,
                       device=op_dev)
        return image, label

    p = pipe()
    p.build()
    return p


def _png_hw(data: np.ndarray, path: str) -> tuple[int, int]:
    if data.size < 26 or data[12:16].tobytes() != b"IHDR":
        raise DataReadError(f"cannot read the size of {path!r}: not a PNG file")
    head = data[16:24].tobytes()
    return int.from_bytes(head[4:8], "big"), int.from_bytes(head[0:4], "big")


def _jpeg_hw(data: np.ndarray, path: str) -> tuple[int, int]:
    """(H, W) from a JPEG's first start-of-frame marker (SOF0..SOF15 except DHT, JPG, DAC)."""
    raw, i = data.tobytes(), 2
    while i + 9 <= len(raw):
        if raw[i] != 0xFF:
            break
        marker = raw[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:     # no length field
            i += 2
            continue
        length = int.from_bytes(raw[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(raw[i + 5:i + 7], "big"), int.from_bytes(raw[i + 7:i + 9], "big")
        i += 2 + length
    raise DataReadError(f"cannot read the size of {path!r}: no JPEG frame header")


def _image_hw(data: np.ndarray, path: str) -> tuple[int, int]:
    """(H, W) of an encoded PNG or JPEG (the folder layout takes both), from its header."""
    if data[:2].tobytes() == b"\xff\xd8":
        return _jpeg_hw(data, path)
    return _png_hw(data, path)


_PNG_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale + alpha", 6: "RGBA"}


def _check_label_png(data: np.ndarray, path: str) -> None:
    """A labelIds PNG must be 8-bit grayscale (IHDR bit depth 8, colour type 0), as the reference
    reader requires of the decoded array. Checked on the header in Python: DALI would decode a colour
    label to 3 channels, which fails in training on an ``IsDenseTensor`` assert naming no file and in
    evaluation maps the first channel to mostly ignore, silently."""
    depth, color = int(data[24]), int(data[25])
    if depth != 8 or color != 0:
        raise DataReadError(f"label {path!r} must be a single-channel 8-bit labelIds PNG, got {depth}-bit "
                            f"{_PNG_COLOR_TYPES.get(color, f'colour type {color}')}")


@functools.lru_cache(maxsize=256)
def tie_shift(n_in: int, n_out: int) -> float:
    """Shift (in input pixels) that makes DALI's float32 nearest resize exact.

    Output ``j`` must take input ``floor((j + 0.5) * n_in / n_out)``. Where that product is an
    integer (a tie: e.g. every third row at scale 0.75), DALI's float arithmetic lands on either
    side of it (we measured both, depending on the axis). Shifting the sampling grid by ``d``
    resolves every tie upwards, as the rule says, and changes no other pixel as long as ``d`` is
    below the smallest gap between a non-tie product and the next integer: half that gap (for the
    Cityscapes scales the products are multiples of 1/2, 1/3, 1/5 or 1/7, so ``d`` >= 1/14, far
    above float32 rounding at 2048 px, ~1e-4).
    """
    rem = ((2 * np.arange(n_out, dtype=np.int64) + 1) * n_in) % (2 * n_out)
    rem = rem[rem > 0]
    gap = (2 * n_out - int(rem.max())) / (2 * n_out) if rem.size else 1.0
    return min(0.25, gap / 2)


def train_inputs(params: AugParams, image_hw, crop_size) -> dict:
    """The per-sample DALI inputs that encode ``params`` for an ``image_hw`` = (H, W) input."""
    ch, cw = crop_hw(crop_size)
    height, width = int(image_hw[0]), int(image_hw[1])
    h, w = scaled_size(height, width, params.scale)
    dy, dx = tie_shift(height, h), tie_shift(width, w)
    return {"size": np.array([h, w], np.float32),
            "label_roi_start": np.array([dy, dx], np.float32),
            "label_roi_end": np.array([height + dy, width + dx], np.float32),
            "start": np.array([params.crop_y, params.crop_x], np.int32),
            "shape": np.array([min(ch, h), min(cw, w)], np.int32),
            "flip": np.array(int(params.flip), np.int32)}


class DaliLoader:
    """Iterates like the reference ``SegmentationLoader``: ``set_epoch(e)`` (or
    ``sampler.set_epoch``), ``sampler.skip_batches(n, batch_size)``, ``len()``, ``iter()``.

    Up to ``prefetch`` batches are scheduled ahead; DALI works on them in its own threads while the
    caller consumes the current one. Breaking out of an epoch is safe: the runs still in flight are
    drained (their outputs dropped) when the next iteration starts.
    """

    def __init__(self, root, split: str, batch_size: int, crop_size, scales, train: bool,
                 threads: int, seed: int, rank: int, world_size: int, flip_prob: float, mean,
                 std, device=None, dtype=torch.float32, prefetch: int = 2, form: str | None = None,
                 channels_last: bool = False):
        self.root, self.split = root, split
        self.channels_last = bool(channels_last)
        self.classes = class_table_of(root)         # its lut maps the mask values to train ids
        self.label_dtype = self.classes.label_dtype  # the reference loader's rule (uint8 for every table)
        folder = is_folder_layout(root)
        # the folder layout has encoded files only (PNG or JPEG images: "png" means "encoded" here)
        self.form = "png" if folder and form is None else (form or detect_form(root, split))
        if self.form not in ("png", "npy"):
            raise ValueError(f"form must be 'png' or 'npy', got {self.form!r}")
        if folder and self.form != "png":
            raise ValueError("the folder layout has no prepared (.npy) form")
        self.samples = (find_samples(root, split) if folder else find_pairs(root, split) if self.form == "png"
                        else find_prepared_pairs(root, split))
        self.batch_size, self.train, self.seed = int(batch_size), bool(train), int(seed)
        self.crop_size = crop_hw(crop_size)
        self.scales, self.flip_prob = tuple(float(s) for s in scales), flip_prob
        self.dtype, self.prefetch = dtype, max(1, int(prefetch))
        self.device_id = _device_id(device)
        self.device = (torch.device("cpu") if self.device_id is None
                       else torch.device("cuda", self.device_id))
        self.sampler = ShardedSampler(len(self.samples), rank, world_size, shuffle=self.train,
                                      seed=self.seed, drop_last=self.train)
        if self.train and len(self.sampler) < self.batch_size:
            raise ValueError(
                f"split {split!r} has {len(self.samples)} images: {len(self.sampler)} per rank for "
                f"{world_size} rank(s), fewer than one batch of {self.batch_size}; lower "
                f"batch_size or world_size")
        self.pipe = build_pipeline(self.train, self.batch_size, self.crop_size, self.form,
                                   threads, self.device_id, mean, std, dtype, seed,
                                   "HWC" if self.channels_last else "CHW", self.classes.lut,
                                   self.label_dtype)
        self._in_flight = 0
        self._scheduled = deque()       # the dataset indices of each run in flight, oldest first

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.samples]

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _read(self, index: int):
        """(image input, label input, (H, W)) of dataset ``index``, checked in Python."""
        s = self.samples[index]
        if self.form == "png":
            image, label = _read_bytes(s.image_path), _read_bytes(s.label_path)
            hw, label_hw = _image_hw(image, s.image_path), _png_hw(label, s.label_path)
            _check_label_png(label, s.label_path)
        else:
            image, label = load_array(s.image_path, 3), load_array(s.label_path, 2)
            hw, label_hw = image.shape[:2], label.shape
            label = label[:, :, None]
        if tuple(hw) != tuple(label_hw):
            raise DataReadError(f"image {s.image_path!r} is {hw[1]}x{hw[0]} but its label "
                                f"{s.label_path!r} is {label_hw[1]}x{label_hw[0]}")
        return image, label, tuple(hw)

    def _schedule(self, indices: list[int], epoch: int) -> list[str]:
        feeds = {k: [] for k in (_TRAIN_INPUTS if self.train else ("image", "label"))}
        sizes = set()
        for index in indices:
            image, label, hw = self._read(index)
            feeds["image"].append(image)
            feeds["label"].append(label)
            sizes.add(hw)
            if self.train:
                params = params_for(self.seed, epoch, index, hw, self.scales, self.crop_size,
                                    self.flip_prob)
                for k, v in train_inputs(params, hw, self.crop_size).items():
                    feeds[k].append(v)
        if not self.train and len(sizes) > 1:
            names = ", ".join(self.samples[i].name for i in indices)
            raise ValueError(f"cannot batch images of different sizes {sorted(sizes)} ({names}); "
                             f"use batch_size=1 for full-size evaluation")
        for name, data in feeds.items():
            self.pipe.feed_input(name, data)
        self.pipe.schedule_run()
        self._in_flight += 1
        self._scheduled.append(list(indices))
        return [self.samples[i].name for i in indices]

    def _outputs(self):
        indices = self._scheduled.popleft()
        try:
            outs = self.pipe.outputs()
        except RuntimeError as exc:
            raise self._name_the_file(indices, exc) from exc
        self._in_flight -= 1
        return outs

    def _name_the_file(self, indices: list[int], exc: Exception) -> DataReadError:
        """DALI's errors name an operator, not a file ("nvImageCodec failure '#17'"): decode the batch's
        files with the reference reader to find the one at fault (the pipeline is dead either way)."""
        from .cityscapes import read_image, read_label_ids

        for i in indices:
            s = self.samples[i]
            try:
                if self.form == "png":
                    read_image(s.image_path)
                    read_label_ids(s.label_path)
                else:
                    load_array(s.image_path, 3)
                    load_array(s.label_path, 2)
            except DataReadError as bad:
                return DataReadError(f"{bad} (the DALI loader stopped on it; run python -m "
                                     f"ifbf_fast.data.check {self.root} to list every bad file)")
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "no longer valid" not in ln), type(exc).__name__)
        names = ", ".join(self.samples[i].name for i in indices)
        return DataReadError(f"the DALI loader failed on a batch of {self.root} split {self.split!r} "
                             f"({names}): {reason}")

    def _to_torch(self, outs, names: list[str]) -> dict:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        image_tl, label_tl = outs
        stream = torch.cuda.current_stream(self.device) if self.device_id is not None else None
        image_t, label_t = image_tl.as_tensor(), label_tl.as_tensor()
        image_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        image = torch.empty(image_t.shape(), dtype=image_dtype, device=self.device)
        label = torch.empty(label_t.shape(), dtype=_TORCH_DTYPES[self.label_dtype], device=self.device)
        feed_ndarray(image_t, image, stream)
        feed_ndarray(label_t, label, stream)
        if image.dtype != self.dtype:
            image = image.to(self.dtype)
        if self.channels_last:          # (N, H, W, 3) -> a channels_last (N, 3, H, W) view, no copy
            image = image.permute(0, 3, 1, 2)
        # (N, H, W, 1) -> (N, H, W): a view, still contiguous; the labels keep the lookup's dtype
        return {"image": image, "label": label[..., 0], "name": names}

    def __iter__(self):
        while self._in_flight:  # runs left over from an epoch the caller broke out of
            self._outputs()
        indices, epoch, bs = self.sampler.indices(), self.sampler.epoch, self.batch_size
        stop = len(indices) - len(indices) % bs if self.train else len(indices)
        batches = deque(indices[i:i + bs] for i in range(0, stop, bs))
        pending = deque()
        while batches and len(pending) < self.prefetch:
            pending.append(self._schedule(batches.popleft(), epoch))
        while pending:
            outs = self._outputs()
            names = pending.popleft()
            if batches:  # keep DALI busy while the caller uses this batch
                pending.append(self._schedule(batches.popleft(), epoch))
            yield self._to_torch(outs, names)


def build_dali_loader(root, split: str, batch_size: int | None = None, crop_size=DEFAULT_CROP,
                      scales=DEFAULT_SCALES, train: bool | None = None, workers: int = 2,
                      seed: int = 0, rank: int = 0, world_size: int = 1, *,
                      flip_prob: float = 0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      pin_memory: bool = False, persistent_workers: bool = False,
                      prefetch_factor: int | None = None, device=None, dtype=torch.float32,
                      prefetch: int = 2, form: str | None = None, channels_last: bool = False) -> DaliLoader:
    """``build_loader``'s signature; ``workers`` is the number of DALI CPU threads (at least 1).

    ``device``: None or CPU -> CPU operators, ``cuda:k`` -> GPU operators and CUDA batches.
    ``dtype``: the image dtype (float32 or float16 straight from DALI, others cast in torch).
    ``form``: ``"png"`` / ``"npy"`` (prepared arrays) / None to detect. ``prefetch``: batches
    scheduled ahead. ``channels_last``: images come as channels_last views (what train.py runs on
    CUDA). ``pin_memory``, ``persistent_workers`` and ``prefetch_factor`` of
    ``build_loader`` are accepted and ignored (DALI owns its buffers and threads).
    """
    del pin_memory, persistent_workers, prefetch_factor
    if train is None:
        train = split == "train"
    if batch_size is None:
        batch_size = 4 if train else 1
    return DaliLoader(root, split, batch_size, crop_size, scales, train, max(1, int(workers)),
                      seed, rank, world_size, flip_prob, mean, std, device, dtype, prefetch, form,
                      channels_last)


def dali_augment(images, labels, params, crop_size=DEFAULT_CROP, device=None, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, threads: int = 1, label_dtype=np.uint8):
    """Run the training graph once on in-memory uint8 RGB ``images`` and labelIds ``labels`` with
    explicit ``params`` (one ``AugParams`` each): the DALI counterpart of calling
    ``transforms.augment`` on ``LABEL_TO_TRAIN[label]`` per sample. Returns (image float32
    (N, 3, ch, cw), label ``label_dtype`` (N, ch, cw), as ``augment`` gives them) as numpy arrays; for
    tests and inspection."""
    device_id = _device_id(device)
    pipe = build_pipeline(True, len(images), crop_size, "npy", threads, device_id, mean, std,
                          label_dtype=label_dtype)
    feeds = {k: [] for k in _TRAIN_INPUTS}
    for image, label, p in zip(images, labels, params):
        feeds["image"].append(np.ascontiguousarray(image))
        feeds["label"].append(np.ascontiguousarray(label)[:, :, None])
        for k, v in train_inputs(p, label.shape, crop_size).items():
            feeds[k].append(v)
    for name, data in feeds.items():
        pipe.feed_input(name, data)
    image_tl, label_tl = pipe.run()
    if device_id is not None:
        image_tl, label_tl = image_tl.as_cpu(), label_tl.as_cpu()
    image = np.array(image_tl.as_tensor())
    label = np.array(label_tl.as_tensor())[..., 0]
    return image, label
