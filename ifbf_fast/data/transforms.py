"""Reference augmentation of docs/DESIGN.md section 3, with the random parameters made explicit.

This is the specification the DALI pipeline must reproduce: given the same ``AugParams``, the same
input and the same ``crop_size``, ``augment`` defines the output. Training is two steps:

    params = sample_params(rng, (H, W), scales, crop_size)        # all randomness is here
    image, label = augment(image, label, params, crop_size)       # pure, deterministic

``augment`` conventions, in the order they are applied (the mmsegmentation order: Resize,
RandomCrop, RandomFlip, Normalize, Pad):

1. **Resize** by ``s = params.scale`` to ``(h, w) = scaled_size(H, W, s)``, i.e.
   ``h = int(H * s + 0.5)``, ``w = int(W * s + 0.5)`` (round half up, as mmseg's ``rescale_size``;
   not Python's banker's ``round``), at least 1. Skipped when ``(h, w) == (H, W)``.
   * image: converted to float32 (raw 0..255 values, not yet normalised), then
     ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)``: bilinear with half-pixel centres, edge
     pixels clamped, **no antialiasing** when shrinking. It equals
     ``F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=False)`` up to float
     rounding (< 1e-3 on the 0..255 scale; tested). In DALI: ``fn.resize(..., interp_type=LINEAR,
     antialias=False, dtype=FLOAT)`` on the float image with the exact ``(h, w)`` above.
   * label: nearest neighbour by an exact integer index lookup on the uint8 trainIds: the source
     pixel of output ``j`` is ``floor((j + 0.5) * H / h) = ((2j + 1) * H) // (2h)`` (pixel centres,
     the same geometry as the bilinear image). Neither OpenCV mode is used: ``cv2.INTER_NEAREST``
     (``floor(j * H / h)``) shifts the label up to half a pixel against the image, and
     ``cv2.INTER_NEAREST_EXACT`` rounds many ties (``(j + 0.5) * H / h`` an integer, e.g. every
     third row at scale 0.75) downwards in its fixed-point arithmetic.
     Nearest never creates label values.
2. **Crop** ``(ch, cw) = crop_size``: rows ``crop_y .. crop_y + min(ch, h) - 1`` and columns
   ``crop_x .. crop_x + min(cw, w) - 1`` of the resized pair. ``sample_params`` draws
   ``crop_y`` uniformly from the integers ``0 .. max(h - ch, 0)`` (inclusive), likewise ``crop_x``;
   so when the resized image is smaller than the crop in a dimension the offset there is 0 and the
   whole extent is kept.
3. **Flip** (``params.flip``): the cropped window is mirrored left-right (``[:, ::-1]``), image and
   label together. Flip comes after the crop, so ``crop_x`` always counts from the left of the
   *unflipped* resized image.
4. **Normalise** (ImageNet, RGB order): ``(x - 255 * mean) / (255 * std)`` in float32 with
   ``mean = (0.485, 0.456, 0.406)``, ``std = (0.229, 0.224, 0.225)`` (the constants ``255 * mean``
   and ``255 * std`` are computed in float64 and then cast to float32).
5. **Pad** to exactly ``(ch, cw)`` at the **bottom and right** (as mmseg's ``Pad``): image with 0
   *after* normalisation (= the mean colour), label with ``ignore_index`` (255). The valid window
   sits at the top-left corner ``[0:min(ch, h), 0:min(cw, w)]``, also when flipped.

Output: image float32 ``(3, ch, cw)`` contiguous, label ``(ch, cw)`` in ``label_dtype``: uint8 by
default, the dataset's ``ClassTable.label_dtype`` in the loaders (uint8 for every class table; see
``classes.label_dtype`` for the rule). ``sample_params`` draws in a fixed order: scale index, crop_y,
crop_x, flip (``random() < flip_prob``).

Evaluation (``eval_transform``): normalisation only, full image, label values unchanged (in
``label_dtype``; a uint8 label is passed through without a copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
DEFAULT_CROP = 876
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


@dataclass(frozen=True)
class AugParams:
    """The random choices of one training sample (see the module docstring for their meaning)."""

    scale: float
    crop_y: int
    crop_x: int
    flip: bool


def crop_hw(crop_size) -> tuple[int, int]:
    """``876`` or ``(h, w)`` -> ``(h, w)``."""
    if isinstance(crop_size, (int, np.integer)):
        return int(crop_size), int(crop_size)
    ch, cw = crop_size
    return int(ch), int(cw)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Output size of the resize step: round half up, at least 1 pixel."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _draw(generator, kind: str, high=None) -> float | int:
    """One draw from a numpy ``Generator`` or a ``torch.Generator``: an int in ``[0, high)`` or a
    float in ``[0, 1)``. Both kinds are supported so callers can keep the generator they have."""
    if isinstance(generator, torch.Generator):
        if kind == "int":
            return int(torch.randint(0, high, (), generator=generator))
        return float(torch.rand((), generator=generator, dtype=torch.float64))
    if kind == "int":
        return int(generator.integers(0, high))
    return float(generator.random())


def sample_params(generator, image_hw, scales=DEFAULT_SCALES, crop_size=DEFAULT_CROP,
                  flip_prob: float = 0.5) -> AugParams:
    """Draw ``AugParams`` for an image of size ``image_hw = (H, W)``.

    Draw order (fixed, part of the contract): scale index uniform over ``scales``; ``crop_y``
    uniform in ``0..max(h - ch, 0)``; ``crop_x`` uniform in ``0..max(w - cw, 0)`` with ``(h, w)``
    the scaled size; ``flip = random() < flip_prob``.
    """
    if len(scales) == 0:
        raise ValueError("scales must not be empty")
    height, width = int(image_hw[0]), int(image_hw[1])
    ch, cw = crop_hw(crop_size)
    scale = float(scales[_draw(generator, "int", len(scales))])
    h, w = scaled_size(height, width, scale)
    crop_y = _draw(generator, "int", max(h - ch, 0) + 1)
    crop_x = _draw(generator, "int", max(w - cw, 0) + 1)
    flip = _draw(generator, "float") < flip_prob
    return AugParams(scale, crop_y, crop_x, bool(flip))


def _norm_constants(mean, std) -> tuple[np.ndarray, np.ndarray]:
    return ((np.asarray(mean, np.float64) * 255).astype(np.float32),
            (np.asarray(std, np.float64) * 255).astype(np.float32))


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(H, W, 3) RGB, uint8 or float32 on the 0..255 scale -> float32 (H, W, 3) normalised."""
    mean255, std255 = _norm_constants(mean, std)
    return (image.astype(np.float32, copy=False) - mean255) / std255


def nearest_resize(label: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label to (h, w) with the pixel-centre rule
    ``src = floor((j + 0.5) * H / h)``, computed in integers so that ties are exact."""
    H, W = label.shape[:2]
    rows = ((2 * np.arange(h) + 1) * H) // (2 * h)
    cols = ((2 * np.arange(w) + 1) * W) // (2 * w)
    return label[rows[:, None], cols[None, :]]


def _check_label_dtype(label: np.ndarray, label_dtype, ignore_index: int, what: str) -> np.dtype:
    """``label_dtype`` as a numpy dtype, after checking that it holds the label's values and the ignore
    index (a narrower dtype would wrap them silently into other class ids)."""
    dtype = np.dtype(label_dtype)
    if dtype.kind not in "iu":
        raise ValueError(f"{what}: label_dtype must be an integer dtype, got {dtype}")
    if not np.can_cast(label.dtype, dtype):
        raise ValueError(f"{what}: a {label.dtype} label does not fit label_dtype {dtype}")
    info = np.iinfo(dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(f"{what}: ignore_index {ignore_index} does not fit label_dtype {dtype}")
    return dtype


def augment(image: np.ndarray, label: np.ndarray, params: AugParams, crop_size=DEFAULT_CROP,
            mean=IMAGENET_MEAN, std=IMAGENET_STD, ignore_index: int = IGNORE_INDEX,
            label_dtype=np.uint8):
    """Apply ``params`` to an (H, W, 3) uint8 RGB image and its (H, W) uint8 trainId label.

    Returns image float32 (3, ch, cw) and label ``label_dtype`` (ch, cw); see the module docstring
    for the exact conventions. Raises ``ValueError`` for offsets outside the sampled range and for a
    ``label_dtype`` that cannot hold the label's dtype or ``ignore_index``.
    """
    if image.ndim != 3 or image.shape[2] != 3 or label.shape != image.shape[:2]:
        raise ValueError(f"augment expects (H, W, 3) image and (H, W) label, got {image.shape} "
                         f"and {label.shape}")
    out_dtype = _check_label_dtype(label, label_dtype, ignore_index, "augment")
    height, width = label.shape
    ch, cw = crop_hw(crop_size)
    h, w = scaled_size(height, width, params.scale)
    if not (0 <= params.crop_y <= max(h - ch, 0) and 0 <= params.crop_x <= max(w - cw, 0)):
        raise ValueError(f"crop offset ({params.crop_y}, {params.crop_x}) outside the valid range "
                         f"for a {h}x{w} resized image and a {ch}x{cw} crop")
    # 1. resize (float image so that the result is library-neutral up to float rounding)
    img = image.astype(np.float32)
    lab = label
    if (h, w) != (height, width):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        lab = nearest_resize(lab, h, w)
    # 2. crop
    vh, vw = min(ch, h), min(cw, w)
    img = img[params.crop_y:params.crop_y + vh, params.crop_x:params.crop_x + vw]
    lab = lab[params.crop_y:params.crop_y + vh, params.crop_x:params.crop_x + vw]
    # 3. flip
    if params.flip:
        img, lab = img[:, ::-1], lab[:, ::-1]
    # 4. normalise, 5. pad bottom/right, written straight into the CHW output
    out_img = np.zeros((3, ch, cw), dtype=np.float32)
    out_img[:, :vh, :vw] = normalize(img, mean, std).transpose(2, 0, 1)
    out_lab = np.full((ch, cw), ignore_index, dtype=out_dtype)
    out_lab[:vh, :vw] = lab
    return out_img, out_lab


def eval_transform(image: np.ndarray, label: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   label_dtype=np.uint8, ignore_index: int = IGNORE_INDEX):
    """Evaluation: normalised float32 (3, H, W) image, (H, W) label in ``label_dtype`` (no copy when
    the label already has it); no resizing."""
    out_dtype = _check_label_dtype(label, label_dtype, ignore_index, "eval_transform")
    out_img = np.ascontiguousarray(normalize(image, mean, std).transpose(2, 0, 1))
    return out_img, label.astype(out_dtype, copy=False)


class TrainTransform:
    """Picklable bundle of the training settings: ``t(image, label, generator)`` samples the
    params from ``generator`` and applies them; ``t.sample`` / ``t.apply`` expose the two steps."""

    def __init__(self, scales=DEFAULT_SCALES, crop_size=DEFAULT_CROP, flip_prob: float = 0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, ignore_index: int = IGNORE_INDEX,
                 label_dtype=np.uint8):
        self.scales = tuple(float(s) for s in scales)
        self.crop_size = crop_hw(crop_size)
        self.flip_prob = flip_prob
        self.mean, self.std, self.ignore_index = tuple(mean), tuple(std), ignore_index
        self.label_dtype = np.dtype(label_dtype)

    def sample(self, generator, image_hw) -> AugParams:
        return sample_params(generator, image_hw, self.scales, self.crop_size, self.flip_prob)

    def apply(self, image, label, params: AugParams):
        return augment(image, label, params, self.crop_size, self.mean, self.std,
                       self.ignore_index, self.label_dtype)

    def __call__(self, image, label, generator):
        return self.apply(image, label, self.sample(generator, label.shape))
