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
    from ifbf_fast.ops import ohem_ce, ohem_ce_upsampled

    low, target = torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 16, 16))
    calls = []
    monkeypatch.setattr(ops, "ohem_cross_entropy_upsampled", lambda *a: calls.append(a) or torch.tensor(0.0))
    OHEMCrossEntropy(0.5, 0.7, 9)(low, target)
    assert calls[0][2:] == (0.5, 0.7, 9)
    monkeypatch.undo()
    # "auto" where the fused kernels cannot run: upsample, then the dispatching OHEM (fast where it can)
    seen = []
    monkeypatch.setattr(ohem_ce_upsampled, "_fast_upsampled_unavailable", lambda *a: "no fused kernels here")
    monkeypatch.setattr(ohem_ce, "ohem_cross_entropy", lambda x, *a: seen.append(tuple(x.shape)) or x.sum())
    with ops.use_impl("auto"):
        ops.ohem_cross_entropy_upsampled(low, target)
    assert seen == [(1, 3, 16, 16)]
    with ops.use_impl("fast"), pytest.raises(ops.FastPathUnavailable, match="no fused kernels here"):
        ops.ohem_cross_entropy_upsampled(low, target)


def test_ifbf_loss_terms_only_loss_is_differentiable_and_bad_labels_is_zero_on_reference():
    logits, target = _batch()
    logits.requires_grad_()
    aux = torch.randn_like(logits, requires_grad=True)
    with ops.use_impl("reference"):
        terms = IFBFLoss()({"out": logits, "aux": aux}, target)
    assert set(terms) == {"loss", "out", "aux", "bad_labels"}
    assert terms["loss"].requires_grad
    for key in ("out", "aux", "bad_labels"):
        assert not terms[key].requires_grad, key
        assert terms[key].dtype == torch.float32 and terms[key].shape == () and terms[key].device == logits.device
    assert float(terms["bad_labels"]) == 0.0
    bad = target.clone()
    bad[1, 2, 3] = 5                       # C = 5: outside [0, C)
    with ops.use_impl("reference"), pytest.raises(ValueError, match="label 5"):
        IFBFLoss()({"out": logits, "aux": aux}, bad)


@pytest.mark.parametrize("low_res", [False, True])
def test_ifbf_loss_counts_bad_labels_on_the_fast_path_without_a_host_read(low_res):
    from ifbf_fast.utils.launches import forbid_host_reads

    if low_res:                            # the fused-upsampling path (x4)
        logits = torch.randn(2, 5, 3, 4) * 3
        target = torch.randint(0, 5, (2, 12, 16))
    else:
        logits, target = _batch()
    logits.requires_grad_()
    aux = torch.randn_like(logits, requires_grad=True)
    target[0, 0, :3] = torch.tensor([5, -1, 99])        # three bad labels (255 stays ignored)
    target[1, 1, 1] = 255
    with ops.use_impl("fast"), forbid_host_reads():
        terms = IFBFLoss()({"out": logits, "aux": aux}, target)
        terms["loss"].backward()
    assert terms["bad_labels"].dtype == torch.float32 and terms["bad_labels"].shape == ()
    assert not terms["bad_labels"].requires_grad and not terms["out"].requires_grad
    assert float(terms["bad_labels"]) == 3.0
    assert torch.isnan(terms["loss"])      # the NaN the count explains
    good = target.clone()
    good[0, 0, :3] = 0
    with ops.use_impl("fast"):
        terms = IFBFLoss()({"out": logits.detach(), "aux": aux.detach()}, good.to(torch.uint8))
    assert float(terms["bad_labels"]) == 0.0 and torch.isfinite(terms["loss"])
