"""FBF, the inter-level feature balanced fusion module (paper section 3.2, eq. 2-3; DESIGN section 2).

    x   = cat(high, low, dim=1)                      # C = high_channels + low_channels
    w   = sigmoid(conv1x1(avgpool(x)))                # (N, C, 1, 1): the balance weights W_h, W_l
    out = x * (1 + w)                                 # re-weighting plus the residual

The module holds the 1x1 convolution as a ``weight`` of shape ``(C, C, 1, 1)`` and a ``bias`` ``(C,)``
(nn.Conv2d's layout, so a checkpoint of a conv-based FBF loads) and calls ``ifbf_fast.ops.fbf``, which
takes the fused Triton path or the reference according to the implementation switch.

Initialisation: weight and bias start at zero. Then every balance weight is sigmoid(0) = 0.5 and FBF
starts as the plain concatenation scaled by 1.5, which the norm-act after it absorbs: the decoder
begins as the "FBF off" ablation and learns the re-weighting (the gradient of the weight is
dL/dw * w(1-w) * mean_hw(x), non-zero and different per channel, so there is no symmetry to break).
A random start would instead rescale the channels of an ImageNet-initialised network arbitrarily.

``enabled=False`` is the ablation "FBF off = plain concatenation" (paper Table 2): the module then
returns ``torch.cat`` and holds no parameters, so it neither changes the parameter count of the
concatenation baseline nor leaves unused parameters behind (which DDP would reject).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ifbf_fast import ops


def _common_dtype(high: torch.Tensor, low: torch.Tensor):
    """Bring ``high`` and ``low`` to one dtype. Under CUDA autocast, bilinear upsampling (the ASPP
    output on its way to FBF1) returns fp32 while convolutions return the autocast dtype; the fusion
    then runs in the autocast dtype, as the rest of the decoder does. Outside autocast the wider
    dtype wins, so nothing is rounded that the caller did not ask to round."""
    if high.dtype == low.dtype:
        return high, low
    device = high.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(high.dtype, low.dtype)
    return high.to(dtype), low.to(dtype)


class FBF(nn.Module):
    """``FBF(high_channels, low_channels, enabled=True)``; ``forward(high, low) -> (N, C, H, W)``.

    ``high`` and ``low`` must have the same batch size and spatial size (the caller upsamples);
    channels of ``high`` come first in the output, as in ``cat(high, low)``.
    """

    def __init__(self, high_channels: int, low_channels: int, enabled: bool = True):
        super().__init__()
        self.high_channels = high_channels
        self.low_channels = low_channels
        self.channels = high_channels + low_channels
        self.enabled = enabled
        if enabled:
            self.weight = nn.Parameter(torch.empty(self.channels, self.channels, 1, 1))
            self.bias = nn.Parameter(torch.empty(self.channels))
            self.reset_parameters()
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """Zero weight and bias: FBF starts as 1.5 x concatenation (see the module docstring)."""
        if self.enabled:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        if high.shape[1] != self.high_channels or low.shape[1] != self.low_channels:
            raise ValueError(f"FBF({self.high_channels}, {self.low_channels}): got high with {high.shape[1]} "
                             f"and low with {low.shape[1]} channels")
        high, low = _common_dtype(high, low)
        if not self.enabled:
            return torch.cat([high, low], dim=1)
        return ops.fbf(high, low, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"high_channels={self.high_channels}, low_channels={self.low_channels}" + \
            ("" if self.enabled else ", enabled=False (concatenation)")
