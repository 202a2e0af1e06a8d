"""The ahead-of-time compile helper itself: real PTX, ptxas numbers, vectorisation detection."""
import pytest

from ifbf_fast.utils.triton_aot import AotResult, assert_compiles_cleanly, compile_kernel

from ._aot_sample_kernel import _scale_kernel

SIG = {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"}


def test_compiles_for_both_archs_with_ptxas_numbers():
    results = compile_kernel(_scale_kernel, SIG, {"BLOCK": 1024}, divisible_by_16=("x_ptr", "y_ptr", "n"))
    assert [r.arch for r in results] == [80, 90]
    for r in results:
        assert ".entry _scale_kernel" in r.ptx
        assert r.registers > 0 and r.spills == 0
        assert r.vector_loads, "divisible pointers and size should give vectorised loads"
    assert_compiles_cleanly(results)


def test_no_vectorisation_without_divisibility():
    (r,) = compile_kernel(_scale_kernel, SIG, {"BLOCK": 1024}, archs=(90,))
    assert not r.vector_loads


def test_missing_signature_and_spills_are_reported():
    with pytest.raises(ValueError, match="lacks"):
        compile_kernel(_scale_kernel, {"x_ptr": "*fp32"}, {"BLOCK": 64})
    fake = AotResult("k", 90, 0, 4, 255, 128, 64, False, "")
    with pytest.raises(AssertionError, match="register spills"):
        assert_compiles_cleanly([fake])
    big = AotResult("k", 80, 300 * 1024, 4, 32, 0, 0, False, "")
    with pytest.raises(AssertionError, match="shared memory"):
        assert_compiles_cleanly([big])
