"""ifbf_fast: IFBFNet (Li et al., Sensors 2021) for Cityscapes, with fused fast paths.

Sub-packages: ``ops`` (public fused ops, their references and the implementation switch),
``nn`` (modules), ``models`` (ResNet, ASPP, FBF, IFBFNet), ``data`` (Cityscapes, synthetic city,
loaders), ``engine`` (training, evaluation, checkpoints), ``kernels`` (Triton, installed from the
top-level ``kernels/`` folder) and ``_C`` (the C++/CUDA extension built from ``csrc/``).
"""

__version__ = "0.1.0"
