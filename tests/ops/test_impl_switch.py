"""The implementation switch: precedence, validation, and that "fast" never silently falls back."""
import pytest
import torch

from ifbf_fast import ops
from ifbf_fast.ops import _impl


def test_precedence_context_over_set_over_env(monkeypatch):
    monkeypatch.setenv("IFBF_IMPL", "reference")
    ops.set_impl(None)
    assert ops.get_impl() == "reference"
    ops.set_impl("fast")
    assert ops.get_impl() == "fast"
    with ops.use_impl("auto"):
        assert ops.get_impl() == "auto"
        with ops.use_impl("reference"):
            assert ops.get_impl() == "reference"
        assert ops.get_impl() == "auto"
    assert ops.get_impl() == "fast"
    ops.set_impl(None)
    monkeypatch.delenv("IFBF_IMPL")
    assert ops.get_impl() == "auto"


def test_bad_values_are_named(monkeypatch):
    with pytest.raises(ValueError, match="'fastest'"):
        ops.set_impl("fastest")
    with pytest.raises(ValueError, match="use_impl"):
        with ops.use_impl("cuda"):
            pass
    monkeypatch.setenv("IFBF_IMPL", "quick")
    with pytest.raises(ValueError, match="IFBF_IMPL"):
        ops.get_impl()


def test_fast_requested_where_it_cannot_run_raises():
    with ops.use_impl("fast"):
        with pytest.raises(ops.FastPathUnavailable, match="fbf"):
            _impl.choose("fbf", "no kernel here")
        assert _impl.choose("fbf", None) is True
    with ops.use_impl("auto"):
        assert _impl.choose("fbf", "no kernel here") is False
        assert _impl.choose("fbf", None) is True
    with ops.use_impl("reference"):
        assert _impl.choose("fbf", None) is False


def test_triton_availability_probe(monkeypatch):
    """The kernel module's import-time flag decides, not the environment at the call."""
    from ifbf_fast.kernels import ohem_ce as K
    cpu = torch.zeros(1)
    assert _impl.triton_unavailable_reason(True, cpu) is None
    assert "CUDA" in _impl.triton_unavailable_reason(False, cpu)
    logits, target = torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    monkeypatch.setattr(K, "INTERPRETER", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")          # set now, after the import: changes nothing
    with ops.use_impl("fast"), pytest.raises(ops.FastPathUnavailable, match="TRITON_INTERPRET"):
        ops.ohem_cross_entropy(logits, target)


def test_use_impl_none_keeps_the_current_choice():
    with ops.use_impl("reference"):
        with ops.use_impl(None):
            assert ops.get_impl() == "reference"
    assert not _impl._stack


def test_train_does_not_leak_its_impl(tiny_city, tmp_path):
    """train(args) with --impl scopes it to the call (session-scoped fixtures train outside tests)."""
    from ifbf_fast.engine.config import parse_args
    from ifbf_fast.engine.trainer import train
    city = tiny_city
    before = (_impl._global, list(_impl._stack))
    train(parse_args(["--data", city, "--out", str(tmp_path / "o"), "--backbone", "resnet18", "--crop-size",
                      "32", "--batch-size", "2", "--workers", "0", "--iters", "1", "--warmup-iters", "0",
                      "--eval-every", "0", "--gpus", "0", "--impl", "reference", "--loader", "torch",
                      "--no-progress"]))
    assert (_impl._global, list(_impl._stack)) == before
