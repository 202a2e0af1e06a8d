"""Losses: OHEM cross-entropy (paper eq. 5-7) and the IFBFNet training loss (paper eq. 8).

Both call ``ifbf_fast.ops.ohem_cross_entropy`` (fast Triton path or the reference, per the switch),
looked up on the module at call time.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from ifbf_fast import ops


class OHEMCrossEntropy(nn.Module):
    """OHEM cross-entropy: mean loss of the hardest ``keep_ratio`` of the valid pixels.

    ``thresh`` (e.g. 0.7, paper 4.3.4) additionally keeps every pixel whose true-class probability is
    below it. ``forward(logits (N,C,H,W), target (N,H,W) int) -> fp32 scalar``; 0.0 when no pixel is
    valid. See ``ifbf_fast.ops.ohem_cross_entropy`` for the exact definition. Logits smaller than the
    target are first upsampled to its size (bilinear, ``align_corners=False``, as the model's heads do),
    fused into the loss on the fast path (``ifbf_fast.ops.ohem_cross_entropy_upsampled``).
    """

    def __init__(self, keep_ratio: float = 0.75, thresh: Optional[float] = None, ignore_index: int = 255):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.thresh = thresh
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 4 and target.dim() == 3 and logits.shape[-2:] != target.shape[-2:]:
            if logits.shape[-2] > target.shape[-2] or logits.shape[-1] > target.shape[-1]:
                raise ValueError(f"OHEMCrossEntropy: logits {tuple(logits.shape)} are larger than the target "
                                 f"{tuple(target.shape)}; only lower-resolution logits are upsampled")
            return ops.ohem_cross_entropy_upsampled(logits, target, self.keep_ratio, self.thresh,
                                                    self.ignore_index)
        return ops.ohem_cross_entropy(logits, target, self.keep_ratio, self.thresh, self.ignore_index)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, thresh={self.thresh}, ignore_index={self.ignore_index}"


class IFBFLoss(nn.Module):
    """``loss = OHEM(out) + aux_weight * OHEM(aux)`` (paper eq. 8, lambda = 0.4).

    ``forward(outputs, target) -> {"loss": total, "out": OHEM(out), "aux": OHEM(aux)}``, all fp32
    scalars; backpropagate ``["loss"]``, log the other two (they are not detached).

    ``outputs`` is the model's output dict (``{"out": logits}`` plus ``"aux"`` in training, see
    ``ifbf_fast.models.IFBFNet``) or a bare logits tensor. Without aux logits (eval mode, a model built
    with ``aux=False``, or ``aux_weight=0``) the aux term is a zero and ``loss == out``. Logits at the
    target's size are used as they are; lower-resolution logits (a model built with
    ``upsample_logits=False``) are upsampled to it inside the loss, see :class:`OHEMCrossEntropy`.
    """

    def __init__(self, aux_weight: float = 0.4, keep_ratio: float = 0.75, thresh: Optional[float] = None,
                 ignore_index: int = 255):
        super().__init__()
        self.aux_weight = aux_weight
        self.ohem = OHEMCrossEntropy(keep_ratio, thresh, ignore_index)

    def forward(self, outputs: Union[Mapping[str, torch.Tensor], torch.Tensor],
                target: torch.Tensor) -> Dict[str, torch.Tensor]:
        if isinstance(outputs, torch.Tensor):
            outputs = {"out": outputs}
        loss_out = self.ohem(outputs["out"], target)
        aux = outputs.get("aux")
        if aux is not None and self.aux_weight != 0:
            loss_aux = self.ohem(aux, target)
            total = loss_out + self.aux_weight * loss_aux
        else:
            loss_aux = torch.zeros((), dtype=loss_out.dtype, device=loss_out.device)
            total = loss_out
        return {"loss": total, "out": loss_out, "aux": loss_aux}

    def extra_repr(self) -> str:
        return f"aux_weight={self.aux_weight}"
