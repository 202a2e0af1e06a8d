"""Dilated ResNet: torchvision names, parameter counts, strides/dilations, forward equivalence with
torchvision, and load_pretrained (values land, clear errors)."""

import pytest
import torch
import torchvision

from ifbf_fast.models import ResNet, load_pretrained, resnet
from ifbf_fast.nn import InPlaceABNSync, norm_act


def _count(m):
    return sum(p.numel() for p in m.parameters())


def _tv(name):
    return getattr(torchvision.models, name)(weights=None)


def _tv_state_no_fc(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def test_parameter_counts_without_fc():
    assert _count(resnet("resnet50")) == 23_508_032
    assert _count(resnet("resnet101")) == 42_500_160
    for name in ("resnet18", "resnet34"):
        tv = _tv(name)
        assert _count(resnet(name)) == _count(tv) - _count(tv.fc)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101"])
def test_state_dict_names_and_shapes_are_torchvision(name):
    ours = resnet(name).state_dict()
    theirs = _tv_state_no_fc(_tv(name))
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_default_norm_is_sync_abn_with_identity_before_add():
    m = resnet("resnet50")
    assert isinstance(m.bn1, InPlaceABNSync) and m.bn1.activation == "leaky_relu"
    blk = m.layer2[0]
    assert blk.bn1.activation == blk.bn2.activation == "leaky_relu"
    assert blk.bn3.activation == "identity" and blk.downsample[1].activation == "identity"
    # v1.5: the stride sits on the 3x3.
    assert blk.conv1.stride == (1, 1) and blk.conv2.stride == (2, 2) and blk.downsample[0].stride == (2, 2)


@pytest.mark.parametrize("os_,s3,d3,s4,d4", [(16, 2, 1, 1, 2), (8, 1, 2, 1, 4), (32, 2, 1, 2, 1)])
def test_strides_and_dilations(os_, s3, d3, s4, d4):
    m = resnet("resnet50", output_stride=os_)
    assert m.layer3[0].conv2.stride == (s3, s3) and m.layer4[0].conv2.stride == (s4, s4)
    assert all(b.conv2.dilation == (d3, d3) and b.conv2.padding == (d3, d3) for b in m.layer3)
    assert all(b.conv2.dilation == (d4, d4) for b in m.layer4)


@pytest.mark.parametrize("os_,s4_size", [(32, (3, 4)), (16, (5, 7)), (8, (9, 13))])
def test_feature_sizes(os_, s4_size):
    m = resnet("resnet18", output_stride=os_, norm_act="abn", return_stages=(1, 2, 3, 4)).eval()
    s1, s2, s3, s4 = m(torch.randn(1, 3, 65, 97))
    assert s1.shape == (1, 64, 17, 25) and s2.shape == (1, 128, 9, 13)
    assert s4.shape[1] == 512 and tuple(s4.shape[-2:]) == s4_size


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_forward_equals_torchvision_with_batchnorm_relu(name):
    """Same weights, BatchNorm2d + ReLU, output stride 32: our layer4 is torchvision's, exactly."""
    tv = _tv(name).eval()
    with torch.no_grad():
        for mod in tv.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.2, 1.0)
                mod.bias.normal_(0, 0.1)
    ours = resnet(name, output_stride=32, norm_act=norm_act("bn_relu"), return_stages=(1, 4)).eval()
    ours.load_state_dict(_tv_state_no_fc(tv))
    x = torch.randn(1, 3, 64, 64)
    trunk = torch.nn.Sequential(*list(tv.children())[:-2])
    s1, s4 = ours(x)
    torch.testing.assert_close(s4, trunk(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s1, torch.nn.Sequential(*list(tv.children())[:5])(x), rtol=1e-4, atol=1e-4)


def test_load_pretrained_values_land(tmp_path):
    tv = _tv("resnet50")
    with torch.no_grad():
        for mod in tv.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
                mod.bias.normal_()
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    m = resnet("resnet50")
    assert load_pretrained(m, path) is m
    sd = m.state_dict()
    assert torch.equal(sd["conv1.weight"], tv.conv1.weight)
    assert torch.equal(sd["layer3.5.bn2.running_mean"], tv.layer3[5].bn2.running_mean)
    assert torch.equal(sd["layer4.0.downsample.1.bias"], tv.layer4[0].downsample[1].bias)
    assert int(sd["bn1.num_batches_tracked"]) == int(tv.bn1.num_batches_tracked)
    # Old torchvision checkpoints have no num_batches_tracked: they load too.
    old = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    load_pretrained(resnet("resnet50"), tmp_path / "old.pth")


def test_load_pretrained_errors(tmp_path):
    m = resnet("resnet50")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(m, tmp_path / "nope.pth")

    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth.*does not hold a state_dict"):
        load_pretrained(m, tmp_path / "list.pth")

    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pth.*not a loadable"):
        load_pretrained(m, tmp_path / "text.pth")

    torch.save(_tv("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError) as info:
        load_pretrained(m, tmp_path / "r18.pth")
    msg = str(info.value)
    assert "\n" not in msg and "r18.pth" in msg and "resnet50" in msg
    assert "missing: layer1.0.conv3.weight" in msg and "wrong shape" in msg

    sd = _tv("resnet50").state_dict()
    sd["layer2.0.conv1.weight"] = torch.zeros(1, 2, 3, 3)
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"1 unexpected: extra.weight; 1 wrong shape: layer2.0.conv1.weight"):
        load_pretrained(m, tmp_path / "bad.pth")
    # Nothing was loaded by a failed call.
    assert not torch.equal(m.state_dict()["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="output_stride"):
        resnet("resnet50", output_stride=4)
    with pytest.raises(ValueError, match="unknown backbone"):
        resnet("resnet152")
    assert isinstance(resnet("resnet18"), ResNet)
