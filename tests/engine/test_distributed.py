"""Two gloo processes with DDP and InPlaceABNSync take the same first steps as one process on the
union batch (keep_ratio 1.0 and no ignored pixels, so both losses are the same mean)."""
import os

import pytest
import torch

from ifbf_fast.utils.dist import exit_worker, local_group

from tests._multiproc import spawn_ranks

TIMEOUT_S = 240
#: steps per implementation: two with the reference ops (momentum carried into a second step), one with
#: the fast paths (their synced statistics and gradients; each step under the Triton interpreter costs ~15 s)
STEPS = {"reference": 2, "auto": 1}


def _setup(impl):
    from ifbf_fast import ops
    from ifbf_fast.engine.step import FlatBuffers
    from ifbf_fast.engine.trainer import build_optimizer
    from ifbf_fast.engine.config import parse_args
    from ifbf_fast.models import build_model
    from ifbf_fast.nn import IFBFLoss, norm_act

    ops.set_impl(impl)
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet18", "norm_act": norm_act("inplace_abn_sync"),
                         "decoder_channels": 64, "spatial_channels": 16})   # narrow: faster interpreted FBFs
    for m in model.modules():          # dropout draws differ between 1 and 2 processes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    args = parse_args(["--lr", "0.01", "--iters", "10", "--warmup-iters", "1", "--data", "."])
    buffers = FlatBuffers(model)
    opt, sched = build_optimizer(model, args)
    loss = IFBFLoss(keep_ratio=1.0)
    g = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randn(4, 3, 32, 32, generator=g),
                "label": torch.randint(0, 19, (4, 32, 32), generator=g)} for _ in range(STEPS[impl])]
    return model, opt, sched, loss, batches, buffers


def _worker(rank, port, impl, out_dir):

    from ifbf_fast.engine.step import TrainStep
    with local_group(rank, 2, port, timeout_s=120):
        torch.set_num_threads(1)
        model, opt, sched, loss, batches, buffers = _setup(impl)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        step = TrainStep(ddp, model, loss, opt, sched, torch.device("cpu"), buffers=buffers)
        losses = []
        for b in batches:
            half = {k: v[2 * rank:2 * rank + 2] for k, v in b.items()}
            terms = step(half)
            losses.append(terms["loss"])
        if rank == 0:
            torch.save({"model": model.state_dict(), "losses": torch.stack(losses)}, os.path.join(out_dir, "r0.pt"))
    exit_worker()


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_two_processes_match_one_process_on_the_union_batch(tmp_path, impl):
    from ifbf_fast.engine.step import TrainStep

    spawn_ranks(_worker, (impl, str(tmp_path)), timeout_s=TIMEOUT_S - 30, what="DDP with InPlaceABNSync")

    model, opt, sched, loss, batches, buffers = _setup(impl)
    step = TrainStep(model, model, loss, opt, sched, torch.device("cpu"), buffers=buffers)
    losses = []
    for b in batches:
        losses.append(step(b)["loss"])
    two = torch.load(tmp_path / "r0.pt")
    # Each rank's loss is the mean over its own half; the union's is the mean of both halves.
    assert two["losses"].shape == (STEPS[impl],)
    one = model.state_dict()
    errs = {}
    for k, v in one.items():
        if v.is_floating_point():
            # Relative to the tensor's scale, with a floor: the norm biases stay ~1e-6 after two steps
            # (a following batch norm cancels a per-channel shift), where fp32 noise is ~1e-8.
            err = float((two["model"][k] - v).abs().max() / v.abs().max().clamp_min(1e-3))
            errs[k] = err
        else:
            assert torch.equal(two["model"][k], v), k
    bad = {k: f"{e:.1e}" for k, e in errs.items() if e >= 1e-4}
    assert not bad, bad
