"""Data: Cityscapes labels and reader, preflight check, reference augmentation and loader,
synthetic city. The DALI pipeline (``ifbf_fast.data.dali``, another module) must match
``transforms.augment`` given the same ``AugParams``.

Modules: ``labels`` (tables from cityscapesscripts), ``cityscapes`` (layout + reader),
``check`` (preflight, ``python -m ifbf_fast.data.check DIR``), ``transforms`` (augmentation spec),
``loader`` (``build_loader``), ``synthetic`` (``python -m ifbf_fast.data.synthetic --out DIR``).
"""

from .cityscapes import (CityscapesDataset, DataReadError, DatasetLayoutError, Sample, find_pairs,
                         read_image, read_label, read_label_ids)
from .labels import (CLASS_NAMES, IGNORE_INDEX, LABEL_COLORS, LABEL_ID, LABEL_TO_TRAIN,
                     NUM_CLASSES, PALETTE, TRAIN_TO_LABEL, VALID_LABEL_IDS, colorize,
                     to_label_ids, to_train_ids)
from .loader import (SegmentationLoader, SegmentationSet, ShardedSampler, build_loader, collate,
                     sample_generator)
from .transforms import (DEFAULT_CROP, DEFAULT_SCALES, IMAGENET_MEAN, IMAGENET_STD, AugParams,
                         TrainTransform, augment, eval_transform, normalize, sample_params,
                         scaled_size)

# check and synthetic are also run as ``python -m``: importing them here eagerly would make runpy
# warn (the module would already be in sys.modules), so they load on first attribute access.
_LAZY = {"check_dataset": "check", "DatasetReport": "check", "generate_city": "synthetic",
         "render_scene": "synthetic"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AugParams", "CLASS_NAMES", "CityscapesDataset", "DEFAULT_CROP", "DEFAULT_SCALES",
    "DataReadError", "DatasetLayoutError", "DatasetReport", "IGNORE_INDEX", "IMAGENET_MEAN",
    "IMAGENET_STD", "LABEL_COLORS", "LABEL_ID", "LABEL_TO_TRAIN", "NUM_CLASSES", "PALETTE",
    "Sample", "SegmentationLoader", "SegmentationSet", "ShardedSampler", "TRAIN_TO_LABEL",
    "TrainTransform", "VALID_LABEL_IDS", "augment", "build_loader", "check_dataset", "collate",
    "colorize", "eval_transform", "find_pairs", "generate_city", "normalize", "read_image",
    "read_label", "read_label_ids", "render_scene", "sample_generator", "sample_params",
    "scaled_size", "to_label_ids", "to_train_ids",
]
