"""The comparison helper of the op tests (tests/ops/_compare.py) fails where it must, and says where."""
import pytest
import torch

from ._compare import DTYPES, TOLERANCE, Close, Relative, check, compare, poisoned, rule, run


def test_poisoned_fills_every_new_buffer():
    with poisoned():
        assert torch.empty(3).isnan().all() and torch.empty_like(torch.ones(2, 2)).isnan().all()
        assert (torch.empty(2, dtype=torch.int32) == torch.iinfo(torch.int32).max).all()
    assert not torch.are_deterministic_algorithms_enabled()


def test_failure_names_the_result_index_and_both_values():
    want = torch.zeros(2, 3)
    got = want.clone()
    got[1, 2] = 0.5
    with pytest.raises(AssertionError, match=r"ohem_ce grad_logits float32: largest error 0\.5 at \(1, 2\) "
                                             r"\(fast 0\.5, reference 0\)"):
        check("ohem_ce", "grad_logits", got, want, torch.float32)
    with pytest.raises(AssertionError, match=r"fbf out float32: NaN in the fast result"):
        compare("fbf", {"out": torch.full((2,), float("nan"))}, {"out": torch.zeros(2)}, torch.float32)


def test_relative_rule_takes_the_low_precision_error():
    truth = torch.zeros(4)
    lowp = torch.tensor([0.0, 0.01, 0.0, 0.0])
    compare("fbf", {"out": torch.full((4,), 0.02)}, {"out": truth}, torch.bfloat16, lowp={"out": lowp})
    with pytest.raises(AssertionError, match="> bound"):
        compare("fbf", {"out": torch.full((4,), 0.03)}, {"out": truth}, torch.bfloat16, lowp={"out": lowp})


def test_every_op_has_a_rule_per_dtype_and_run_gives_every_gradient():
    for op in ("fbf", "inplace_abn", "ohem_ce"):
        for dtype in DTYPES:
            assert isinstance(rule(op, "out", dtype), (Relative, Close))
    assert rule("ohem_ce", "loss", torch.bfloat16) == TOLERANCE["ohem_ce"]["loss"][torch.bfloat16]
    a, b = torch.randn(3), torch.randn(3)
    r = run(lambda x, y, z: x * y, (a, b, None), 2.0, {0: "grad_a", 1: "grad_b", 2: "grad_none"})
    assert list(r) == ["out", "grad_a", "grad_b", "grad_none"] and r["grad_none"] is None
    assert torch.equal(r["grad_a"], 2 * b) and torch.equal(r["grad_b"], 2 * a)
