"""Ahead-of-time compile of every OHEM kernel configuration the launchers use, for sm_80 and sm_90: those
of ``kernels/ohem_ce.py`` and of the fused-upsampling variant in ``kernels/ohem_ce_upsampled.py``.

Fails on a compile error, a shared-memory overflow or a register spill (../shared/GPU.md section 2);
prints registers, spills and whether the global loads were vectorised (pytest -s shows the table).
"""
import dataclasses

import torch

from ifbf_fast.kernels import ohem_ce as K
from ifbf_fast.kernels import ohem_ce_upsampled as KU
from ifbf_fast.utils.triton_aot import assert_compiles_cleanly, compile_kernels

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (classes, channels_last): the project's 19 classes in both layouts, and the smallest and largest
# class blocks the launcher uses (BLOCK_C = 2 with 2048-pixel tiles, BLOCK_C = 256 with 16).
CLASS_CONFIGS = ((19, False), (19, True), (1, False), (K.MAX_BLOCK_C, False))


def _all_specs():
    specs = []
    for dtype in DTYPES:
        for classes, channels_last in CLASS_CONFIGS:
            specs += K.kernel_specs(classes, dtype, channels_last=channels_last)
    for target_dtype in (torch.int32, torch.uint8):         # labels as other loaders hand them over
        specs += K.kernel_specs(19, torch.bfloat16, target_dtype)
    specs += K.kernel_specs(19, torch.float32, aligned=False)
    for dtype in DTYPES:                                      # the optional fused x4 upsampling
        specs += KU.upsample_kernel_specs(19, dtype)
    specs += KU.upsample_kernel_specs(19, torch.bfloat16, channels_last=True)
    specs += KU.upsample_kernel_specs(19, torch.bfloat16, (256, 512), (1024, 2048))
    specs += KU.upsample_kernel_specs(19, torch.bfloat16, (4, 4), (13, 17))[1:]   # footprint 8 x 4
    specs += KU.upsample_kernel_specs(19, torch.bfloat16, (4, 4), (17, 13))[1:]   # footprint 4 x 8
    return specs + K.select_kernel_specs()


def test_every_launched_configuration_compiles_cleanly_for_sm80_and_sm90():
    specs = _all_specs()
    results = compile_kernels(specs)
    rows = []
    for spec, per_arch in zip(specs, results):
        assert [r.arch for r in per_arch] == [80, 90]
        for r in per_arch:
            assert f".entry {spec.attr}" in r.ptx
            rows.append(f"{spec.attr:28s} {str(spec.signature.get('logits_ptr', spec.signature.get('lr_ptr', '-'))):6s} "
                        f"BLOCK_C={spec.constexprs.get('BLOCK_C', '-')!s:4s} "
                        f"unit={'c' if spec.constexprs.get('stride_lc') == 1 else 'w'} sm_{r.arch} "
                        f"regs={r.registers:3d} spills={r.spills} smem={r.shared} vec={r.vector_loads}")
        assert_compiles_cleanly(per_arch)
    print("\n" + "\n".join(rows))
    # NCHW bf16 at 19 classes, aligned as at 876 x 876: the forward's logits loads must vectorise.
    fwd_19 = results[0]
    assert all(r.vector_loads for r in fwd_19), "NCHW forward lost its vectorised loads"


def test_integer_arguments_of_one_compile():
    """On a GPU, Triton turns an integer argument equal to 1 (a batch of one, one row, a unit stride) into a
    compile-time constant, a plain Python int inside the kernel; a tensor method on it would not compile
    (seen in the FBF kernels on an H200). Compile each kernel with each integer argument set to 1."""
    base = (K.kernel_specs(19, torch.float32) + KU.upsample_kernel_specs(19, torch.float32)
            + K.select_kernel_specs())
    specs, names = [], []
    seen = set()
    for spec in base:
        for arg, kind in spec.signature.items():
            if kind not in ("i32", "i64") or (spec.attr, arg) in seen:
                continue
            seen.add((spec.attr, arg))
            sig, const = dict(spec.signature), dict(spec.constexprs)
            sig[arg], const[arg] = "constexpr", 1
            div = tuple(a for a in spec.divisible_by_16 if a != arg)
            specs.append(dataclasses.replace(spec, signature=sig, constexprs=const, divisible_by_16=div))
            names.append(f"{spec.attr} {arg}=1")
    assert len(specs) > 10
    results = compile_kernels(specs, archs=(90,))
    for name, spec, per_arch in zip(names, specs, results):
        assert per_arch and f".entry {spec.attr}" in per_arch[0].ptx, name
