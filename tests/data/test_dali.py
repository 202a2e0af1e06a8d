"""DALI loader (CPU operators, ``device_id=None``) against the reference loader and the spec.

Tolerances: the label is compared EXACTLY with the documented nearest rule
``src = floor((j + 0.5) * H / h)`` (``transforms`` docstring). The image is compared within
``IMAGE_ATOL = 1e-4`` after normalisation, i.e. ~0.006 on the 0..255 scale: DALI's linear resize and
``cv2.INTER_LINEAR`` on float32 use the same half-pixel geometry and differ only by float rounding
(measured < 2e-3 on 0..255 = 3.5e-5 normalised), and DALI normalises as ``(x - m) * (1 / s)``.

Ties (``(j + 0.5) * H / h`` an integer, e.g. every third row at scale 0.75) are where nearest
implementations disagree (OpenCV's ``INTER_NEAREST_EXACT`` and DALI's own nearest resize round many
downwards); the reference computes the rule in integers and the DALI graph shifts its label grid by
a fraction of a pixel, so both equal the rule exactly, ties included.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from ifbf_fast.data import (LABEL_TO_TRAIN, PALETTE, AugParams, CityscapesDataset,  # noqa: E402
                            augment, build_loader, generate_city, params_for, scaled_size)
from ifbf_fast.data.dali import build_dali_loader, dali_augment  # noqa: E402
from ifbf_fast.data.labels import TRAIN_TO_LABEL  # noqa: E402
from ifbf_fast.data.transforms import DEFAULT_SCALES, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

from .conftest import write_pair  # noqa: E402

IMAGE_ATOL = 1e-4
CROP = (48, 96)  # smaller than most scaled 64x128 images, larger than the 0.5 and 0.75 ones


@pytest.fixture(scope="module")
def city8(tmp_path_factory):
    return generate_city(str(tmp_path_factory.mktemp("dali") / "city"), n_train=8, n_val=3,
                         height=64, width=128, seed=0)


def nearest_index(n_out: int, n_in: int, start: int = 0, length: int | None = None):
    """floor((j + 0.5) * n_in / n_out) in exact integer arithmetic, for j in start..start+length."""
    j = np.arange(start, start + (n_out if length is None else length))
    return ((2 * j + 1) * n_in) // (2 * n_out)


def spec_label(train_ids: np.ndarray, p: AugParams, crop) -> np.ndarray:
    """The label half of the spec (``transforms`` docstring) with the documented nearest rule."""
    H, W = train_ids.shape
    h, w = scaled_size(H, W, p.scale)
    vh, vw = min(crop[0], h), min(crop[1], w)
    lab = train_ids[nearest_index(h, H, p.crop_y, vh)][:, nearest_index(w, W, p.crop_x, vw)]
    if p.flip:
        lab = lab[:, ::-1]
    out = np.full(crop, 255, np.uint8)
    out[:vh, :vw] = lab
    return out


def _report(name, a, b):
    err = np.abs(a - b)
    return f"{name}: max error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


def _cases(shape_hw, crop, seed=0):
    rng = np.random.default_rng(seed)
    params = []
    for scale in DEFAULT_SCALES:
        for flip in (False, True):
            h, w = scaled_size(*shape_hw, scale)
            params.append(AugParams(scale, int(rng.integers(0, max(h - crop[0], 0) + 1)),
                                    int(rng.integers(0, max(w - crop[1], 0) + 1)), flip))
    return params


@pytest.mark.parametrize("shape_hw,crop", [((64, 128), CROP), ((37, 53), (40, 40)),
                                           ((64, 128), (128, 256))])
def test_augment_parity_given_params(shape_hw, crop):
    """Every scale, both flips, crops inside and larger than the image (padding)."""
    rng = np.random.default_rng(1)
    params = _cases(shape_hw, crop)
    images = [rng.integers(0, 256, (*shape_hw, 3), dtype=np.uint8) for _ in params]
    label_ids = [rng.choice(TRAIN_TO_LABEL[:19], shape_hw).astype(np.uint8) for _ in params]
    label_ids[0][:3, :5] = 0  # 'unlabeled': must come out as 255
    d_img, d_lab = dali_augment(images, label_ids, params, crop)
    for k, p in enumerate(params):
        train_ids = LABEL_TO_TRAIN[label_ids[k]]
        r_img, r_lab = augment(images[k], train_ids, p, crop)
        assert d_img[k].shape == r_img.shape and d_lab[k].shape == r_lab.shape
        assert d_lab.dtype == r_lab.dtype == np.uint8
        assert np.abs(d_img[k] - r_img).max() <= IMAGE_ATOL, _report(f"image {p}", d_img[k], r_img)
        assert np.array_equal(d_lab[k], spec_label(train_ids, p, crop)), f"label {p}"
        assert np.array_equal(r_lab, d_lab[k]), f"reference label {p}"


def test_wider_label_dtype_same_values():
    """The rule's int16 (a class table beyond a byte): the DALI graph carries it through lookup, nearest
    resize, crop, flip and padding with the same values and dtype as ``augment``."""
    rng = np.random.default_rng(2)
    params = _cases((37, 53), (40, 40))[::3]
    images = [rng.integers(0, 256, (37, 53, 3), dtype=np.uint8) for _ in params]
    label_ids = [rng.choice(TRAIN_TO_LABEL[:19], (37, 53)).astype(np.uint8) for _ in params]
    _, d_lab = dali_augment(images, label_ids, params, (40, 40), label_dtype=np.int16)
    assert d_lab.dtype == np.int16
    for k, p in enumerate(params):
        _, r_lab = augment(images[k], LABEL_TO_TRAIN[label_ids[k]], p, (40, 40), label_dtype=np.int16)
        assert r_lab.dtype == np.int16 and np.array_equal(d_lab[k], r_lab), p


def test_label_exact_at_cityscapes_size():
    """2048x1024 (where every non-trivial scale has ties), crop 876, each scale: exact labels."""
    rng = np.random.default_rng(3)
    shape_hw, crop = (1024, 2048), (876, 876)
    params = _cases(shape_hw, crop, seed=4)[::2]
    params = [AugParams(p.scale, p.crop_y, p.crop_x, k % 2 == 1) for k, p in enumerate(params)]
    label_ids = rng.choice(TRAIN_TO_LABEL[:19], (len(params), *shape_hw)).astype(np.uint8)
    images = np.zeros((len(params), *shape_hw, 3), np.uint8)
    _, d_lab = dali_augment(list(images), list(label_ids), params, crop, threads=2)
    for k, p in enumerate(params):
        expected = spec_label(LABEL_TO_TRAIN[label_ids[k]], p, crop)
        assert np.array_equal(d_lab[k], expected), f"{p}: {(d_lab[k] != expected).sum()} px"


def test_reference_label_equals_spec_at_ties():
    label = np.random.default_rng(0).integers(0, 19, (64, 128), dtype=np.uint8)
    p = AugParams(0.75, 0, 0, False)  # 48x96: every third row and column is a tie
    _, r_lab = augment(np.zeros((64, 128, 3), np.uint8), label, p, (48, 96))
    assert np.array_equal(r_lab, spec_label(label, p, (48, 96)))


def test_loader_parity_with_reference(city8):
    """Same seed: same samples, order and params as ``build_loader``; images within tolerance,
    labels exactly the spec and the reference."""
    kw = dict(crop_size=CROP, seed=5)
    ref = build_loader(city8, "train", 2, workers=0, **kw)
    dal = build_dali_loader(city8, "train", 2, workers=2, **kw)
    base = CityscapesDataset(city8, "train")
    index = {n: i for i, n in enumerate(base.names)}
    assert len(ref) == len(dal) == 4
    for epoch in (0, 3):
        ref.set_epoch(epoch)
        dal.set_epoch(epoch)
        batches = list(zip(ref, dal))
        assert len(batches) == 4
        for r, d in batches:
            assert r["name"] == d["name"]
            assert d["image"].dtype == torch.float32
            assert d["label"].dtype == r["label"].dtype == torch.uint8 and d["label"].is_contiguous()
            assert d["image"].shape == r["image"].shape == (2, 3, *CROP)
            assert d["label"].shape == r["label"].shape == (2, *CROP)
            assert d["image"].is_contiguous()
            for k, name in enumerate(d["name"]):
                image, train_ids, _ = base.load(index[name])
                p = params_for(5, epoch, index[name], train_ids.shape, crop_size=CROP)
                di, ri = d["image"][k].numpy(), r["image"][k].numpy()
                assert np.abs(di - ri).max() <= IMAGE_ATOL, _report(name, di, ri)
                dl = d["label"][k].numpy()
                assert np.array_equal(dl, spec_label(train_ids, p, CROP)), name
                assert np.array_equal(dl, r["label"][k].numpy()), name


def test_eval_parity_and_exactly_once(city8):
    ref = build_loader(city8, "val", workers=0)
    dal = build_dali_loader(city8, "val")
    assert len(dal) == 3
    for r, d in zip(ref, dal, strict=True):
        assert r["name"] == d["name"] and d["image"].shape == r["image"].shape == (1, 3, 64, 128)
        assert torch.equal(d["label"], r["label"])
        assert (d["image"] - r["image"]).abs().max() <= IMAGE_ATOL


# --- alignment and pairing with colour-coded synthetic data ----------------------------------

COLOURS = PALETTE.astype(np.float32)  # trainId -> RGB; all 19 colours are pairwise far apart


def _denorm(image: torch.Tensor) -> np.ndarray:
    """(3, h, w) normalised -> (h, w, 3) on the 0..255 scale."""
    mean = np.asarray(IMAGENET_MEAN, np.float64) * 255
    std = np.asarray(IMAGENET_STD, np.float64) * 255
    return image.numpy().transpose(1, 2, 0) * std + mean


def _decode_colours(image: torch.Tensor):
    """Per pixel: the trainId whose colour it is and whether it is that colour (within 1 level)."""
    rgb = _denorm(image)
    dist = np.linalg.norm(rgb[:, :, None, :] - COLOURS[None, None], axis=-1)
    return dist.argmin(-1), dist.min(-1) < 1.0


@pytest.fixture(scope="module")
def blocks_city(tmp_path_factory):
    """8 train images of 8x8 blocks of random classes; the image colour IS the class colour."""
    root = str(tmp_path_factory.mktemp("blocks"))
    rng = np.random.default_rng(0)
    for i in range(8):
        train_ids = np.kron(rng.integers(0, 19, (8, 16)), np.ones((8, 8), int)).astype(np.uint8)
        write_pair(root, "train", "blocks", f"blocks_{i:06d}_000019", PALETTE[train_ids],
                   TRAIN_TO_LABEL[train_ids])
    return root


def test_alignment_over_epochs(blocks_city):
    """Wherever a pixel is a pure class colour its label is that class (a one-pixel shift or a
    flip applied to only one of them breaks this at block edges); padding is 0 / 255 together."""
    dal = build_dali_loader(blocks_city, "train", 4, crop_size=CROP, seed=2)
    checked = 0
    for epoch in range(4):
        dal.set_epoch(epoch)
        for batch in dal:
            for image, label in zip(batch["image"], batch["label"].numpy()):
                pad = label == 255
                assert torch.all(image[:, torch.from_numpy(pad)] == 0)
                ids, pure = _decode_colours(image)
                pure &= ~pad
                assert pure.sum() > 0.5 * (~pad).sum()
                bad = pure & (ids != label)
                assert not bad.any(), f"epoch {epoch} {batch['name']}: {bad.sum()} misaligned px"
                checked += int(pure.sum())
    assert checked > 0


def test_pairing(tmp_path):
    """Each image is one flat class colour, its label that class: every sample of every batch
    must carry its own label and name through shuffling, over epochs."""
    classes = [0, 1, 2, 5, 8, 10, 11, 13]
    for i, c in enumerate(classes):
        write_pair(str(tmp_path), "train", "flat", f"flat_{i:06d}_000019",
                   np.full((40, 60, 3), PALETTE[c], np.uint8), np.full((40, 60), TRAIN_TO_LABEL[c],
                                                                      np.uint8), size=(40, 60))
    dal = build_dali_loader(str(tmp_path), "train", 3, crop_size=(32, 32), seed=1)
    assert len(dal) == 2
    for epoch in range(3):
        dal.set_epoch(epoch)
        for batch in dal:
            for image, label, name in zip(batch["image"], batch["label"], batch["name"]):
                c = classes[int(name.split("_")[1])]
                valid = label != 255
                assert valid.any() and torch.all(label[valid] == c), name
                ids, pure = _decode_colours(image)
                assert pure[valid.numpy()].all() and (ids[valid.numpy()] == c).all(), name


# --- sharding, resume, determinism ------------------------------------------------------------

def test_sharding_train_and_eval(city8):
    loaders = [build_dali_loader(city8, "train", 2, crop_size=CROP, seed=4, rank=r, world_size=2)
               for r in range(2)]
    orders = []
    for epoch in (0, 1):
        names = []
        for dl in loaders:
            dl.set_epoch(epoch)
            batches = list(dl)
            assert len(batches) == len(dl) == 2  # same number of steps on both ranks
            assert all(len(b["name"]) == 2 and b["image"].shape[0] == 2 for b in batches)
            names.append([n for b in batches for n in b["name"]])
        assert not set(names[0]) & set(names[1])
        assert len(set(names[0] + names[1])) == 8
        orders.append(names)
    assert orders[0] != orders[1]  # reshuffled per epoch
    ref = build_loader(city8, "train", 2, crop_size=CROP, seed=4, rank=1, world_size=2, workers=0)
    ref.set_epoch(1)
    assert [n for b in ref for n in b["name"]] == orders[1][1]

    val = [build_dali_loader(city8, "val", rank=r, world_size=2) for r in range(2)]
    seen = [n for dl in val for b in dl for n in b["name"]]
    assert len(val[0]) == 2 and len(val[1]) == 1
    assert sorted(seen) == sorted(CityscapesDataset(city8, "val").names)  # each exactly once


def test_determinism_and_resume(city8):
    a = build_dali_loader(city8, "train", 2, crop_size=CROP, seed=9)
    b = build_dali_loader(city8, "train", 2, crop_size=CROP, seed=9, workers=1)
    a.set_epoch(2)
    b.set_epoch(2)
    full = list(a)
    for x, y in zip(full, b, strict=True):
        assert x["name"] == y["name"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    # breaking out mid-epoch, then resuming with skip_batches, gives the rest of the same epoch
    for _ in zip(range(1), a):
        pass
    a.set_epoch(2)
    a.sampler.skip_batches(1, 2)
    assert len(a) == 3
    rest = list(a)
    assert [r["name"] for r in rest] == [f["name"] for f in full[1:]]
    assert all(torch.equal(r["image"], f["image"]) for r, f in zip(rest, full[1:]))


def test_dtype_and_errors(city8):
    half = build_dali_loader(city8, "val", dtype=torch.bfloat16)
    full = build_dali_loader(city8, "val")
    h, f = next(iter(half)), next(iter(full))
    assert h["image"].dtype == torch.bfloat16
    ref = next(iter(build_loader(city8, "val", workers=0)))
    assert f["label"].dtype == ref["label"].dtype == torch.uint8 and torch.equal(f["label"], ref["label"])
    assert torch.equal(h["image"], f["image"].to(torch.bfloat16))
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_dali_loader(city8, "train", 5, world_size=2)
    with pytest.raises(ValueError, match="CPU or a CUDA device"):
        build_dali_loader(city8, "val", device="meta")


def test_channels_last_batches_are_views_of_the_same_values(city8):
    """channels_last=True (train.py on CUDA with --memory-format auto): DALI leaves the image HWC and
    the batch is a channels_last view of it, equal to the NCHW batch; labels unchanged."""
    kw = dict(crop_size=CROP, seed=5, workers=1)
    nchw = next(iter(build_dali_loader(city8, "train", 2, **kw)))
    cl = next(iter(build_dali_loader(city8, "train", 2, channels_last=True, **kw)))
    assert cl["image"].shape == nchw["image"].shape
    assert cl["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl["image"], nchw["image"]) and torch.equal(cl["label"], nchw["label"])
