"""Dilated ResNet-18/34/50/101 backbones with torchvision's layout, names and parameter counts.

Module and parameter names are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``, blocks with
``conv1..3`` / ``bn1..3`` and ``downsample.0`` (conv) / ``downsample.1`` (norm)), bottleneck v1.5
(stride on the 3x3), no ``fc`` and no avgpool, so an ImageNet torchvision state_dict loads with
:func:`load_pretrained` and the parameter count is torchvision's minus ``fc``.

Every norm comes from the ``norm_act`` factory (``ifbf_fast.nn.norm_act``): a norm followed by ReLU
in torchvision becomes one norm-act layer; a norm without activation (``bn2`` of a basic block,
``bn3`` of a bottleneck, the downsample norm, all before the residual add) is built with
``activation="identity"`` and the factory's activation is applied after the add, as in mapillary
inplace_abn's ResNet.

Dilation: ``output_stride`` 16 gives layer3 stride 2 and layer4 stride 1 with dilation 2 (paper 4.3.1:
"dilations (1,2), strides (2,1) in the last two stages"); 8 gives layer3 stride 1 dilation 2 and
layer4 stride 1 dilation 4; 32 is the classification network. Every block of a dilated stage uses the
stage's dilation (DeepLab / mmsegmentation / mapillary convention; torchvision instead keeps the
previous dilation in the first block). Parameter counts do not depend on it.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from ifbf_fast.nn import NormAct, activation_fn, norm_act as make_norm_act

NormActArg = Union[None, str, NormAct, Callable[..., nn.Module]]


def resolve_norm_act(norm_act: NormActArg) -> Callable[..., nn.Module]:
    """``None`` -> InPlace-ABN-Sync with leaky_relu 0.01 (the paper's set-up); a kind name -> its
    factory; a ``NormAct`` or any callable ``f(num_features, activation=None)`` is used as is."""
    if norm_act is None:
        return make_norm_act("inplace_abn_sync")
    if isinstance(norm_act, str):
        return make_norm_act(norm_act)
    return norm_act


def _post_add_act(norm_act, x: torch.Tensor) -> torch.Tensor:
    """The factory's activation after the residual add (leaky_relu 0.01 for a bare callable).

    In place: ``x`` is the fresh sum, so autograd keeps only the activation's output instead of the
    sum and the output (measured by bench/memory_account.py: ~1.1 GB of an R101 step at crop 876).
    """
    act = getattr(norm_act, "act", None)
    return act(x, inplace=True) if act is not None else activation_fn(x, "leaky_relu", 0.01, inplace=True)


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: Optional[nn.Module],
                 norm_act):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_act(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_act(planes, activation="identity")
        self.downsample = downsample
        self.norm_act = norm_act  # a plain object, not a module: no state_dict entry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return _post_add_act(self.norm_act, out + identity)


class Bottleneck(nn.Module):
    """Bottleneck v1.5: the stride sits on the 3x3 (``conv2``), as torchvision's."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: Optional[nn.Module],
                 norm_act):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_act(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_act(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_act(planes * self.expansion, activation="identity")
        self.downsample = downsample
        self.norm_act = norm_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        return _post_add_act(self.norm_act, out + identity)


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}
# (stride, dilation) of layer3 and layer4 for each output stride.
_STAGE_CONFIG = {32: ((2, 1), (2, 1)), 16: ((2, 1), (1, 2)), 8: ((1, 2), (1, 4))}


class ResNet(nn.Module):
    """``ResNet(block, layers, output_stride=16, norm_act=None, return_stages=(1, 4))``.

    ``forward(x) -> tuple`` of the feature maps of the stages named in ``return_stages`` (1 = layer1,
    1/4 resolution, ..., 4 = layer4), in that order. IFBFNet takes ``(S1, S4)``.
    """

    def __init__(self, block: Type[nn.Module], layers: Sequence[int], output_stride: int = 16,
                 norm_act: NormActArg = None, return_stages: Sequence[int] = (1, 4)):
        super().__init__()
        if output_stride not in _STAGE_CONFIG:
            raise ValueError(f"ResNet: output_stride must be one of {sorted(_STAGE_CONFIG)}; got {output_stride}")
        if not return_stages or any(s not in (1, 2, 3, 4) for s in return_stages):
            raise ValueError(f"ResNet: return_stages must name stages 1..4; got {return_stages}")
        norm_act = resolve_norm_act(norm_act)
        self.output_stride = output_stride
        self.return_stages = tuple(return_stages)
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_act(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        (s3, d3), (s4, d4) = _STAGE_CONFIG[output_stride]
        self.layer1 = self._make_layer(block, 64, layers[0], 1, 1, norm_act)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, 1, norm_act)
        self.layer3 = self._make_layer(block, 256, layers[2], s3, d3, norm_act)
        self.layer4 = self._make_layer(block, 512, layers[3], s4, d4, norm_act)
        self.out_channels = {i + 1: c * block.expansion for i, c in enumerate((64, 128, 256, 512))}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's init; pretrained weights overwrite it
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int, dilation: int, norm_act) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_act(planes * block.expansion, activation="identity"))
        layers: List[nn.Module] = [block(self.inplanes, planes, stride, dilation, downsample, norm_act)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation, None, norm_act) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.maxpool(self.bn1(self.conv1(x)))
        feats = []
        last = max(self.return_stages)
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            x = layer(x)
            feats.append(x)
            if i == last:  # later stages are not needed: skip their compute
                break
        return tuple(feats[s - 1] for s in self.return_stages)


def resnet(name: str = "resnet101", output_stride: int = 16, norm_act: NormActArg = None,
           return_stages: Sequence[int] = (1, 4)) -> ResNet:
    """Build ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101`` (randomly initialised)."""
    if name not in ARCHS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(ARCHS)}")
    block, layers = ARCHS[name]
    model = ResNet(block, layers, output_stride, norm_act, return_stages)
    model.arch = name
    return model


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> ResNet:
    """Load an ImageNet torchvision ResNet state_dict from the local file ``path`` into ``model``.

    ``model`` is a :class:`ResNet`, or a network holding one as ``.backbone`` (IFBFNet). ``fc.*`` is
    dropped; BatchNorm keys land on the norm-act modules' identical keys (a missing
    ``num_batches_tracked``, as in torchvision's original checkpoints, is filled with 0 as BatchNorm
    does). Every other key must match in name and shape: anything else raises a one-line error naming
    the file (``FileNotFoundError`` for a missing file, ``ValueError`` otherwise). Returns the ResNet.
    """
    backbone = model if isinstance(model, ResNet) else getattr(model, "backbone", None)
    if not isinstance(backbone, ResNet):
        raise TypeError(f"load_pretrained: expected a ResNet or a model with a ResNet .backbone; got "
                        f"{type(model).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_pretrained: no such file {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a non-torch file, pickled objects weights_only refuses
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"load_pretrained: {path!r} is not a loadable torch state_dict ({msg})") from exc
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"load_pretrained: {path!r} does not hold a state_dict (a dict of name -> tensor); "
                         f"got {type(state).__name__}" + (f" with keys {list(state)[:5]}" if isinstance(state, dict)
                                                         else ""))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                   if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {what}: {', '.join(keys[:5])}{more}")
        raise ValueError(f"load_pretrained: {path!r} does not match this {getattr(backbone, 'arch', 'ResNet')} "
                         f"(fc.* ignored): " + "; ".join(parts))
    backbone.load_state_dict(state, strict=True)
    return backbone
