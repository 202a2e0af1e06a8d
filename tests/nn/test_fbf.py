"""The FBF module: parameters, initialisation, values, the ablation switch, routing through ops.fbf."""

import pytest
import torch

from ifbf_fast import ops
from ifbf_fast.nn import FBF


def test_parameters_and_zero_init_is_scaled_concatenation():
    m = FBF(5, 3)
    assert m.weight.shape == (8, 8, 1, 1) and m.bias.shape == (8,)
    assert sum(p.numel() for p in m.parameters()) == 8 * 8 + 8
    high, low = torch.randn(2, 5, 4, 6), torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(m(high, low), 1.5 * torch.cat([high, low], 1))


def test_values_match_hand_computation():
    m = FBF(4, 2)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    high, low = torch.randn(3, 4, 5, 7), torch.randn(3, 2, 5, 7)
    x = torch.cat([high, low], 1)
    gate = torch.sigmoid(x.mean((2, 3)) @ m.weight.view(6, 6).t() + m.bias)
    torch.testing.assert_close(m(high, low), x * (1 + gate[:, :, None, None]))


def test_zero_init_still_learns():
    m = FBF(4, 2)
    high = torch.randn(2, 4, 3, 3) + 1.0
    low = torch.randn(2, 2, 3, 3)
    (m(high, low) * torch.randn(2, 6, 3, 3)).sum().backward()
    assert m.weight.grad.abs().sum() > 0 and m.bias.grad.abs().sum() > 0
    # Different rows get different gradients: no symmetry to break.
    assert not torch.allclose(m.weight.grad[0], m.weight.grad[1])


def test_disabled_is_plain_concatenation_without_parameters():
    m = FBF(5, 3, enabled=False)
    assert list(m.parameters()) == []
    high, low = torch.randn(2, 5, 4, 6), torch.randn(2, 3, 4, 6)
    assert torch.equal(m(high, low), torch.cat([high, low], 1))


def test_calls_public_op(monkeypatch):
    calls = []
    real = ops.fbf
    monkeypatch.setattr(ops, "fbf", lambda *a: calls.append(a) or real(*a))
    m = FBF(2, 2)
    m(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2))
    assert len(calls) == 1 and calls[0][2] is m.weight and calls[0][3] is m.bias


def test_wrong_channels_raise():
    with pytest.raises(ValueError, match="FBF\\(5, 3\\)"):
        FBF(5, 3)(torch.randn(1, 4, 2, 2), torch.randn(1, 3, 2, 2))


def test_mixed_dtypes_under_autocast_fuse_in_the_autocast_dtype():
    """CUDA autocast upsamples in fp32 while convs give bf16: FBF must accept the pair (checked on CPU
    with the dtypes CUDA autocast would produce)."""
    from ifbf_fast.nn import FBF
    m = FBF(4, 3)
    torch.nn.init.normal_(m.weight, std=0.1)
    high, low = torch.randn(2, 4, 5, 6), torch.randn(2, 3, 5, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(high, low)
    assert out.dtype == torch.bfloat16
    expected = m(high.bfloat16().float(), low.float())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    assert m(high, low).dtype == torch.float32          # outside autocast: the wider dtype
    assert FBF(4, 3, enabled=False)(high, low).dtype == torch.float32
