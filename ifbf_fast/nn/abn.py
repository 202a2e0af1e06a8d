"""Norm-activation modules: ABN (reference), InPlaceABN, InPlaceABNSync, BatchNormAct2d, and the factory.

Every module here has exactly ``nn.BatchNorm2d``'s parameters and buffers (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), so ImageNet BatchNorm weights load into
them unchanged and any one of them swaps in for another (mapillary/inplace_abn's convention). The
three ABN modules compute

    y = act( (x - mean) / sqrt(var + eps) * (|weight| + eps) + bias )

and differ only in which op they call:

* ``ABN``            -> ``ifbf_fast.ops.inplace_abn_ref`` always (the reference users swap in to check);
* ``InPlaceABN``     -> ``ifbf_fast.ops.inplace_abn`` (fast path or reference, per the switch), no sync;
* ``InPlaceABNSync`` -> ``ifbf_fast.ops.inplace_abn`` with a process group; in a single process it is
  plain ``InPlaceABN``.

The ops are looked up on the ``ifbf_fast.ops`` module at call time (never imported by name), so the
implementation switch and test spies see every call.

``norm_act(kind, activation, slope)`` returns the factory the models take: ``factory(num_features)``
gives the norm-act layer, and ``factory(num_features, activation="identity")`` the norm without
activation (ResNet's bn3 / downsample before the residual add).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ifbf_fast import ops
from ifbf_fast.ops.inplace_abn import ACTIVATIONS as ABN_ACTIVATIONS  # the invertible ones
from ifbf_fast.ops.inplace_abn import apply_activation as activation_fn  # the activation by name, functional

BN_ACTIVATIONS = ("relu",) + ABN_ACTIVATIONS
# Whether torch was built with torch.distributed: asked once (InPlaceABNSync resolves its group per call).
_DIST_AVAILABLE = dist.is_available()


class ABN(nn.Module):
    """Activated batch norm, reference implementation (``ifbf_fast.ops.inplace_abn_ref``).

    Same constructor for all three ABN modules; ``affine=False`` keeps no weight/bias (scale 1,
    shift 0). Running statistics are always tracked: training normalises with the batch statistics
    and updates the running ones (unbiased variance, like BatchNorm2d), eval uses the running ones.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 activation: str = "leaky_relu", slope: float = 0.01):
        super().__init__()
        if activation not in ABN_ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: activation must be one of {ABN_ACTIVATIONS} "
                             f"(invertible; use norm_act('batchnorm', 'relu') for BatchNorm2d + ReLU); "
                             f"got {activation!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.activation = activation
        self.slope = slope
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    # The op each class calls, looked up on ``ifbf_fast.ops`` at call time (the switch and spies see it).
    _op_name = "inplace_abn_ref"

    def _group(self):
        """The process group of the batch statistics (``None``: this process only)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op increments num_batches_tracked in training, as BatchNorm2d.forward does: the reference
        # with add_(1), the fast C++/CUDA op inside the kernel that writes the running statistics (no
        # dispatcher call or launch of its own). In evaluation nothing is counted: None is passed, so
        # no compiled eval graph carries a mutation of the counter.
        # Parameters and buffers are read from their dicts: nn.Module.__getattr__ (the fallback after a
        # failed attribute lookup) costs about 1 us each on the CPU, 5 per call of a layer that runs 118
        # times per R101 step; the dicts are what __getattr__ reads, so assigned or swapped tensors
        # (FlatBuffers' views, load_state_dict, torch.func.functional_call) are seen alike.
        training = self.training
        p, b = self._parameters, self._buffers
        return getattr(ops, self._op_name)(x, p["weight"], p["bias"], b["running_mean"], b["running_var"],
                                           training, self.momentum, self.eps, self.activation, self.slope,
                                           group=self._group(),
                                           num_batches_tracked=b["num_batches_tracked"] if training else None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Old BatchNorm checkpoints (torchvision's original ImageNet ResNets among them) predate
        # num_batches_tracked; BatchNorm2d fills it with 0, and so do we, so they load strictly.
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        rep = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, " \
              f"activation={self.activation}"
        if self.activation == "leaky_relu":
            rep += f", slope={self.slope}"
        return rep


class InPlaceABN(ABN):
    """InPlace-ABN through ``ifbf_fast.ops.inplace_abn`` (fast C++/CUDA path or reference), unsynchronised."""

    _op_name = "inplace_abn"


class InPlaceABNSync(InPlaceABN):
    """InPlace-ABN-Sync: batch statistics over the union of every rank's batch in ``group``.

    ``group=None`` means the WORLD group when ``torch.distributed`` is initialised with more than one
    rank, else no synchronisation. It is resolved at every forward call, not at construction, so a
    model built before ``init_process_group`` (the usual order) still synchronises. Evaluation uses
    the running statistics and never communicates.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 activation: str = "leaky_relu", slope: float = 0.01, group=None):
        super().__init__(num_features, eps, momentum, affine, activation, slope)
        self.group = group

    def resolved_group(self):
        """The process group the statistics are reduced over, or ``None`` for no synchronisation."""
        if self.group is not None:
            return self.group
        if _DIST_AVAILABLE and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def _group(self):
        return self.resolved_group() if self.training else None


class BatchNormAct2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by an activation, in one module with BatchNorm2d's exact keys.

    The plain-PyTorch baseline for benchmarks and for users without the extension. Subclassing (not
    ``nn.Sequential``) keeps the state_dict keys ``weight``, ``bias``, ... instead of ``0.weight``,
    so torchvision checkpoints and ABN checkpoints load into it unchanged. Unlike ABN, the scale is
    the plain ``weight`` (not ``|weight| + eps``) and ``relu`` is allowed.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 activation: str = "leaky_relu", slope: float = 0.01):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        if activation not in BN_ACTIVATIONS:
            raise ValueError(f"BatchNormAct2d: activation must be one of {BN_ACTIVATIONS}; got {activation!r}")
        self.activation = activation
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation_fn(super().forward(x), self.activation, self.slope)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}" + \
            (f", slope={self.slope}" if self.activation == "leaky_relu" else "")


NORM_ACT_KINDS = {
    "inplace_abn_sync": InPlaceABNSync,
    "inplace_abn": InPlaceABN,
    "abn": ABN,
    "batchnorm": BatchNormAct2d,
}
# Accepted spellings; "bn_relu" / "bn_leaky_relu" also fix the activation (see norm_act).
_ALIASES = {"sync": "inplace_abn_sync", "inplace_abn_sync": "inplace_abn_sync", "iabn_sync": "inplace_abn_sync",
            "inplace_abn": "inplace_abn", "iabn": "inplace_abn", "abn": "abn",
            "batchnorm": "batchnorm", "bn": "batchnorm", "bn_relu": "batchnorm", "bn_leaky_relu": "batchnorm"}
_ALIAS_ACTIVATION = {"bn_relu": "relu", "bn_leaky_relu": "leaky_relu"}


class NormAct:
    """A norm-activation factory: ``factory(num_features, activation=None) -> nn.Module``.

    ``activation=None`` takes the factory's activation; ``"identity"`` gives the bare norm (used where
    a network has a norm without activation, e.g. before a residual add). ``act(x)`` applies the
    factory's activation functionally (ResNet's activation after the residual add). Picklable and
    comparable, so it can sit in saved arguments.
    """

    def __init__(self, kind: str = "inplace_abn_sync", activation: str = "leaky_relu", slope: float = 0.01,
                 eps: float = 1e-5, momentum: float = 0.1, group=None):
        self.cls = NORM_ACT_KINDS[kind]
        self.kind, self.activation, self.slope = kind, activation, slope
        self.eps, self.momentum, self.group = eps, momentum, group
        allowed = BN_ACTIVATIONS if self.cls is BatchNormAct2d else ABN_ACTIVATIONS
        if activation not in allowed:
            raise ValueError(f"norm_act({kind!r}): activation must be one of {allowed}; got {activation!r}")

    def __call__(self, num_features: int, activation: Optional[str] = None) -> nn.Module:
        kwargs = dict(eps=self.eps, momentum=self.momentum,
                      activation=self.activation if activation is None else activation, slope=self.slope)
        if self.cls is InPlaceABNSync:
            kwargs["group"] = self.group
        return self.cls(num_features, **kwargs)

    def act(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return activation_fn(x, self.activation, self.slope, inplace)

    def __repr__(self) -> str:
        return f"NormAct(kind={self.kind!r}, activation={self.activation!r}, slope={self.slope})"

    def __eq__(self, other) -> bool:
        return isinstance(other, NormAct) and (self.kind, self.activation, self.slope, self.eps,
                                                self.momentum, self.group) == \
            (other.kind, other.activation, other.slope, other.eps, other.momentum, other.group)

    def __hash__(self) -> int:
        return hash((self.kind, self.activation, self.slope, self.eps, self.momentum))


def norm_act(kind: str = "inplace_abn_sync", activation: Optional[str] = None, slope: float = 0.01,
             eps: float = 1e-5, momentum: float = 0.1, group=None) -> NormAct:
    """The norm-activation factory the models take.

    ``kind``: ``"inplace_abn_sync"`` (the paper's training set-up, the default; plain InPlace-ABN in
    one process), ``"inplace_abn"``, ``"abn"`` (the reference, to check the fast path), or
    ``"batchnorm"`` (``nn.BatchNorm2d`` + activation, the plain-PyTorch baseline). Shorthands:
    ``"bn_relu"`` (BatchNorm2d + ReLU, the torchvision/DeepLab default) and ``"bn_leaky_relu"``
    (BatchNorm2d + LeakyReLU, same activation as ABN: the benches' like-for-like baseline).
    ``activation`` defaults to ``"leaky_relu"`` (slope 0.01, as the paper's InPlace-ABN).
    A ``NormAct`` passed as ``kind`` is returned unchanged.
    """
    if isinstance(kind, NormAct):
        return kind
    key = str(kind).lower().replace("-", "_")
    if key not in _ALIASES:
        raise ValueError(f"norm_act: unknown kind {kind!r}; expected one of {sorted(_ALIASES)}")
    if key in _ALIAS_ACTIVATION:
        if activation is not None and activation != _ALIAS_ACTIVATION[key]:
            raise ValueError(f"norm_act: kind {kind!r} fixes activation={_ALIAS_ACTIVATION[key]!r}; "
                             f"got activation={activation!r} (use kind='batchnorm' to choose)")
        activation = _ALIAS_ACTIVATION[key]
    return NormAct(_ALIASES[key], activation or "leaky_relu", slope, eps, momentum, group)
