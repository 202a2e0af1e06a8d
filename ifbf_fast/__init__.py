"""ifbf_fast: IFBFNet (Li et al., Sensors 2021) for Cityscapes, with fused fast paths.

Sub-packages: ``ops`` (public fused ops, their references and the implementation switch),
``nn`` (modules), ``models`` (ResNet, ASPP, FBF, IFBFNet), ``data`` (Cityscapes, synthetic city,
loaders), ``engine`` (training, evaluation, checkpoints), ``kernels`` (Triton, installed from the
top-level ``kernels/`` folder) and ``_C`` (the C++/CUDA extension built from ``csrc/``).

Inference (``ifbf_fast.inference``, loaded on first use so that ``import ifbf_fast`` stays light)::

    model = ifbf_fast.load_model("runs/ifbfnet/best.pt", device="cuda")
    train_ids = model.predict(rgb_uint8_image)             # (H, W) uint8
    picture = ifbf_fast.overlay(rgb_uint8_image, ifbf_fast.colorize(train_ids))
"""

__version__ = "0.1.0"

_LAZY = {"load_model": "inference", "Segmenter": "inference", "colorize": "inference", "overlay": "inference"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
