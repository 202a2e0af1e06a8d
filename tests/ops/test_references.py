"""The three reference ops (the specifications) on hand-computed cases and against plain PyTorch
(``same``: tests/ops/_compare.py, ``TOLERANCE["reference"]``)."""
import math

import pytest
import torch
import torch.nn.functional as F

from ifbf_fast.ops import fbf_ref, inplace_abn_ref, ohem_cross_entropy_ref

from ._compare import same


# --- FBF ------------------------------------------------------------------------------------------

def test_fbf_ref_hand_computed():
    high = torch.tensor([[[[1.0, 3.0]]]])            # (1, 1, 1, 2): mean 2
    low = torch.tensor([[[[-2.0, 0.0]]]])            # mean -1
    weight = torch.tensor([[0.5, 0.0], [1.0, 1.0]])  # (C, C), C = 2
    bias = torch.tensor([0.0, -1.0])
    out = fbf_ref(high, low, weight, bias)
    g0 = 1 / (1 + math.exp(-(0.5 * 2)))               # sigmoid(1)
    g1 = 1 / (1 + math.exp(-(2 - 1 - 1)))             # sigmoid(0) = 0.5
    expected = torch.tensor([[[[1 * (1 + g0), 3 * (1 + g0)]], [[-2 * (1 + g1), 0.0]]]])
    same(out, expected)


def test_fbf_ref_conv_weight_and_layout():
    high, low = torch.randn(2, 5, 4, 6), torch.randn(2, 3, 4, 6)
    w = torch.randn(8, 8, 1, 1)
    b = torch.randn(8)
    out = fbf_ref(high, low, w, b)
    x = torch.cat([high, low], 1)
    gate = torch.sigmoid(F.conv2d(F.adaptive_avg_pool2d(x, 1), w, b))
    same(out, x + x * gate)
    out_cl = fbf_ref(high.to(memory_format=torch.channels_last), low.to(memory_format=torch.channels_last), w, b)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    same(out_cl, out)


def test_fbf_ref_dtype_and_errors():
    high, low = torch.randn(1, 2, 3, 3, dtype=torch.bfloat16), torch.randn(1, 2, 3, 3, dtype=torch.bfloat16)
    assert fbf_ref(high, low, torch.randn(4, 4), torch.randn(4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"weight must be \(4, 4\)"):
        fbf_ref(high, low, torch.randn(3, 3), torch.randn(4))
    with pytest.raises(ValueError, match="agree in N, H and W"):
        fbf_ref(high, low[:, :, :2], torch.randn(4, 4), torch.randn(4))


# --- OHEM -----------------------------------------------------------------------------------------

def _pixel_losses(logits, target):
    return F.cross_entropy(logits.float(), target, reduction="none", ignore_index=255)


def test_ohem_ref_keeps_top_three_quarters():
    logits = torch.randn(2, 5, 3, 4)
    target = torch.randint(0, 5, (2, 3, 4))
    losses = _pixel_losses(logits, target).flatten()
    k = math.ceil(0.75 * 24)
    expected = losses.sort(descending=True).values[:k].mean()
    same(ohem_cross_entropy_ref(logits, target), expected)


def test_ohem_ref_keep_all_is_plain_cross_entropy_with_ignore():
    logits = torch.randn(2, 4, 5, 3)
    target = torch.randint(0, 4, (2, 5, 3))
    target[0, :2] = 255
    got = ohem_cross_entropy_ref(logits, target, keep_ratio=1.0)
    same(got, F.cross_entropy(logits, target, ignore_index=255))


def test_ohem_ref_threshold_union():
    # Four valid pixels with known losses: choose logits so p(true) is 0.9, 0.6, 0.5, 0.2.
    probs = torch.tensor([0.9, 0.6, 0.5, 0.2])
    logits = torch.stack([torch.log(probs), torch.log(1 - probs)], 0).view(1, 2, 1, 4)
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    losses = -torch.log(probs)
    # keep_ratio 0.25: k = 1 (the largest loss only); thresh 0.7 adds every p < 0.7: 3 pixels.
    got = ohem_cross_entropy_ref(logits, target, keep_ratio=0.25, thresh=0.7)
    same(got, losses[1:].mean())
    # Without thresh only the top one remains.
    same(ohem_cross_entropy_ref(logits, target, keep_ratio=0.25), losses[3])
    # When the top-k is larger than the hard set the union is the top-k.
    same(ohem_cross_entropy_ref(logits, target, keep_ratio=1.0, thresh=0.55), losses.mean())


def test_ohem_ref_ties_value_is_tie_independent():
    logits = torch.zeros(1, 3, 2, 3)          # every pixel has loss log(3)
    target = torch.randint(0, 3, (1, 2, 3))
    same(ohem_cross_entropy_ref(logits, target), torch.tensor(math.log(3)))


def test_ohem_ref_all_ignored_gives_zero_and_zero_grads():
    logits = torch.randn(1, 4, 3, 3, requires_grad=True)
    target = torch.full((1, 3, 3), 255)
    loss = ohem_cross_entropy_ref(logits, target)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_ohem_ref_gradient_only_on_kept_pixels():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.tensor([[[0, 1], [2, 255]]])
    loss = ohem_cross_entropy_ref(logits, target, keep_ratio=0.5)   # k = ceil(1.5) = 2 of 3 valid
    loss.backward()
    losses = _pixel_losses(logits.detach(), target).flatten()[:3]
    dropped = losses.argmin().item()
    grad = logits.grad.permute(0, 2, 3, 1).reshape(4, 3)
    assert torch.equal(grad[dropped], torch.zeros(3))
    assert torch.equal(grad[3], torch.zeros(3))
    assert all(grad[i].abs().sum() > 0 for i in range(3) if i != dropped)


def test_ohem_ref_bad_input():
    logits = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="label 7"):
        ohem_cross_entropy_ref(logits, torch.tensor([[[0, 7], [1, 255]]]))
    with pytest.raises(ValueError, match="does not match"):
        ohem_cross_entropy_ref(logits, torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="keep_ratio"):
        ohem_cross_entropy_ref(logits, torch.zeros(1, 2, 2, dtype=torch.long), keep_ratio=0.0)
    with pytest.raises(ValueError, match="integer"):
        ohem_cross_entropy_ref(logits, torch.zeros(1, 2, 2))


def test_ohem_ref_half_logits_large_magnitude():
    logits = (torch.randn(1, 3, 4, 4) * 1e4).half()
    target = torch.randint(0, 3, (1, 4, 4))
    loss = ohem_cross_entropy_ref(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --- InPlace-ABN ----------------------------------------------------------------------------------

def _bn_leaky(x, w, b, rm, rv, training, eps=1e-5, slope=0.01):
    return F.leaky_relu(F.batch_norm(x, rm, rv, w.abs() + eps, b, training, 0.1, eps), slope)


@pytest.mark.parametrize("training", [True, False])
def test_abn_ref_matches_batch_norm_with_abs_weight(training):
    x = torch.randn(3, 4, 5, 6) * 3 + 1
    w, b = torch.randn(4), torch.randn(4)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y = inplace_abn_ref(x, w, b, rm, rv, training)
    y2 = _bn_leaky(x, w, b, rm2, rv2, training)
    same(y, y2)
    same(rm, rm2)     # running mean
    same(rv, rv2)     # running var with the unbiased variance


def test_abn_ref_activations_and_hand_case():
    x = torch.tensor([[[-1.0]], [[1.0]]]).view(2, 1, 1)   # (N=2, C=1, L=1): mean 0, var 1
    w, b = torch.tensor([-2.0]), torch.tensor([0.5])
    rm, rv = torch.zeros(1), torch.ones(1)
    eps = 1e-5
    scale = (2 + eps) / math.sqrt(1 + eps)
    pre = torch.tensor([-scale + 0.5, scale + 0.5])
    y = inplace_abn_ref(x, w, b, rm, rv, True, eps=eps, activation="identity")
    same(y.flatten(), pre)
    y = inplace_abn_ref(x, w, b, rm.clone(), rv.clone(), True, eps=eps, activation="leaky_relu", slope=0.1)
    same(y.flatten(), F.leaky_relu(pre, 0.1))
    y = inplace_abn_ref(x, w, b, rm.clone(), rv.clone(), True, eps=eps, activation="elu")
    same(y.flatten(), F.elu(pre))
    # Running var takes the unbiased variance: 2 samples of +-1 -> 2.
    same(rv, torch.tensor([0.9 + 0.1 * 2.0]))


def test_abn_ref_low_precision_and_errors():
    x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    y = inplace_abn_ref(x, torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3), True)
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="invertible"):
        inplace_abn_ref(x, None, None, None, None, True, activation="relu")
    with pytest.raises(ValueError, match="slope must be > 0"):
        inplace_abn_ref(x, None, None, None, None, True, slope=0.0)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        inplace_abn_ref(x, torch.ones(4), None, None, None, True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        inplace_abn_ref(torch.randn(1, 3), None, None, None, None, True)


def test_ohem_ref_accepts_any_target_strides():
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 5, 4)).transpose(1, 2)      # not row-major
    same(ohem_cross_entropy_ref(logits, target), ohem_cross_entropy_ref(logits, target.contiguous()))
