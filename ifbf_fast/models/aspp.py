"""ASPP (DeepLabV3 atrous spatial pyramid pooling; paper section 2.2 and 4.3.1, docs/DESIGN.md section 1).

Five parallel branches on the backbone's last stage, each ``in_channels -> 256`` followed by a
norm-act: a 1x1 conv, three 3x3 atrous convs (rates 6, 12, 18 at output stride 16, doubled at output
stride 8 so that the receptive field in input pixels stays the same, as in DeepLabV3), and image
pooling (global average pool, 1x1 conv, norm-act, bilinear upsample back). The concatenation
(5 x 256 = 1280) is projected by a 1x1 conv to 256 + norm-act, then dropout 0.1.

The image-pooling branch normalises a 1x1 map: in training it needs more than one sample per
(synchronised) batch, as torchvision's DeepLabV3 does.

``ConvNormAct`` (conv without bias + norm-act) is the building block the whole decoder uses.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvNormAct(nn.Sequential):
    """``conv(bias=False) -> norm_act``; children ``conv`` and ``norm``. Padding keeps the size."""

    def __init__(self, cin: int, cout: int, kernel_size: int, norm_act: Callable[..., nn.Module],
                 stride: int = 1, dilation: int = 1):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, dilation=dilation,
                              bias=False)
        self.norm = norm_act(cout)


class ASPPPooling(nn.Module):
    """Image-level features: global average pool, 1x1 conv + norm-act, bilinear upsample back."""

    def __init__(self, cin: int, cout: int, norm_act: Callable[..., nn.Module]):
        super().__init__()
        self.proj = ConvNormAct(cin, cout, 1, norm_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(F.adaptive_avg_pool2d(x, 1))
        # From a 1x1 map bilinear (align_corners=False) is a broadcast; kept as interpolate for clarity.
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def aspp_rates(output_stride: int) -> tuple:
    """DeepLabV3's atrous rates: (6, 12, 18) at output stride 16, scaled by 16 / output_stride."""
    if output_stride not in (8, 16):
        raise ValueError(f"ASPP: output_stride must be 8 or 16; got {output_stride}")
    return tuple(r * 16 // output_stride for r in (6, 12, 18))


class ASPP(nn.Module):
    """``ASPP(in_channels, norm_act, out_channels=256, rates=(6, 12, 18), dropout=0.1)``.

    ``forward(x (N, in, h, w)) -> (N, out, h, w)``. Branch order in the concatenation: 1x1, the
    atrous convs by increasing rate, image pooling (as torchvision's DeepLabV3).
    """

    def __init__(self, in_channels: int, norm_act: Callable[..., nn.Module], out_channels: int = 256,
                 rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1):
        super().__init__()
        self.rates = tuple(rates)
        branches = [ConvNormAct(in_channels, out_channels, 1, norm_act)]
        branches += [ConvNormAct(in_channels, out_channels, 3, norm_act, dilation=r) for r in self.rates]
        branches.append(ASPPPooling(in_channels, out_channels, norm_act))
        self.branches = nn.ModuleList(branches)
        self.project = ConvNormAct(out_channels * len(branches), out_channels, 1, norm_act)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.dropout(self.project(y))
