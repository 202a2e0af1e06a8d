"""The C++ autograd node around Python launchers (csrc/launcher_node.cpp, ``_C.launcher_apply``), the
eager route of FBF and OHEM-CE: checked on small torch-computed launchers, so that the node's own
behaviour is visible apart from the Triton kernels (whose numerics tests/ops/test_fbf.py and
test_ohem_ce*.py check through this route).

What autograd users rely on: gradients (gradcheck in float64), inputs that take none, the grad mode of
the forward, saved tensors checked for in-place changes and freed after backward, saved-tensor hooks,
retain_graph, exceptions from the backward with their own type and message, the Python state released,
and readable errors for a wrong launcher protocol.
"""
import gc
import weakref

import pytest
import torch

from ifbf_fast.ops._ext import launcher_apply


class _State:
    """A Python object handed from forward to backward (weak-referenceable, to see it released)."""

    def __init__(self, scale):
        self.scale = scale


def _forward(x, w, scale):
    # out = scale * x * w, non-differentiable extra output x.sum(); keeps x and w
    assert not torch.is_grad_enabled()          # as a torch.autograd.Function's forward
    out = scale * x * w
    return (out, x.sum()), (x, w), _State(scale)


def _backward(grad, x, w, state):
    return grad * state.scale * w, grad * state.scale * x


def _apply(x, w, scale=3.0, name="ToyBackward"):
    return launcher_apply(name, _forward, _backward, 2, x, w, scale)


def _toy_inputs(dtype=torch.float64):
    torch.manual_seed(0)
    return (torch.randn(3, 5, dtype=dtype, requires_grad=True),
            torch.randn(3, 5, dtype=dtype, requires_grad=True))


def test_gradcheck_float64():
    x, w = _toy_inputs()
    assert torch.autograd.gradcheck(lambda a, b: _apply(a, b)[0], (x, w))


def test_result_graph_and_name():
    x, w = _toy_inputs(torch.float32)
    out, total = _apply(x, w)
    assert out.requires_grad and out.grad_fn.name() == "ToyBackward"
    assert not total.requires_grad and total.grad_fn is None      # the extra output carries no gradient
    assert len(out.grad_fn.next_functions) == 2
    gx, gw = torch.autograd.grad(out.sum(), [x, w])
    torch.testing.assert_close(gx, 3.0 * w.detach())
    torch.testing.assert_close(gw, 3.0 * x.detach())


def test_input_without_grad_and_no_grad_mode():
    x, w = _toy_inputs(torch.float32)
    w.requires_grad_(False)
    out, _ = _apply(x, w)
    (gx,) = torch.autograd.grad(out.sum(), [x])          # w's gradient is dropped by the engine
    torch.testing.assert_close(gx, 3.0 * w)
    with torch.no_grad():
        out, _ = _apply(x, w)
    assert out.grad_fn is None and not out.requires_grad
    x2 = x.detach()
    assert _apply(x2, w)[0].grad_fn is None                # no input requires a gradient: no node


def test_backward_twice_needs_retain_graph():
    x, w = _toy_inputs(torch.float32)
    out, _ = _apply(x, w)
    torch.autograd.grad(out.sum(), [x], retain_graph=True)
    torch.autograd.grad(out.sum(), [x])                   # retained once: works a second time
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out.sum(), [x])


def test_inplace_change_of_a_saved_tensor_is_detected():
    x, w = _toy_inputs(torch.float32)
    w2 = w.detach().clone()
    out, _ = launcher_apply("ToyBackward", _forward, _backward, 2, x, w2, 3.0)
    w2.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_saved_tensor_hooks_apply():
    x, w = _toy_inputs(torch.float32)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    def unpack(t):
        unpacked.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out, _ = _apply(x, w)
    assert len(packed) == 2
    gx, _ = torch.autograd.grad(out.sum(), [x, w])
    assert len(unpacked) == 2
    torch.testing.assert_close(gx, 3.0 * w.detach())


def test_state_released_after_backward_and_with_the_graph():
    x, w = _toy_inputs(torch.float32)
    states = []

    def forward(x, w, scale):
        res = _forward(x, w, scale)
        states.append(weakref.ref(res[2]))
        return res

    out, _ = launcher_apply("ToyBackward", forward, _backward, 2, x, w, 3.0)
    out.sum().backward()                 # not retained: the node drops its saved tensors and state
    gc.collect()
    assert states[0]() is None
    out2, _ = launcher_apply("ToyBackward", forward, _backward, 2, x, w, 3.0)
    del out2, _                          # never differentiated: freed with the graph
    gc.collect()
    assert states[1]() is None


def test_backward_exception_keeps_its_type_and_message():
    def backward(grad, x, w, state):
        raise ValueError("toy backward failed on purpose")

    x, w = _toy_inputs(torch.float32)
    out, _ = launcher_apply("ToyBackward", _forward, backward, 2, x, w, 3.0)
    with pytest.raises(ValueError, match="toy backward failed on purpose"):
        out.sum().backward()


def test_forward_exception_propagates():
    def forward(x, w, scale):
        raise KeyError("toy forward")

    x, w = _toy_inputs(torch.float32)
    with pytest.raises(KeyError, match="toy forward"):
        launcher_apply("ToyBackward", forward, _backward, 2, x, w, 3.0)


def test_undefined_gradient_skips_the_backward():
    calls = []

    def backward(grad, x, w, state):
        calls.append(1)
        return _backward(grad, x, w, state)

    x, w = _toy_inputs(torch.float32)
    out, _ = launcher_apply("ToyBackward", _forward, backward, 2, x, w, 3.0)
    # The gradient reaching the node is undefined (a Function returning None for it): no call, no grads.
    class _Drop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    gx, gw = torch.autograd.grad(_Drop.apply(out).sum(), [x, w], allow_unused=True, materialize_grads=False)
    assert calls == [] and gx is None and gw is None


@pytest.mark.parametrize("bad, match", [
    (lambda x, w, s: (x * w, (x,)), "must return \\(result, saved, state\\)"),
    (lambda x, w, s: ("not a tensor", (x,), None), "result must be a tensor"),
    (lambda x, w, s: (x * w, [x], None), "saved a tuple of tensors"),
    (lambda x, w, s: (x * w, (x, 3), None), "saved must be a tuple of tensors"),
    (lambda x, w, s: (x, (w,), None), "must be a new tensor"),
])
def test_protocol_errors_are_readable(bad, match):
    x, w = _toy_inputs(torch.float32)
    with pytest.raises(TypeError, match=match):
        launcher_apply("ToyBackward", bad, _backward, 2, x, w, 3.0)


def test_saving_the_output_is_refused():
    x, w = _toy_inputs(torch.float32)

    def forward(x, w, s):
        out = x * w
        return out, (out,), None

    with pytest.raises(TypeError, match="must not save its differentiable output"):
        launcher_apply("ToyBackward", forward, _backward, 2, x, w, 3.0)


def test_wrong_gradient_count_is_readable():
    x, w = _toy_inputs(torch.float32)
    out, _ = launcher_apply("ToyBackward", _forward, lambda g, x, w, s: (g,), 2, x, w, 3.0)
    with pytest.raises(RuntimeError, match="ToyBackward: the backward launcher must return 2 gradient"):
        out.sum().backward()


def test_argument_errors_are_readable():
    x, w = _toy_inputs(torch.float32)
    with pytest.raises(TypeError, match="n_inputs"):
        launcher_apply("ToyBackward", _forward, _backward, 3, x, w)
    with pytest.raises(TypeError, match="must be tensors"):
        launcher_apply("ToyBackward", _forward, _backward, 2, x, 1.0, 3.0)
    with pytest.raises(TypeError, match="launcher_apply\\(name"):
        launcher_apply("ToyBackward", _forward)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_anomaly_mode_and_node_hooks():
    """The node under anomaly mode (its forward traceback recorded, a NaN gradient named with the node)
    and with hooks registered on grad_fn."""
    x, w = _toy_inputs(torch.float32)
    seen = []
    with torch.autograd.detect_anomaly(check_nan=True):
        out, _ = _apply(x, w)
        out.grad_fn.register_prehook(lambda grad_outputs: seen.append("pre"))
        out.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(len(grad_inputs)))
        gx, gw = torch.autograd.grad(out.sum(), [x, w])
    assert seen == ["pre", 2]
    torch.testing.assert_close(gx, 3.0 * w.detach())

    def backward(grad, x, w, state):
        return grad * float("nan"), None

    out, _ = launcher_apply("ToyBackward", _forward, backward, 2, x, w, 3.0)
    with torch.autograd.detect_anomaly(check_nan=True), pytest.warns(UserWarning, match="ToyBackward"), \
            pytest.raises(RuntimeError, match="ToyBackward.*nan|nan.*ToyBackward"):
        out.sum().backward()
