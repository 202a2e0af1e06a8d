"""Models: dilated ResNet backbones (torchvision layout), ASPP, IFBFNet and its builders.

The models take a norm-act factory (``ifbf_fast.nn.norm_act``) and call only ``ifbf_fast.ops`` /
``ifbf_fast.nn``, never a kernel.
"""

from .aspp import ASPP, ASPPPooling, ConvNormAct, aspp_rates
from .ifbfnet import IFBFNet, build_model, param_groups
from .resnet import ARCHS, BasicBlock, Bottleneck, ResNet, load_pretrained, resnet, resolve_norm_act

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck", "ARCHS", "resnet", "load_pretrained", "resolve_norm_act",
    "ASPP", "ASPPPooling", "ConvNormAct", "aspp_rates", "IFBFNet", "build_model", "param_groups",
]
