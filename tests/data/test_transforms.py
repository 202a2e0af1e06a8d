"""Reference augmentation: the conventions the DALI pipeline must match (transforms docstring)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ifbf_fast.data import (DEFAULT_SCALES, IMAGENET_MEAN, IMAGENET_STD, AugParams, augment,
                            eval_transform, normalize, sample_params, scaled_size)


def _stripes(h=40, w=60, seed=0):
    """Label of vertical stripes (width 6) of random trainIds; the image's colour encodes them
    (red = 10 * label, green = 255 - 10 * label, blue = column parity), so it is left-right
    asymmetric and the label can be read back from the image."""
    rng = np.random.default_rng(seed)
    ids = rng.choice([0, 1, 2, 8, 10, 13], size=(w + 5) // 6)
    label = np.repeat(ids, 6)[:w][None].repeat(h, 0).astype(np.uint8)
    image = np.stack([label * 10, 255 - label * 10,
                      np.broadcast_to((np.arange(w) % 2 * 200)[None], (h, w))], -1).astype(np.uint8)
    return image, label


def _denorm(img_chw):
    mean = np.asarray(IMAGENET_MEAN, np.float64)[:, None, None] * 255
    std = np.asarray(IMAGENET_STD, np.float64)[:, None, None] * 255
    return img_chw * std + mean


def test_scaled_size_rounds_half_up():
    assert scaled_size(1024, 2048, 0.75) == (768, 1536)
    assert scaled_size(5, 7, 0.5) == (3, 4)      # 2.5 -> 3, 3.5 -> 4 (Python round: 2, 4)
    assert scaled_size(1, 1, 0.25) == (1, 1)     # never empty


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_sample_params_ranges_and_determinism(kind):
    make = (lambda: np.random.default_rng(3)) if kind == "numpy" else \
        (lambda: torch.Generator().manual_seed(3))
    g1, g2 = make(), make()
    seen_scales, flips = set(), 0
    for _ in range(300):
        p = sample_params(g1, (100, 200), crop_size=(120, 150))
        assert p == sample_params(g2, (100, 200), crop_size=(120, 150))
        h, w = scaled_size(100, 200, p.scale)
        assert 0 <= p.crop_y <= max(h - 120, 0) and 0 <= p.crop_x <= max(w - 150, 0)
        seen_scales.add(p.scale)
        flips += p.flip
    assert seen_scales == set(DEFAULT_SCALES)
    assert 100 < flips < 200


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.0, 1.25, 2.0])
def test_label_values_are_a_subset_plus_ignore(scale):
    image, label = _stripes()
    label[3:9, 3:9] = 255
    p = sample_params(np.random.default_rng(int(scale * 4)), label.shape, (scale,), 48)
    img, lab = augment(image, label, p, 48)
    assert img.dtype == np.float32 and img.shape == (3, 48, 48) and img.flags.c_contiguous
    assert lab.dtype == np.uint8 and lab.shape == (48, 48)
    assert set(np.unique(lab)) <= set(np.unique(label)) | {255}


def test_padding_when_crop_is_larger_than_the_image():
    image, label = _stripes(20, 30)
    for flip in (False, True):
        img, lab = augment(image, label, AugParams(1.0, 0, 0, flip), (32, 50))
        assert (img[:, 20:, :] == 0).all() and (img[:, :, 30:] == 0).all()  # 0 after normalisation
        assert (lab[20:, :] == 255).all() and (lab[:, 30:] == 255).all()
        assert (lab[:20, :30] != 255).all()  # the valid window sits top-left, also when flipped
        expected = normalize(image).transpose(2, 0, 1)
        assert np.array_equal(img[:, :20, :30], expected[:, :, ::-1] if flip else expected)
    # crop larger in one dimension only: offset only along the other one
    with pytest.raises(ValueError, match="outside the valid range"):
        augment(image, label, AugParams(1.0, 1, 0, False), (32, 10))
    img, lab = augment(image, label, AugParams(1.0, 0, 20, False), (32, 10))
    assert np.array_equal(lab[:20], label[:, 20:30]) and (lab[20:] == 255).all()


def test_normalisation_constants():
    px = np.array([[[0, 128, 255]]], np.uint8)
    expected = (np.array([0, 128, 255]) - 255 * np.array(IMAGENET_MEAN)) / (255 * np.array(IMAGENET_STD))
    np.testing.assert_allclose(normalize(px)[0, 0], expected, rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1.25, 0.75])
def test_flip_keeps_image_and_label_consistent(scale):
    image, label = _stripes(40, 60, seed=1)
    h, w = scaled_size(40, 60, scale)
    p = AugParams(scale, 0, min(3, max(w - 36, 0)), False)
    img, lab = augment(image, label, p, 36)
    img_f, lab_f = augment(image, label, AugParams(scale, p.crop_y, p.crop_x, True), 36)
    vh, vw = min(36, h), min(36, w)
    assert np.array_equal(lab_f[:vh, :vw], lab[:vh, :vw][:, ::-1])
    assert np.array_equal(img_f[:, :vh, :vw], img[:, :vh, :vw][:, :, ::-1])
    assert not np.array_equal(img_f, img)  # the stripes make the crop asymmetric
    # the colour still encodes the label away from stripe borders (bilinear mixes only there)
    red = _denorm(img_f)[0, :vh, :vw]
    lab_v = lab_f[:vh, :vw]
    inner = np.zeros_like(lab_v, bool)
    inner[:, 1:-1] = (lab_v[:, 1:-1] == lab_v[:, :-2]) & (lab_v[:, 1:-1] == lab_v[:, 2:])
    assert inner.mean() > 0.5
    assert np.abs(red[inner] - 10.0 * lab_v[inner]).max() < 1e-3


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.5, 2.0])
def test_resize_matches_torch_bilinear_and_nearest_exact(scale):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (37, 53), dtype=np.uint8)
    h, w = scaled_size(37, 53, scale)
    img, lab = augment(image, label, AugParams(scale, 0, 0, False), (h, w))
    t = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), (h, w),
                      mode="bilinear", align_corners=False, antialias=False)[0]
    ref = normalize(t.permute(1, 2, 0).numpy()).transpose(2, 0, 1)
    assert np.abs(img - ref).max() < 1e-4
    t_lab = F.interpolate(torch.from_numpy(label)[None, None].float(), (h, w), mode="nearest-exact")
    assert np.array_equal(lab, t_lab[0, 0].long().numpy())


def test_label_dtype_is_checked_never_wrapped():
    image, label = _stripes(20, 30)
    p = AugParams(1.0, 0, 0, False)
    _, lab = augment(image, label, p, (24, 36), ignore_index=-1, label_dtype=np.int16)
    assert lab.dtype == np.int16 and (lab[20:] == -1).all() and np.array_equal(lab[:20, :30], label)
    with pytest.raises(ValueError, match="augment: ignore_index -1 does not fit label_dtype uint8"):
        augment(image, label, p, (24, 36), ignore_index=-1)
    with pytest.raises(ValueError, match="augment: a int64 label does not fit label_dtype uint8"):
        augment(image, label.astype(np.int64), p, (24, 36))
    with pytest.raises(ValueError, match="eval_transform: label_dtype must be an integer dtype"):
        eval_transform(image, label, label_dtype=np.float32)
    _, wide = eval_transform(image, label, label_dtype=np.int32)
    assert wide.dtype == np.int32 and np.array_equal(wide, label)


def test_eval_transform():
    image, label = _stripes(20, 30)
    img, lab = eval_transform(image, label)
    assert img.shape == (3, 20, 30) and img.dtype == np.float32 and img.flags.c_contiguous
    assert lab.dtype == np.uint8 and np.array_equal(lab, label)
    assert np.shares_memory(lab, label)      # a uint8 label passes through, no copy
    np.testing.assert_allclose(_denorm(img), image.transpose(2, 0, 1), atol=1e-3)
