"""Losses: OHEM cross-entropy (paper eq. 5-7) and the IFBFNet training loss (paper eq. 8).

Both call ``ifbf_fast.ops.ohem_cross_entropy`` (fast Triton path or the reference, per the switch),
looked up on the module at call time. Targets are the loaders' labels as they come: uint8 (the batch
contract, ``ifbf_fast.data.classes.label_dtype``), int32 or int64. The fast kernels read them in their own
dtype, main and aux loss alike, so the training step never makes a widened copy; the reference widens
with ``.long()`` for ``gather``.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ifbf_fast import ops
from ifbf_fast.ops import ohem_ce, ohem_ce_upsampled


class OHEMCrossEntropy(nn.Module):
    """OHEM cross-entropy: mean loss of the hardest ``keep_ratio`` of the valid pixels.

    ``thresh`` (e.g. 0.7, paper 4.3.4) additionally keeps every pixel whose true-class probability is
    below it. ``forward(logits (N,C,H,W), target (N,H,W) uint8/int32/int64) -> fp32 scalar``; 0.0 when
    no pixel is valid. See ``ifbf_fast.ops.ohem_cross_entropy`` for the exact definition. Logits smaller than the
    target are first upsampled to its size (bilinear, ``align_corners=False``, as the model's heads do),
    fused into the loss on the fast path (``ifbf_fast.ops.ohem_cross_entropy_upsampled``).
    """

    def __init__(self, keep_ratio: float = 0.75, thresh: Optional[float] = None, ignore_index: int = 255):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.thresh = thresh
        self.ignore_index = ignore_index

    def _upsampled(self, logits: torch.Tensor, target: torch.Tensor) -> bool:
        if logits.dim() == 4 and target.dim() == 3 and logits.shape[-2:] != target.shape[-2:]:
            if logits.shape[-2] > target.shape[-2] or logits.shape[-1] > target.shape[-1]:
                raise ValueError(f"OHEMCrossEntropy: logits {tuple(logits.shape)} are larger than the target "
                                 f"{tuple(target.shape)}; only lower-resolution logits are upsampled")
            return True
        return False

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._upsampled(logits, target):
            return ops.ohem_cross_entropy_upsampled(logits, target, self.keep_ratio, self.thresh,
                                                    self.ignore_index)
        return ops.ohem_cross_entropy(logits, target, self.keep_ratio, self.thresh, self.ignore_index)

    def forward_with_bad_labels(self, logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(forward(logits, target), bad_labels)``: the second is a 0-d fp32 tensor on the logits' device,
        the number of labels outside ``[0, C)`` that are not ``ignore_index`` (no host read; 0 on the
        reference path, which raises ValueError on such a label)."""
        if self._upsampled(logits, target):
            return ohem_ce_upsampled.ohem_cross_entropy_upsampled_with_bad_labels(
                logits, target, self.keep_ratio, self.thresh, self.ignore_index)
        return ohem_ce.ohem_cross_entropy_with_bad_labels(logits, target, self.keep_ratio, self.thresh,
                                                          self.ignore_index)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, thresh={self.thresh}, ignore_index={self.ignore_index}"


class IFBFLoss(nn.Module):
    """``loss = OHEM(out) + aux_weight * OHEM(aux)`` (paper eq. 8, lambda = 0.4).

    ``forward(outputs, target) -> {"loss": total, "out": OHEM(out), "aux": OHEM(aux), "bad_labels": n}``,
    all 0-d fp32 tensors on the logits' device. Backpropagate ``["loss"]``, the only differentiable
    term; the others are detached, for logging. ``"bad_labels"`` is the number of target pixels outside
    ``[0, C)`` that are not ``ignore_index`` in this call: on the fast path such a label makes the loss
    NaN, and the count (taken from the kernels' state, no host read) lets a trainer name the cause at
    its next log interval instead of blaming the learning rate. On the reference path a bad label
    raises ``ValueError``, so there it is 0.

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
        loss_out, bad = self.ohem.forward_with_bad_labels(outputs["out"], target)
        aux = outputs.get("aux")
        if aux is not None and self.aux_weight != 0:
            loss_aux = self.ohem(aux, target)          # the same target: the same bad-label count
            total = loss_out + self.aux_weight * loss_aux
        else:
            loss_aux = torch.zeros((), dtype=loss_out.dtype, device=loss_out.device)
            total = loss_out
        return {"loss": total, "out": loss_out.detach(), "aux": loss_aux.detach(), "bad_labels": bad.detach()}

    def extra_repr(self) -> str:
        return f"aux_weight={self.aux_weight}"
