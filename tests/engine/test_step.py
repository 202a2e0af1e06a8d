"""The sync-free training step (ifbf_fast/engine/step.py): no host read inside a step, and a step with a
non-finite loss or gradient leaves every piece of training state bitwise as it was."""
import contextlib

import pytest
import torch

from ifbf_fast import ops
from ifbf_fast.engine.config import parse_args
from ifbf_fast.engine.step import FlatBuffers, TrainStep
from ifbf_fast.engine.trainer import build_optimizer
from ifbf_fast.models import build_model
from ifbf_fast.nn import IFBFLoss, norm_act
from ifbf_fast.utils.launches import HostReadError, forbid_host_reads

CPU = torch.device("cpu")


def _setup(norm="inplace_abn_sync", fp16=False, momentum=0.9):
    torch.manual_seed(0)
    # A narrow decoder (D = 64) and spatial stream (16): the FBFs have 128 and 80 channels, not 320 and
    # 384, so the interpreted FBF kernels (the bulk of a step's time here) take a fraction; every fast
    # path still runs.
    model = build_model({"backbone": "resnet18", "norm_act": norm_act(norm), "upsample_logits": False,
                         "decoder_channels": 64, "spatial_channels": 16})
    model.train()
    args = parse_args(["--lr", "0.01", "--iters", "10", "--warmup-iters", "2", "--data", ".",
                       "--momentum", str(momentum)])
    buffers = FlatBuffers(model)
    opt, schedule = build_optimizer(model, args)
    step = TrainStep(model, model, IFBFLoss(), opt, schedule, CPU, fp16=fp16, buffers=buffers)
    return model, opt, step


def _batch(seed, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 19, (n, size, size), generator=g)
    label[:, :3] = 255
    return {"image": torch.randn(n, 3, size, size, generator=g), "label": label}


def _state(model, opt, step):
    """Everything a step may change, cloned: weights, momentum, buffers, lr, schedule, loss scale."""
    out = {f"p.{k}": v.detach().clone() for k, v in model.named_parameters()}
    out.update({f"b.{k}": v.clone() for k, v in model.named_buffers()})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        out[f"m.{i}"] = opt.state[p]["momentum_buffer"].clone()
    out.update({f"lr.{i}": g["lr"].clone() for i, g in enumerate(opt.param_groups)})
    out["taken"] = step.schedule.taken.clone()
    if step.loss_scale is not None:
        out["scale"], out["growth"] = step.loss_scale.scale.clone(), step.loss_scale.growth_tracker.clone()
    return out


def _assert_same(a, b):
    diff = [k for k in a if not torch.equal(a[k], b[k]) and not (a[k].isnan().all() and b[k].isnan().all())]
    assert not diff, diff[:10]


@pytest.mark.parametrize("norm", ["inplace_abn_sync", "bn"])
@pytest.mark.parametrize("poison", ["inf_pixel", "nan_gradient"])
def test_a_nonfinite_step_changes_nothing(norm, poison):
    """One inf pixel writes NaN into every running statistic during the forward; a hook turns one
    gradient into NaN with a finite loss. Either way nothing of the training state may change."""
    model, opt, step = _setup(norm)
    with ops.use_impl("reference"):
        step(_batch(1))                          # a good step first: momentum buffers are non-zero
        before = _state(model, opt, step)
        bad = _batch(2)
        handle = None
        if poison == "inf_pixel":
            bad["image"][0, 0, 5, 5] = float("inf")
        else:
            handle = next(model.parameters()).register_hook(lambda g: g * float("nan"))
        terms = step(bad)
        if handle is not None:
            handle.remove()
    assert float(terms["skipped"]) == 1.0
    _assert_same(before, _state(model, opt, step))
    counters = step.read_counters()
    assert counters["skipped"] == 1 and counters["max_consecutive"] == 1 and counters["steps"] == 2
    with ops.use_impl("reference"):
        terms = step(_batch(3))                  # and training goes on from there
    assert float(terms["skipped"]) == 0.0 and int(step.schedule.taken) == 2
    after = _state(model, opt, step)
    assert not torch.equal(after["m.0"], before["m.0"])
    assert step.read_counters()["consecutive"] == 0


def test_a_skipped_step_matches_not_having_seen_the_batch():
    """good, bad, good == good, good: the skipped step is invisible, bitwise (each step seeds the
    dropout RNG itself, as the trainer does)."""
    results = []
    for with_bad in (False, True):
        model, opt, step = _setup()
        with ops.use_impl("reference"):
            torch.manual_seed(1)
            step(_batch(1))
            if with_bad:
                bad = _batch(9)
                bad["image"][1, 2, 0, 0] = float("nan")
                step(bad)
            torch.manual_seed(3)
            step(_batch(3))
        results.append(_state(model, opt, step))
    _assert_same(results[0], results[1])


def test_fp16_loss_scale_halves_on_a_bad_step_and_is_exact_otherwise():
    """The device loss scale (a power of two) scales and unscales gradients exactly: good steps match
    the unscaled run bitwise; a bad step halves the scale and changes nothing else."""
    ref_model, ref_opt, ref_step = _setup()
    model, opt, step = _setup(fp16=True)
    with ops.use_impl("reference"):
        for s in (1, 2):
            torch.manual_seed(s)
            ref_step(_batch(s))
            torch.manual_seed(s)
            step(_batch(s))
        a, b = _state(ref_model, ref_opt, ref_step), _state(model, opt, step)
        del b["scale"], b["growth"]
        _assert_same(a, b)
        scale = float(step.loss_scale.scale)
        before = _state(model, opt, step)
        bad = _batch(5)
        bad["image"][0, 0, 0, 0] = float("inf")
        step(bad)
    after = _state(model, opt, step)
    assert float(step.loss_scale.scale) == scale / 2
    del before["scale"], after["scale"], before["growth"], after["growth"]
    _assert_same(before, after)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_the_step_reads_nothing_on_the_host(amp):
    """Every fast path (Triton FBF and OHEM under the interpreter, the C++ InPlace-ABN) in several
    steps with .item(), bool(), tolist(), nonzero(), .cpu() and _local_scalar_dense made to raise."""
    model, opt, step = _setup()
    if amp == "bf16":
        step.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    batches = [_batch(s, size=32) for s in range(3)]
    batches[1]["image"][0, 0, 0, 0] = float("inf")        # a skipped step is decided on the device too
    with ops.use_impl("fast"), forbid_host_reads():
        for b in batches:
            step(b)
    counters = step.read_counters()
    assert counters == {"skipped": 1, "consecutive": 0, "max_consecutive": 1, "bad_labels": 0, "steps": 3}


def test_forbid_host_reads_catches_a_read():
    with forbid_host_reads(), pytest.raises(HostReadError, match="item"):
        torch.ones(2).sum().item()
    with forbid_host_reads(), pytest.raises(HostReadError):
        bool(torch.ones(()) > 0)
    with forbid_host_reads(), pytest.raises(HostReadError):
        torch.ones(3).nonzero()


def test_flat_buffers_keep_state_dict_and_views():
    model = build_model({"backbone": "resnet18", "norm_act": norm_act("bn_leaky_relu")})
    keys = dict(model.state_dict())
    flat = FlatBuffers(model)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in keys.items()}
    for k, v in model.named_buffers():
        assert any(v.untyped_storage().data_ptr() == f.untyped_storage().data_ptr() for f in flat.flats), k
    model.load_state_dict(keys)                     # copies in place: the views survive
    for _, v in model.named_buffers():
        assert any(v.untyped_storage().data_ptr() == f.untyped_storage().data_ptr() for f in flat.flats)


def test_train_step_refuses_an_optimizer_that_cannot_skip_on_the_device():
    model = torch.nn.Conv2d(3, 2, 1)
    with pytest.raises(ValueError, match="fused=True"):
        TrainStep(model, model, lambda o, y: {"loss": o.sum()}, torch.optim.SGD(model.parameters(), lr=0.1),
                  None, CPU, contextlib.nullcontext)


@pytest.mark.slow
def _capturing_aot_eager(graphs: list):
    """aot_eager that keeps every forward and backward graph AOTAutograd hands it."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _cudagraph_blocker(gm):
    """The first node inductor's CUDA-graph trees would refuse (torch._inductor.utils), or None."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node
    return get_first_incompatible_cudagraph_node(gm)


def test_cudagraph_check_sees_a_host_read():
    """The check used below does flag what breaks a capture: a data-dependent shape (nonzero)."""
    import torch._dynamo as dynamo
    dynamo.reset()
    graphs = []
    f = torch.compile(lambda x: torch.nonzero(x > 0).float().sum() * x, backend=_capturing_aot_eager(graphs),
                      fullgraph=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        f(torch.randn(8, requires_grad=True)).sum().backward()
    assert graphs and any(_cudagraph_blocker(gm) is not None for gm in graphs)
    dynamo.reset()


def test_compiled_step_has_no_graph_break_and_matches_eager():
    """train.py --compile: forward and loss in one graph (zero breaks, every fast op), the backward
    through AOTAutograd; aot_eager keeps the kernels, so the state after two steps matches eager; and
    neither graph holds a node that would keep CUDA graphs (--compile-mode reduce-overhead) from
    capturing it."""
    import torch._dynamo as dynamo
    model, opt, step = _setup()
    batch = _batch(1)
    with ops.use_impl("fast"):
        explanation = dynamo.explain(step._forward_loss)(batch["image"], batch["label"])
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    # Dropout off: the compiled graph draws its second step's dropout masks differently from eager
    # (after one step both agree to ~1e-6; after two, dropout on, by up to 5% of the largest element of
    # the decoder's momentum; dropout off, by 4e-5).
    states, graphs = [], []
    for compiled in (False, True):
        model, opt, step = _setup()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if compiled:
            dynamo.reset()
            step.compile(backend=_capturing_aot_eager(graphs))
        with ops.use_impl("fast"):
            for s in (1, 2):
                torch.manual_seed(s)
                step(_batch(s))
        states.append(_state(model, opt, step))
    # --compile-mode reduce-overhead replays these graphs as CUDA graphs: nothing in the forward or the
    # backward that inductor would refuse to capture (ops tagged cudagraph_unsafe, data-dependent
    # shapes or host reads).
    assert len(graphs) >= 2, "expected a forward and a backward graph"
    for gm in graphs:
        assert _cudagraph_blocker(gm) is None, _cudagraph_blocker(gm).format_node()
    worst = max(float((a - b).abs().max() / (a.abs().max() + 1e-12))
                for k, a in states[0].items() if a.is_floating_point() for b in [states[1][k]])
    assert worst < 1e-4, worst
