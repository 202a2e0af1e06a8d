"""Triton kernels of ifbf_fast, one file per fused op (installed as ``ifbf_fast.kernels``).

Import these through ``ifbf_fast.ops``; set ``TRITON_INTERPRET=1`` before the first import to run
them on CPU tensors under Triton's interpreter. Each kernel module records at its import whether it
was imported interpreted (its ``INTERPRETER``): ``@triton.jit`` decides then, not at a call, so that
flag, not the environment later, says whether CPU tensors can run (the ops' availability probes read it).

This file holds what every launcher shares and imports nothing but torch (``ifbf_fast.ops`` reads
``SUPPORTED_DTYPES`` from it without importing Triton or fixing any module's interpreter mode).
"""
import torch

#: the activation dtypes every fast op takes (the C++ InPlace-ABN also takes float64 on the CPU)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b) for ints (triton.cdiv costs ~10 us a call through its constexpr wrapper)."""
    return -(-a // b)
