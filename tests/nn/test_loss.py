"""OHEMCrossEntropy and IFBFLoss against ohem_cross_entropy_ref and plain cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from ifbf_fast import ops
from ifbf_fast.nn import IFBFLoss, OHEMCrossEntropy
from ifbf_fast.ops import ohem_cross_entropy_ref


def _batch(n=2, c=5, h=6, w=7):
    logits = torch.randn(n, c, h, w) * 3
    target = torch.randint(0, c, (n, h, w))
    target[0, :2] = 255
    return logits, target


@pytest.mark.parametrize("keep_ratio,thresh", [(0.75, None), (0.3, None), (0.75, 0.7), (1.0, None)])
def test_ohem_module_matches_reference(keep_ratio, thresh):
    logits, target = _batch()
    got = OHEMCrossEntropy(keep_ratio, thresh)(logits, target)
    torch.testing.assert_close(got, ohem_cross_entropy_ref(logits, target, keep_ratio, thresh, 255), rtol=1e-5, atol=1e-6)


def test_ohem_keep_all_is_cross_entropy():
    logits, target = _batch()
    got = OHEMCrossEntropy(keep_ratio=1.0)(logits, target)
    torch.testing.assert_close(got, F.cross_entropy(logits, target, ignore_index=255))
    # Keeping fewer pixels keeps the harder ones: the mean can only grow.
    assert OHEMCrossEntropy(keep_ratio=0.25)(logits, target) > got


def test_ohem_ignore_index_and_routing(monkeypatch):
    logits, target = _batch()
    target[target == 255] = 0
    target[target == 1] = 7
    torch.testing.assert_close(OHEMCrossEntropy(ignore_index=7)(logits, target),
                               ohem_cross_entropy_ref(logits, target, 0.75, None, 7))
    calls = []
    monkeypatch.setattr(ops, "ohem_cross_entropy", lambda *a: calls.append(a) or torch.tensor(0.0))
    OHEMCrossEntropy(0.5, 0.7, 9)(logits, target)
    assert calls[0][2:] == (0.5, 0.7, 9)


def test_ifbf_loss_total_and_terms():
    logits, target = _batch()
    aux = torch.randn_like(logits)
    out = IFBFLoss()({"out": logits, "aux": aux}, target)
    l_out = ohem_cross_entropy_ref(logits, target)
    l_aux = ohem_cross_entropy_ref(aux, target)
    torch.testing.assert_close(out["out"], l_out)
    torch.testing.assert_close(out["aux"], l_aux)
    torch.testing.assert_close(out["loss"], l_out + 0.4 * l_aux)
    out = IFBFLoss(aux_weight=1.0, keep_ratio=0.5, thresh=0.7)({"out": logits, "aux": aux}, target)
    torch.testing.assert_close(out["loss"], ohem_cross_entropy_ref(logits, target, 0.5, 0.7)
                               + ohem_cross_entropy_ref(aux, target, 0.5, 0.7))


def test_ifbf_loss_without_aux_and_backward():
    logits, target = _batch()
    logits.requires_grad_()
    for outputs in ({"out": logits}, logits):
        res = IFBFLoss()(outputs, target)
        assert float(res["aux"]) == 0.0
        torch.testing.assert_close(res["loss"], ohem_cross_entropy_ref(logits, target))
    res["loss"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_lower_resolution_logits_are_upsampled_inside_the_loss():
    # A model built with upsample_logits=False hands the heads' 1/4-resolution logits to the loss; the
    # loss of their bilinear upsampling is the loss the model's own upsampling gave.
    low = (torch.randn(2, 5, 4, 5) * 3).requires_grad_()
    aux = (torch.randn(2, 5, 4, 5) * 3).requires_grad_()
    target = torch.randint(0, 5, (2, 16, 20))
    target[1, :3] = 255

    def up(t):
        return F.interpolate(t, size=(16, 20), mode="bilinear", align_corners=False)

    got = IFBFLoss()({"out": low, "aux": aux}, target)
    grads = torch.autograd.grad(got["loss"], (low, aux))
    want = IFBFLoss()({"out": up(low), "aux": up(aux)}, target)
    want_grads = torch.autograd.grad(want["loss"], (low, aux))
    for k in ("loss", "out", "aux"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="larger than the target"):
        OHEMCrossEntropy()(torch.randn(2, 5, 32, 40), target)


def test_upsampled_loss_routes_through_the_switch(monkeypatch):
    from ifbf_fast.ops import ohem_ce

    low, target = torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 16, 16))
    calls = []
    monkeypatch.setattr(ops, "ohem_cross_entropy_upsampled", lambda *a: calls.append(a) or torch.tensor(0.0))
    OHEMCrossEntropy(0.5, 0.7, 9)(low, target)
    assert calls[0][2:] == (0.5, 0.7, 9)
    monkeypatch.undo()
    # "auto" where the fused kernels cannot run: upsample, then the dispatching OHEM (fast where it can)
    seen = []
    monkeypatch.setattr(ohem_ce, "_fast_upsampled_unavailable", lambda *a: "no fused kernels here")
    monkeypatch.setattr(ohem_ce, "ohem_cross_entropy", lambda x, *a: seen.append(tuple(x.shape)) or x.sum())
    with ops.use_impl("auto"):
        ops.ohem_cross_entropy_upsampled(low, target)
    assert seen == [(1, 3, 16, 16)]
    with ops.use_impl("fast"), pytest.raises(ops.FastPathUnavailable, match="no fused kernels here"):
        ops.ohem_cross_entropy_upsampled(low, target)
