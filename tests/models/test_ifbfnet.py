"""IFBFNet: exact parameter counts, output contract, ablation switches, OS8/OS16, param groups, builders."""

import itertools
import pathlib

import pytest
import torch
import torchvision

from ifbf_fast import ops
from ifbf_fast.models import ASPP, IFBFNet, build_model, param_groups
from ifbf_fast.nn import IFBFLoss, InPlaceABNSync


def _count(m):
    return sum(p.numel() for p in m.parameters())


def _fbf_params(high, low):
    c = high + low
    return c * c + c


def test_parameter_counts():
    assert _count(IFBFNet(backbone="resnet101")) == 60_017_190
    assert _count(IFBFNet(backbone="resnet50")) == 41_025_062


def test_structure_channels():
    m = IFBFNet(backbone="resnet50")
    assert isinstance(m.aspp, ASPP) and m.aspp.rates == (6, 12, 18)
    assert m.aspp.project.conv.in_channels == 1280 and m.aspp.dropout.p == 0.1
    assert (m.fbf1.high_channels, m.fbf1.low_channels, m.fbf2.low_channels) == (256, 64, 128)
    assert m.fuse[0].conv.in_channels == 320 and m.head.proj.conv.in_channels == 384
    assert m.head.cls.out_channels == 19 and m.head.cls.bias is not None
    assert m.aux_head.proj.conv.in_channels == 256 and m.aux_head.proj.conv.kernel_size == (3, 3)
    assert [c.conv.kernel_size for c in m.spatial] == [(7, 7), (3, 3), (1, 1)]
    assert [c.conv.stride for c in m.spatial] == [(2, 2), (2, 2), (1, 1)]
    convs = [mod for name, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d) and not name.endswith("cls")]
    assert all(c.bias is None for c in convs)
    assert isinstance(m.fuse[0].norm, InPlaceABNSync)


def test_forward_contract_and_odd_sizes():
    m = IFBFNet(backbone="resnet18", num_classes=7)
    x = torch.randn(2, 3, 65, 97)
    out = m(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 7, 65, 97)
    m.eval()
    with torch.no_grad():
        ev = m(x)
        assert set(ev) == {"out"} and ev["out"].shape == (2, 7, 65, 97)
        # Eval uses running statistics: a sample alone gives what it gives in the batch.
        torch.testing.assert_close(m(x[1:])["out"], ev["out"][1:], rtol=1e-4, atol=1e-4)
        assert m(torch.randn(1, 3, 33, 50))["out"].shape == (1, 7, 33, 50)


def test_logits_left_to_the_loss_to_upsample():
    # upsample_logits=False (train.py): training returns the heads' 1/4-resolution logits and the loss
    # upsamples them; the loss and every parameter gradient are those of the upsampling model.
    from ifbf_fast.nn import IFBFLoss

    torch.manual_seed(0)
    full = IFBFNet(backbone="resnet18", num_classes=5)
    low = IFBFNet(backbone="resnet18", num_classes=5, upsample_logits=False)
    low.load_state_dict(full.state_dict())
    x, target = torch.randn(2, 3, 61, 70), torch.randint(0, 5, (2, 61, 70))
    with torch.no_grad():
        out = low(x)
    assert out["out"].shape == out["aux"].shape == (2, 5, 16, 18)
    losses = []
    for m in (low, full):
        torch.manual_seed(1)                    # the same dropout mask in the ASPP
        losses.append(IFBFLoss()(m(x), target)["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    # the parameters up to the first of layer2, their gradients in one backward pass per model
    names, pa, pb = [], [], []
    for (name, a), b in zip(low.named_parameters(), full.parameters()):
        names.append(name)
        pa.append(a)
        pb.append(b)
        if name.startswith("backbone.layer2"):
            break
    for name, ga, gb in zip(names, torch.autograd.grad(losses[0], pa), torch.autograd.grad(losses[1], pb)):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6, msg=name)
    low.eval()
    with torch.no_grad():
        assert low(x)["out"].shape == (2, 5, 61, 70)


def test_model_calls_public_ops(monkeypatch):
    counts = {"fbf": 0, "inplace_abn": 0, "inplace_abn_ref": 0}
    for name in counts:
        real = getattr(ops, name)

        def spy(*a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(ops, name, spy)
    m = IFBFNet(backbone="resnet18", num_classes=3)
    m(torch.randn(2, 3, 33, 33))
    n_norms = sum(isinstance(mod, InPlaceABNSync) for mod in m.modules())
    assert counts["fbf"] == 2 and counts["inplace_abn"] == n_norms and n_norms > 20
    IFBFNet(backbone="resnet18", num_classes=3, norm_act="abn")(torch.randn(2, 3, 33, 33))
    assert counts["inplace_abn_ref"] == n_norms and counts["inplace_abn"] == n_norms


SWITCHES = list(itertools.product([True, False], repeat=4))


@pytest.mark.parametrize("aspp,skip,fbf,spatial", SWITCHES,
                         ids=["".join("AKFS"[i] if v else "-" for i, v in enumerate(s)) for s in SWITCHES])
def test_every_ablation_builds_runs_and_trains_all_parameters(aspp, skip, fbf, spatial):
    m = IFBFNet(num_classes=4, backbone="resnet18", aspp=aspp, skip=skip, fbf=fbf, spatial=spatial,
                norm_act="abn")
    x = torch.randn(2, 3, 33, 41)
    target = torch.randint(0, 4, (2, 33, 41))
    out = m(x)
    assert out["out"].shape == out["aux"].shape == (2, 4, 33, 41)
    IFBFLoss()(out, target)["loss"].backward()
    # Every parameter gets a gradient: no unused parameters (DDP would reject them).
    unused = [n for n, p in m.named_parameters() if p.grad is None]
    assert not unused
    assert hasattr(m, "fbf1") == skip and hasattr(m, "reduce_low") == skip
    assert hasattr(m, "fbf2") == spatial and hasattr(m, "spatial") == spatial
    assert isinstance(m.aspp, ASPP) == aspp
    assert m.fuse[0].conv.in_channels == (320 if skip else 256)
    assert m.head.proj.conv.in_channels == (256 + 128 if spatial else 256)


def test_ablation_parameter_differences():
    full = _count(IFBFNet(backbone="resnet50"))
    assert full - _count(IFBFNet(backbone="resnet50", fbf=False)) == _fbf_params(256, 64) + _fbf_params(256, 128)
    spatial_stream = 3 * 64 * 49 + 128 + 64 * 64 * 9 + 128 + 64 * 128 + 256
    assert full - _count(IFBFNet(backbone="resnet50", spatial=False)) == \
        spatial_stream + _fbf_params(256, 128) + 128 * 128
    assert full - _count(IFBFNet(backbone="resnet50", aux=False)) == 256 * 64 * 9 + 128 + 64 * 19 + 19
    aspp = 2048 * 256 * (1 + 27 + 1) + 1280 * 256 + 6 * 512  # 5 branches + projection, each +NA
    assert full - _count(IFBFNet(backbone="resnet50", aspp=False)) == aspp - (2048 * 256 + 512)
    skip = 256 * 64 * 9 + 128 + _fbf_params(256, 64) + 64 * 256 * 9
    assert full - _count(IFBFNet(backbone="resnet50", skip=False)) == skip
    wide = IFBFNet(backbone="resnet50", spatial_channels=16)
    assert wide.head.proj.conv.in_channels == 272 and wide.fbf2.channels == 272


def test_decoder_channels_sets_the_decoder_width():
    m = IFBFNet(backbone="resnet18", num_classes=3, decoder_channels=32, spatial_channels=16, norm_act="abn")
    assert m.fbf1.channels == 32 + 64 and m.fbf2.channels == 32 + 16
    assert m.fuse[1].conv.out_channels == 32 and m.head.proj.conv.in_channels == 48
    out = m(torch.randn(2, 3, 33, 33))
    assert out["out"].shape == (2, 3, 33, 33) and out["aux"].shape == (2, 3, 33, 33)
    assert IFBFNet(backbone="resnet18").fbf1.channels == 256 + 64        # the paper's D = 256 by default
    for bad in (0, -8, 2.5, True, "64"):
        with pytest.raises(ValueError, match="decoder_channels must be a positive integer"):
            IFBFNet(backbone="resnet18", decoder_channels=bad)


def test_no_aux_head():
    m = IFBFNet(backbone="resnet18", num_classes=3, aux=False, norm_act="abn")
    out = m(torch.randn(2, 3, 33, 33))
    assert set(out) == {"out"} and not hasattr(m, "aux_head")
    assert float(IFBFLoss()(out, torch.zeros(2, 33, 33, dtype=torch.long))["aux"]) == 0.0


@pytest.mark.parametrize("os_,rates,s4", [(16, (6, 12, 18), (5, 7)), (8, (12, 24, 36), (9, 13))])
def test_output_stride(os_, rates, s4):
    m = IFBFNet(backbone="resnet18", num_classes=3, output_stride=os_, norm_act="abn")
    assert m.aspp.rates == rates
    assert [b.conv.dilation[0] for b in m.aspp.branches[1:4]] == list(rates)
    seen = {}
    m.aspp.register_forward_hook(lambda mod, inp, out: seen.update(s4=inp[0].shape, high=out.shape))
    out = m(torch.randn(2, 3, 65, 97))
    assert tuple(seen["s4"][-2:]) == s4 and tuple(seen["high"]) == (2, 256) + s4
    assert out["out"].shape == (2, 3, 65, 97)
    with pytest.raises(ValueError, match="output_stride"):
        IFBFNet(backbone="resnet18", output_stride=32)


def test_param_groups():
    m = IFBFNet(backbone="resnet18")
    groups = param_groups(m, lr=0.01)
    assert [g["name"] for g in groups] == ["base", "10x"]
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.1)
    ten_x = {id(p) for p in groups[1]["params"]}
    expected = {id(p) for mod in (m.fbf1, m.fbf2, m.aux_head) for p in mod.parameters()}
    assert ten_x == expected and len(expected) == 4 + 5
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in m.parameters()}
    opt = torch.optim.SGD(m.param_groups(0.01), lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert [g["lr"] for g in opt.param_groups] == [0.01, pytest.approx(0.1)]
    # No FBF and no aux head: one group.
    assert len(param_groups(IFBFNet(backbone="resnet18", fbf=False, aux=False), 0.01)) == 1


def test_build_model_and_pretrained(tmp_path):
    m = build_model("ifbfnet_r18", num_classes=5, fbf=False)
    assert m.backbone.arch == "resnet18" and m.num_classes == 5 and not m.fbf1.enabled
    assert build_model({"name": "IFBFNet-R50", "output_stride": 8}).backbone.arch == "resnet50"
    import argparse
    ns = argparse.Namespace(model="r18", num_classes=3, lr=0.01, spatial_channels=None)
    assert build_model(ns).num_classes == 3
    with pytest.raises(ValueError, match="unknown model"):
        build_model("deeplab")
    with pytest.raises(TypeError, match="unknown IFBFNet arguments"):
        build_model("ifbfnet_r18", colour="red")

    tv = torchvision.models.resnet18(weights=None)
    torch.nn.init.normal_(tv.conv1.weight)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    m = IFBFNet(backbone="resnet18", pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(m.backbone.conv1.weight, tv.conv1.weight)


def test_models_never_import_kernels():
    """House rule: the model calls ifbf_fast.ops / ifbf_fast.nn only, never a kernel or the extension."""
    root = pathlib.Path(__file__).resolve().parents[2] / "ifbf_fast"
    for path in list((root / "models").glob("*.py")) + list((root / "nn").glob("*.py")):
        for line in path.read_text().splitlines():
            if "import" in line:
                assert "kernels" not in line and "_C" not in line and "inplace_abn_fast" not in line, (path, line)


def test_resizes_are_bilinear_without_align_corners():
    m = IFBFNet(backbone="resnet18", num_classes=3, norm_act="abn").eval()
    seen = {}
    m.aspp.register_forward_hook(lambda mod, inp, out: seen.update(high=out))
    m.fbf1.register_forward_hook(lambda mod, inp, out: seen.update(fbf1_high=inp[0]))
    m.head.register_forward_hook(lambda mod, inp, out: seen.update(head=out))
    m.aux_head.train().register_forward_hook(lambda mod, inp, out: seen.update(aux=out))
    with torch.no_grad():
        out = m(torch.randn(1, 3, 65, 97))["out"]
    up = torch.nn.functional.interpolate
    torch.testing.assert_close(seen["fbf1_high"], up(seen["high"], size=(17, 25), mode="bilinear",
                                                     align_corners=False))
    torch.testing.assert_close(out, up(seen["head"], size=(65, 97), mode="bilinear", align_corners=False))
    assert "aux" not in seen  # eval: the aux head is not even run
