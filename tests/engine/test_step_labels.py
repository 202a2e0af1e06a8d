"""The loaders' uint8 labels through the training step: the fast OHEM kernels receive the loader's
tensor itself (same dtype, same storage: no widening copy anywhere between the batch and the loss),
eager and compiled, through the fused x4 upsampling (the training default, ``upsample_logits=False``)
and the plain loss (logits at the label size). The net is a tiny stand-in whose main head is at 1/4
(fused) and its aux head at full size (plain), so that one step covers both kernels: only the labels'
path matters here, and the interpreter's cost of a fused call is paid once per step.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ifbf_fast import ops
from ifbf_fast.data import build_loader
from ifbf_fast.engine.step import TrainStep, fused_sgd
from ifbf_fast.kernels import ohem_ce as K
from ifbf_fast.kernels import ohem_ce_upsampled as KU
from ifbf_fast.nn import IFBFLoss

CPU = torch.device("cpu")
CROP = 16


class _Heads(torch.nn.Module):
    """``{"out": 1/out_factor of the image, "aux": full size}`` logits of 19 classes."""

    def __init__(self, out_factor: int = 4):
        super().__init__()
        self.out_factor = out_factor
        self.out = torch.nn.Conv2d(3, 19, 1)
        self.aux = torch.nn.Conv2d(3, 19, 1)

    def forward(self, x):
        low = torch.nn.functional.avg_pool2d(x, self.out_factor) if self.out_factor > 1 else x
        return {"out": self.out(low), "aux": self.aux(x)}


@pytest.fixture(scope="module")
def batch(tiny_city):
    loader = build_loader(tiny_city, "train", batch_size=2, crop_size=CROP, workers=0, seed=1)
    loader.set_epoch(0)
    b = next(iter(loader))
    assert b["label"].dtype == torch.uint8 and b["label"].shape == (2, CROP, CROP)
    return b


class _Spy:
    """Wraps the OHEM launchers (looked up on the kernels modules at call time) and records the dtype
    and storage of every target they receive."""

    def __init__(self, monkeypatch):
        self.targets = []
        for module, names in ((K, ("ohem_ce_fwd", "ohem_ce_bwd")), (KU, ("ohem_ce_up_fwd", "ohem_ce_up_bwd"))):
            for name in names:
                monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, fn):
        def launcher(*args):
            target = args[1] if name.endswith("fwd") else args[2]
            self.targets.append((name, target.dtype, target.untyped_storage().data_ptr()))
            return fn(*args)
        return launcher


class _Conversions(TorchDispatchMode):
    """Every aten op that takes a uint8 tensor and returns a tensor of another dtype (a widening)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if any(t.dtype == torch.uint8 for t in ins) and any(o.dtype not in (torch.uint8, torch.bool) for o in outs):
            self.seen.append(str(func))
        return out


# one step: the main loss (fused, with the bad-label count) and the aux loss (plain), forward and backward
LAUNCHERS = ["ohem_ce_bwd", "ohem_ce_fwd", "ohem_ce_up_bwd", "ohem_ce_up_fwd"]


def _step():
    torch.manual_seed(0)
    net = _Heads()
    return TrainStep(net, net, IFBFLoss(), fused_sgd(net.parameters(), 0.01, 0.9, 0.0), None, CPU)


def test_fast_ohem_receives_the_loaders_uint8_labels_unconverted(batch, monkeypatch):
    spy = _Spy(monkeypatch)
    step = _step()
    storage = batch["label"].untyped_storage().data_ptr()
    with ops.use_impl("fast"), _Conversions() as conversions:
        terms = step(batch)
    assert torch.isfinite(terms["loss"]) and float(terms["skipped"]) == 0.0
    # out (fused) and aux (plain), forward and backward, each handed the batch's own uint8 storage
    assert sorted(n for n, _, _ in spy.targets) == LAUNCHERS, spy.targets
    assert all(d == torch.uint8 and p == storage for _, d, p in spy.targets), spy.targets
    assert conversions.seen == [], conversions.seen


@pytest.mark.slow
def test_compiled_step_takes_uint8_labels_without_a_graph_break(batch, monkeypatch):
    """--compile: forward and loss in one graph (fullgraph: a break raises) on uint8 labels, and the
    custom ops hand the kernels uint8 targets."""
    import torch._dynamo as dynamo

    spy = _Spy(monkeypatch)
    step = _step()
    dynamo.reset()
    step.forward_loss = torch.compile(step._forward_loss, fullgraph=True, backend="aot_eager")
    with ops.use_impl("fast"):
        terms = step(batch)
    assert torch.isfinite(terms["loss"]) and float(terms["skipped"]) == 0.0
    assert sorted(n for n, _, _ in spy.targets) == LAUNCHERS, spy.targets
    assert all(d == torch.uint8 for _, d, _ in spy.targets), spy.targets


def test_reference_loss_and_bad_label_error_with_uint8_labels(batch):
    """The reference widens (F.cross_entropy's int64) and gives the fast path's value; a uint8 label
    >= C that is not 255 still raises the reference's one-line error naming it."""
    net = _Heads(out_factor=1)        # both losses plain: the cheaper kernels under the interpreter
    with torch.no_grad():
        outputs = net(batch["image"])
    loss = IFBFLoss()
    with ops.use_impl("reference"):
        want = loss(outputs, batch["label"].long())
        got = loss(outputs, batch["label"])
    assert torch.equal(got["loss"], want["loss"])
    with ops.use_impl("fast"):
        fast = loss(outputs, batch["label"])
    assert torch.allclose(fast["loss"], want["loss"], rtol=1e-5, atol=1e-6)
    bad = batch["label"].clone()
    bad[1, 5, 7] = 19
    with ops.use_impl("reference"), pytest.raises(ValueError, match=r"target holds label 19, outside \[0, 19\) "
                                                                   r"and not ignore_index=255"):
        loss(outputs, bad)
    with ops.use_impl("fast"):
        terms = loss(outputs, bad)
    assert torch.isnan(terms["loss"]) and float(terms["bad_labels"]) == 1.0
