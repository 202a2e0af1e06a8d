"""Triton kernels of ifbf_fast, one file per fused op (installed as ``ifbf_fast.kernels``).

Import these through ``ifbf_fast.ops``; set ``TRITON_INTERPRET=1`` before the first import to run
them on CPU tensors under Triton's interpreter.
"""
