"""Model + loss under dynamo with the full-size logits and the plain OHEM (zero graph breaks), and bf16
autocast on the CPU. That the compiled training step (AOTAutograd through every fast op's fake kernel and
autograd registration) matches eager is tests/engine/test_step.py's
test_compiled_step_has_no_graph_break_and_matches_eager."""
import pytest
import torch
import torch._dynamo as dynamo

from ifbf_fast import ops
from ifbf_fast.models import build_model
from ifbf_fast.nn import IFBFLoss, norm_act


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = build_model({"backbone": "resnet18", "norm_act": norm_act("inplace_abn_sync"),
                         "decoder_channels": 64, "spatial_channels": 16})   # narrow: faster interpreted FBFs
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
