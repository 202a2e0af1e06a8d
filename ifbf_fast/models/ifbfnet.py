"""IFBFNet (Li et al., Sensors 2021), exactly docs/DESIGN.md section 1, with the ablation switches of Table 2.

    S1, S4 = backbone(image)                               # 256 ch 1/4, 2048 ch 1/16 (R50/R101)
    H      = aspp(S4)                                      # 256 ch 1/16
    F      = fbf1(up(H -> S1 size), reduce_low(S1))        # 256 + 64 = 320 ch 1/4
    D      = fuse(F)                                       # 3x3 320->256 +NA, 3x3 256->256 +NA
    G      = fbf2(D, spatial(image))                       # 256 + 128 = 384 ch 1/4
    out    = up(head(G) -> image size)                     # 1x1 384->128 +NA, 1x1 128->classes (bias)
    aux    = up(aux_head(S1) -> image size)                # 3x3 256->64 +NA, 1x1 64->classes (bias)

All resizes are bilinear with ``align_corners=False``.

Forward contract: ``model(images) -> dict``. ``"out"``: logits ``(N, classes, H, W)`` at the input
size. ``"aux"``: aux logits of the same shape, present only in training mode and only when the
model has an aux head (``aux=True``). ``ifbf_fast.nn.IFBFLoss`` consumes this dict directly.
With ``upsample_logits=False`` (what train.py builds), training mode returns both at the heads' own
resolution (1/4 of the input) and the loss does the bilinear upsampling, the same function: its fast
path fuses it into the OHEM kernels and never stores full-size logits (ops.ohem_cross_entropy_upsampled).
Eval mode always returns full-size logits.

Ablation switches (paper Table 2 / Table 3). Every combination builds and runs:

* ``aspp=False``: the ASPP is replaced by ``1x1 conv in->256 +NA`` (still called ``aspp``), so the
  decoder sees the same 256 channels (paper Baseline1 = the dilated ResNet without ASPP).
* ``skip=False``: no low-level branch: no ``reduce_low`` and no ``fbf1``; ``H`` is upsampled to S1's
  size and the fuse convs take 256 channels (``3x3 256->256 +NA`` twice). The decoder, spatial stream
  and head are unchanged, so "skip off" isolates the skip connection.
* ``fbf=False``: both FBFs become plain concatenation (``FBF(enabled=False)``, no parameters).
* ``spatial=False``: no spatial stream and no ``fbf2``; the head takes ``D`` (``1x1 256->128 +NA``).
* ``spatial_channels``: the width of the spatial stream's last conv (Table 3: 16..256).
* ``decoder_channels``: the decoder width D (ASPP output, fuse convs, both FBFs' high input; the
  paper's 256, the default). Narrower is for quick experiments and the tests: the FBFs' channel
  counts are D + 64 and D + ``spatial_channels``.
* ``aux=False``: no aux head (and no ``"aux"`` output).

With every switch off, the network is backbone -> 1x1 reduce -> upsample x4 -> two 3x3 convs -> head,
the closest runnable counterpart of the paper's Baseline1 (which upsampled the backbone's prediction
directly).

Initialisation: the backbone as torchvision (or ImageNet weights with ``pretrained=<local path>``);
decoder convs followed by a norm Kaiming-normal (fan_out, as torchvision); the two classifiers
normal(0, 0.01) with zero bias (mmsegmentation's ``conv_seg``), so the first logits are near uniform;
FBF zero (see ``ifbf_fast.nn.fbf``).
"""

from __future__ import annotations

import argparse
import inspect
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ifbf_fast.nn import FBF

from .aspp import ASPP, ConvNormAct, aspp_rates
from .resnet import ARCHS, NormActArg, load_pretrained, resnet, resolve_norm_act

HIGH_CHANNELS = 256      # ASPP output and the decoder width D
LOW_CHANNELS = 64        # reduced S1
HEAD_CHANNELS = 128      # head's hidden width
AUX_CHANNELS = 64        # aux head's hidden width
SPATIAL_MID = 64         # spatial stream's first two convs


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class IFBFNet(nn.Module):
    """IFBFNet; see the module docstring for the structure, the switches and the output dict."""

    def __init__(self, num_classes: int = 19, backbone: str = "resnet101", output_stride: int = 16,
                 spatial_channels: int = 128, aspp: bool = True, skip: bool = True, fbf: bool = True,
                 spatial: bool = True, aux: bool = True, norm_act: NormActArg = None,
                 pretrained: Optional[str] = None, upsample_logits: bool = True,
                 decoder_channels: int = HIGH_CHANNELS):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"IFBFNet: output_stride must be 8 or 16; got {output_stride}")
        if isinstance(decoder_channels, bool) or not isinstance(decoder_channels, int) or decoder_channels < 1:
            raise ValueError(f"IFBFNet: decoder_channels must be a positive integer; got {decoder_channels!r}")
        d = decoder_channels
        na = resolve_norm_act(norm_act)
        self.num_classes, self.output_stride = num_classes, output_stride
        self.switches = dict(aspp=aspp, skip=skip, fbf=fbf, spatial=spatial, aux=aux)
        self.upsample_logits = upsample_logits

        self.backbone = resnet(backbone, output_stride, na, return_stages=(1, 4))
        s1_ch, s4_ch = self.backbone.out_channels[1], self.backbone.out_channels[4]
        if aspp:
            self.aspp = ASPP(s4_ch, na, d, rates=aspp_rates(output_stride), dropout=0.1)
        else:
            self.aspp = ConvNormAct(s4_ch, d, 1, na)

        if skip:
            self.reduce_low = ConvNormAct(s1_ch, LOW_CHANNELS, 3, na)
            self.fbf1 = FBF(d, LOW_CHANNELS, enabled=fbf)
        fuse_in = d + LOW_CHANNELS if skip else d
        self.fuse = nn.Sequential(ConvNormAct(fuse_in, d, 3, na),
                                  ConvNormAct(d, d, 3, na))

        if spatial:
            self.spatial = nn.Sequential(ConvNormAct(3, SPATIAL_MID, 7, na, stride=2),
                                         ConvNormAct(SPATIAL_MID, SPATIAL_MID, 3, na, stride=2),
                                         ConvNormAct(SPATIAL_MID, spatial_channels, 1, na))
            self.fbf2 = FBF(d, spatial_channels, enabled=fbf)
        head_in = d + spatial_channels if spatial else d
        self.head = nn.Sequential(OrderedDict(
            proj=ConvNormAct(head_in, HEAD_CHANNELS, 1, na),
            cls=nn.Conv2d(HEAD_CHANNELS, num_classes, 1)))
        if aux:
            self.aux_head = nn.Sequential(OrderedDict(
                proj=ConvNormAct(s1_ch, AUX_CHANNELS, 3, na),
                cls=nn.Conv2d(AUX_CHANNELS, num_classes, 1)))

        self._init_decoder()
        if pretrained is not None:
            load_pretrained(self.backbone, pretrained)

    def _init_decoder(self) -> None:
        for name, m in self.named_modules():
            if name.startswith("backbone") or not isinstance(m, nn.Conv2d):
                continue
            if name.endswith(".cls"):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        size = images.shape[-2:]
        s1, s4 = self.backbone(images)
        high = _up(self.aspp(s4), s1.shape[-2:])
        if self.switches["skip"]:
            x = self.fbf1(high, self.reduce_low(s1))
        else:
            x = high
        x = self.fuse(x)
        if self.switches["spatial"]:
            sp = self.spatial(images)
            if sp.shape[-2:] != x.shape[-2:]:  # equal for every input size (both are ceil(ceil(H/2)/2))
                sp = _up(sp, x.shape[-2:])
            x = self.fbf2(x, sp)
        # upsample_logits=False: training leaves the upsampling to the loss (see the module docstring)
        up = _up if self.upsample_logits or not self.training else (lambda t, _size: t)
        result = {"out": up(self.head(x), size)}
        if self.training and self.switches["aux"]:
            result["aux"] = up(self.aux_head(s1), size)
        return result

    def ten_x_modules(self) -> List[nn.Module]:
        """The modules trained at 10x the base learning rate (paper 4.1): the aux head and the FBFs."""
        mods = [m for m in self.modules() if isinstance(m, FBF)]
        if self.switches["aux"]:
            mods.append(self.aux_head)
        return mods

    def param_groups(self, lr: float, lr_mult: float = 10.0) -> List[Dict[str, Any]]:
        """See :func:`param_groups`."""
        return param_groups(self, lr, lr_mult)


def param_groups(model: nn.Module, lr: float, lr_mult: float = 10.0) -> List[Dict[str, Any]]:
    """Optimizer parameter groups with the paper's 10x learning rate for the aux head and the FBFs.

    Returns ``[{"name": "base", "params": [...], "lr": lr, "lr_mult": 1.0},
    {"name": "10x", "params": [...], "lr": lr * lr_mult, "lr_mult": lr_mult}]`` (a group with no
    parameters is left out). Every trainable parameter is in exactly one group. A poly schedule should
    scale each group's own ``lr`` (``LambdaLR`` does), or use ``base_lr * group["lr_mult"]``.
    ``model`` is an IFBFNet, or any module: then every ``FBF`` and a child named ``aux_head`` go at 10x.
    """
    if isinstance(model, IFBFNet):
        fast_mods = model.ten_x_modules()
    else:
        fast_mods = [m for m in model.modules() if isinstance(m, FBF)]
        if isinstance(getattr(model, "aux_head", None), nn.Module):
            fast_mods.append(model.aux_head)
    fast_ids = {id(p) for m in fast_mods for p in m.parameters()}
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in fast_ids]
    fast = [p for p in model.parameters() if p.requires_grad and id(p) in fast_ids]
    groups = [dict(name="base", params=base, lr=lr, lr_mult=1.0),
              dict(name="10x", params=fast, lr=lr * lr_mult, lr_mult=lr_mult)]
    return [g for g in groups if g["params"]]


_SHORT = {"r18": "resnet18", "r34": "resnet34", "r50": "resnet50", "r101": "resnet101"}


def _parse_name(name: str) -> Dict[str, Any]:
    key = name.lower().replace("-", "_")
    if key.startswith("ifbfnet_"):
        key = key[len("ifbfnet_"):]
    key = _SHORT.get(key, key)
    if key not in ARCHS:
        raise ValueError(f"build_model: unknown model {name!r}; expected ifbfnet_r18/r34/r50/r101 "
                         f"(or a backbone name {sorted(ARCHS)})")
    return {"backbone": key}


def build_model(name_or_args: Union[str, Mapping[str, Any], argparse.Namespace] = "ifbfnet_r101",
                **overrides: Any) -> IFBFNet:
    """Build an IFBFNet from a name, a dict of arguments, or an argparse namespace.

    * ``build_model("ifbfnet_r50", num_classes=19, output_stride=8)`` (names: ``ifbfnet_r18``,
      ``_r34``, ``_r50``, ``_r101``, also ``IFBFNet-R101`` or a bare backbone name);
    * ``build_model({"backbone": "resnet50", "fbf": False})``; a ``"name"`` / ``"model"`` key is
      parsed as above;
    * ``build_model(args)`` with an argparse namespace: its attributes named like IFBFNet's arguments
      are used, the others ignored.

    ``overrides`` win over everything else. Unknown keys in a dict or in ``overrides`` raise.
    """
    accepted = set(inspect.signature(IFBFNet.__init__).parameters) - {"self"}
    kwargs: Dict[str, Any] = {}
    if isinstance(name_or_args, str):
        kwargs.update(_parse_name(name_or_args))
    elif isinstance(name_or_args, argparse.Namespace):
        ns = vars(name_or_args)
        for k in ("model", "name", "arch"):
            if isinstance(ns.get(k), str):
                kwargs.update(_parse_name(ns[k]))
                break
        kwargs.update({k: v for k, v in ns.items() if k in accepted and v is not None})
    elif isinstance(name_or_args, Mapping):
        args = dict(name_or_args)
        for k in ("model", "name", "arch"):
            if k in args:
                kwargs.update(_parse_name(args.pop(k)))
        kwargs.update(args)
    else:
        raise TypeError(f"build_model: expected a name, a dict or an argparse.Namespace; got "
                        f"{type(name_or_args).__name__}")
    kwargs.update(overrides)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"build_model: unknown IFBFNet arguments {unknown}; accepted: {sorted(accepted)}")
    return IFBFNet(**kwargs)
