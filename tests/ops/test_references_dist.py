"""The reference InPlace-ABN-Sync over two gloo processes equals one process on the union batch."""
import os

import pytest
import torch

from ifbf_fast.ops import inplace_abn_ref
from ifbf_fast.utils.dist import exit_worker, local_group

from tests._multiproc import spawn_ranks
from tests.ops._compare import same

TIMEOUT_S = 120


def _worker(rank, port, sizes, x_all, w, b, dy_all, out_dir):
    import torch.distributed as dist
    with local_group(rank, 2, port, timeout_s=60):
        start = sum(sizes[:rank])
        x = x_all[start:start + sizes[rank]].clone().requires_grad_(True)
        wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        rm, rv = torch.zeros(w.shape[0]), torch.ones(w.shape[0])
        y = inplace_abn_ref(x, wl, bl, rm, rv, True, group=dist.group.WORLD)
        (y * dy_all[start:start + sizes[rank]]).sum().backward()
        torch.save({"y": y.detach(), "dx": x.grad, "dw": wl.grad, "db": bl.grad, "rm": rm, "rv": rv},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    exit_worker()


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("sizes", [(3, 1), (4, 0)])
def test_sync_reference_equals_union_batch(tmp_path, sizes):
    c = 3
    x_all = torch.randn(sum(sizes), c, 4, 5, dtype=torch.float64) * 2 + 0.5
    dy_all = torch.randn_like(x_all)
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    spawn_ranks(_worker, (sizes, x_all, w, b, dy_all, str(tmp_path)), timeout_s=TIMEOUT_S - 10, what="the synchronised reference")

    # Single process on the union batch: the same statistics, so the same outputs and gradients;
    # weight and bias gradients of the union are the sum of the ranks' (DDP would all-reduce them).
    x = x_all.clone().requires_grad_(True)
    wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y = inplace_abn_ref(x, wl, bl, rm, rv, True)
    (y * dy_all).sum().backward()
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    same(torch.cat([p["y"] for p in parts]), y.detach())
    same(torch.cat([p["dx"] for p in parts]), x.grad)
    same(parts[0]["dw"] + parts[1]["dw"], wl.grad)
    same(parts[0]["db"] + parts[1]["db"], bl.grad)
    for p in parts:
        same(p["rm"], rm.float())
        same(p["rv"], rv.float())


def test_reference_gradcheck_float64():
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    for act in ("leaky_relu", "elu", "identity"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: inplace_abn_ref(x, w, b, None, None, True, activation=act, slope=0.1), (x, w, b))
