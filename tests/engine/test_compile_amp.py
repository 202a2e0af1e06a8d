"""The training step under torch.compile (zero graph breaks, eager numbers) and bf16 autocast on CPU."""
import pytest
import torch
import torch._dynamo as dynamo

from ifbf_fast import ops
from ifbf_fast.models import build_model
from ifbf_fast.nn import IFBFLoss, norm_act


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = build_model({"backbone": "resnet18", "norm_act": norm_act("inplace_abn_sync")})
    x = torch.randn(2, 3, 32, 40)
    y = torch.randint(0, 19, (2, 32, 40))
    y[0, :4] = 255
    return model, x, y


def _step(model, loss_fn):
    def step(x, y):
        return loss_fn(model(x), y)["loss"]
    return step


@pytest.mark.slow
def test_train_step_has_no_graph_break_with_every_fast_op():
    model, x, y = _model_and_batch()
    with ops.use_impl("fast"):
        explanation = dynamo.explain(_step(model, IFBFLoss()))(x, y)
    reasons = [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """aot_eager traces forward and backward through the custom ops' fake kernels and autograd
    registrations (what inductor sees) while keeping the kernels themselves, so the numbers match."""
    with ops.use_impl("fast"):
        model, x, y = _model_and_batch()
        loss_eager = _step(model, IFBFLoss())(x, y)
        loss_eager.backward()
        grads_eager = [p.grad.clone() for p in model.parameters()]
        model2, _, _ = _model_and_batch()
        dynamo.reset()
        compiled = torch.compile(_step(model2, IFBFLoss()), backend="aot_eager", fullgraph=True)
        loss_c = compiled(x, y)
        loss_c.backward()
    torch.testing.assert_close(loss_c, loss_eager, rtol=1e-4, atol=1e-5)
    worst = max(float((p.grad - g).abs().max() / (g.abs().max() + 1e-12))
                for p, g in zip(model2.parameters(), grads_eager))
    assert worst < 1e-3, worst


@pytest.mark.slow
def test_bf16_autocast_step_on_cpu():
    model, x, y = _model_and_batch()
    loss_fn = IFBFLoss()
    with ops.use_impl("fast"):
        loss32 = _step(model, loss_fn)(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out["out"].dtype == torch.bfloat16
        loss16 = loss_fn(out, y)["loss"]
        loss16.backward()
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
