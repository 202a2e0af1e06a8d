"""The ahead-of-time compile helper itself: real PTX, ptxas numbers, vectorisation detection."""
import pytest

from ifbf_fast.utils.triton_aot import AotResult, KernelSpec, assert_compiles_cleanly, compile_kernels

SIG = {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"}
MOD = "tests.utils._aot_sample_kernel"


def test_compiles_for_both_archs_with_ptxas_numbers():
    vec, plain = compile_kernels([
        KernelSpec(MOD, "_scale_kernel", SIG, {"BLOCK": 1024}, divisible_by_16=("x_ptr", "y_ptr", "n")),
        KernelSpec(MOD, "_scale_kernel", SIG, {"BLOCK": 1024}),
    ])
    assert [r.arch for r in vec] == [80, 90]
    for r in vec:
        assert ".entry _scale_kernel" in r.ptx
        assert r.registers > 0 and r.spills == 0
        assert r.vector_loads, "divisible pointers and size should give vectorised loads"
    assert not any(r.vector_loads for r in plain)
    assert_compiles_cleanly(vec + plain)


def test_errors_are_reported():
    with pytest.raises(RuntimeError, match="lacks"):
        compile_kernels([KernelSpec(MOD, "_scale_kernel", {"x_ptr": "*fp32"}, {"BLOCK": 64})])
    fake = AotResult("k", 90, 0, 4, 255, 128, 64, False, "")
    with pytest.raises(AssertionError, match="register spills"):
        assert_compiles_cleanly([fake])
    big = AotResult("k", 80, 300 * 1024, 4, 32, 0, 0, False, "")
    with pytest.raises(AssertionError, match="shared memory"):
        assert_compiles_cleanly([big])
