"""Data: Cityscapes labels and reader, preflight check, reference augmentation and loader,
synthetic city. The DALI pipeline (``ifbf_fast.data.dali``, another module) must match
``transforms.augment`` given the same ``AugParams``.

Modules: ``labels`` (tables from cityscapesscripts), ``cityscapes`` (layout + reader), ``classes``
(``ClassTable``: names, colours, mask value -> train id; ``CITYSCAPES``; ``classes.yaml``), ``folder``
(your own data: the folder layout + reader, and ``open_dataset`` / ``list_samples`` / ``class_table_of``
for a root in either layout),
``check`` (preflight, ``python -m ifbf_fast.data.check DIR``), ``transforms`` (augmentation spec),
``loader`` (``build_loader``), ``synthetic`` (``python -m ifbf_fast.data.synthetic --out DIR``),
``dali`` (``build_dali_loader``, same batches with the pixel work in DALI), ``prepare``
(``python -m ifbf_fast.data.prepare SRC DST``: decode-free .npy form).
"""

from .cityscapes import (CityscapesDataset, DataReadError, DatasetLayoutError, Sample, find_pairs,
                         png_size, read_image, read_label, read_label_ids)
from .classes import CITYSCAPES, ClassTable, ClassTableError, load_class_table
from .folder import (FolderDataset, class_table_of, detect_layout, is_folder_layout, list_samples,
                     open_dataset)
from .labels import (CLASS_NAMES, IGNORE_INDEX, LABEL_COLORS, LABEL_ID, LABEL_TO_TRAIN,
                     NUM_CLASSES, PALETTE, TRAIN_TO_LABEL, VALID_LABEL_IDS, colorize,
                     to_label_ids, to_train_ids)
from .loader import (SegmentationLoader, SegmentationSet, ShardedSampler, build_loader, collate,
                     params_for, sample_generator)
from .transforms import (DEFAULT_CROP, DEFAULT_SCALES, IMAGENET_MEAN, IMAGENET_STD, AugParams,
                         TrainTransform, augment, eval_transform, normalize, sample_params,
                         scaled_size)

# check and synthetic are also run as ``python -m``: importing them here eagerly would make runpy
# warn (the module would already be in sys.modules), so they load on first attribute access.
_LAZY = {"check_dataset": "check", "DatasetReport": "check", "generate_city": "synthetic",
         "render_scene": "synthetic", "build_dali_loader": "dali", "DaliLoader": "dali",
         "dali_available": "dali"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "augment", "AugParams", "build_loader", "check_dataset", "CityscapesDataset", "CLASS_NAMES",
    "collate", "colorize", "DataReadError", "DatasetLayoutError", "DatasetReport",
    "DEFAULT_CROP", "DEFAULT_SCALES", "eval_transform", "find_pairs", "generate_city",
    "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "LABEL_COLORS", "LABEL_ID",
    "LABEL_TO_TRAIN", "normalize", "NUM_CLASSES", "PALETTE", "params_for", "png_size",
    "read_image", "read_label", "read_label_ids", "render_scene", "Sample", "sample_generator",
    "sample_params", "scaled_size", "SegmentationLoader", "SegmentationSet", "ShardedSampler",
    "to_label_ids", "to_train_ids", "TRAIN_TO_LABEL", "TrainTransform", "VALID_LABEL_IDS",
    "build_dali_loader", "DaliLoader", "dali_available", "CITYSCAPES", "ClassTable", "ClassTableError",
    "load_class_table", "FolderDataset", "class_table_of", "detect_layout", "is_folder_layout",
    "list_samples", "open_dataset",
]
