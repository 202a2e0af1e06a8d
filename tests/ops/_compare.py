"""How every op test compares a fast op with its reference: one runner, one poisoning, one tolerance table.

* ``run(fn, args, grad_out, wrt)``: one call of ``fn`` on fresh leaves (a view keeps its strides), the
  forward result and the gradient of every input named in ``wrt``, as an ordered ``{name: tensor}``.
* ``poisoned()`` (and the ``poison`` fixture of tests/ops/conftest.py): every ``torch.empty*`` made
  during the call, the C++ extension's ``at::empty`` and the Triton launchers' buffers included, comes
  back filled with NaN (integers with their largest value), so an element a kernel forgets to write
  shows up as a mismatch.
* ``compare(op, fast, reference, dtype, lowp=...)``: each result against the reference under the rule
  ``TOLERANCE[op]`` gives it; a failure names the result, the largest error, its index and both values.

The tolerance rules (docs/DESIGN.md section 2):

``Relative(atol)``, flash-attention's rule: ``err(fast, truth) <= 2 * err(lowp, truth) + atol *
max(1, max|truth|)`` where ``truth`` is the reference in fp32 (float64 for InPlace-ABN) and ``lowp`` the
reference computed in the inputs' own low precision (in fp32 itself: the rule reduces to ``atol``).

``Close(atol, rtol)``: element-wise ``|fast - ref| <= atol + rtol * |ref|`` with equal dtypes and shapes
(``torch.testing.assert_close``'s rule), for ops whose two paths compute in fp32 from the same inputs
(OHEM: the per-pixel losses), where the difference is the final rounding only.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Sequence, Union

import torch

from ifbf_fast.kernels import SUPPORTED_DTYPES

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = SUPPORTED_DTYPES     # the activation dtypes every fast op supports


class Relative(NamedTuple):
    """err(fast, truth) <= 2 * err(lowp, truth) + atol * max(1, max|truth|)."""
    atol: float


class Close(NamedTuple):
    """|fast - ref| <= atol + rtol * |ref| element-wise, same dtype and shape."""
    atol: float
    rtol: float


Rule = Union[Relative, Close]

# The one tolerance table: op -> result name ("*": any other result) -> dtype -> rule.
TOLERANCE: Dict[str, Dict[str, Dict[torch.dtype, Rule]]] = {
    "fbf": {"*": {F32: Relative(2e-6), F16: Relative(2e-4), BF16: Relative(2e-3)}},
    # under autocast (bf16 activations, fp32 weight and bias) against the fp32 reference
    "fbf_autocast": {"*": {BF16: Relative(2e-2)}},
    "inplace_abn": {"*": {F64: Relative(1e-10), F32: Relative(2e-5), F16: Relative(2e-3), BF16: Relative(1e-2)}},
    # both paths compute the per-pixel loss in fp32 from the same logits; the low-precision gradients
    # differ by the final rounding to the logits' dtype
    # a reference against plain PyTorch or a hand computation: torch.testing.assert_close's defaults
    "reference": {"*": {F64: Close(1e-7, 1e-7), F32: Close(1e-5, 1.3e-6), F16: Close(1e-5, 1e-3),
                        BF16: Close(1e-5, 1.6e-2)}},
    "ohem_ce": {"loss": {d: Close(1e-5, 1e-5) for d in DTYPES},
                "*": {F32: Close(1e-6, 1e-4), F16: Close(1e-6, 2e-3), BF16: Close(1e-5, 1.6e-2)}},
}


def rule(op: str, name: str, dtype: torch.dtype) -> Rule:
    """The table's rule for result ``name`` of ``op`` in ``dtype``."""
    table = TOLERANCE[op]
    return table.get(name, table["*"])[dtype]


def largest_error(got: torch.Tensor, want: torch.Tensor):
    """(largest |got - want| in float64, its index, got there, want there); NaN counts as the largest."""
    d = (got.double() - want.double()).abs()
    if d.numel() == 0:
        return 0.0, (), None, None
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    flat = int(d.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), d.shape)) if d.dim() else ()
    return float(d.max()), idx, float(got.double()[idx]), float(want.double()[idx])


def _where(what: str, got: torch.Tensor, want: torch.Tensor) -> str:
    err, idx, g, w = largest_error(got, want)
    return f"{what}: largest error {err:.3g} at {idx} (fast {g:.6g}, reference {w:.6g})"


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float, rtol: float) -> None:
    """``Close(atol, rtol)``: same dtype and shape, |got - want| <= atol + rtol * |want| everywhere."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs reference {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs reference {want.dtype}"
    g, w = got.double(), want.double()
    ok = (g - w).abs() <= atol + rtol * w.abs()
    if not bool(ok.all()):
        raise AssertionError(f"{_where(what, got, want)} > atol {atol:g} + rtol {rtol:g} * |reference|"
                             f" ({int((~ok).sum())} of {ok.numel()} elements)")


def assert_within(got: torch.Tensor, truth: torch.Tensor, lowp: Optional[torch.Tensor], what: str, atol: float,
                  extra_atol: float = 0.0) -> None:
    """``Relative(atol)``: err(got, truth) <= 2 * err(lowp, truth) + atol * max(1, max|truth|) (+ extra_atol)."""
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} vs reference {tuple(truth.shape)}"
    assert not bool(torch.isnan(got).any()), f"{what}: NaN in the fast result (an element left unwritten?) " \
                                             f"{_where(what, got, truth)}"
    e_ref = largest_error(lowp, truth)[0] if lowp is not None else 0.0
    scale = max(1.0, float(truth.double().abs().max())) if truth.numel() else 1.0
    bound = 2 * e_ref + atol * scale + extra_atol
    err = largest_error(got, truth)[0]
    if not err <= bound:
        raise AssertionError(f"{_where(what, got, truth)} > bound {bound:.3g} = 2 * {e_ref:.3g} (reference in "
                             f"low precision) + {atol:g} * {scale:.3g}" + (f" + {extra_atol:g}" if extra_atol else ""))


def compare(op: str, fast: Dict[str, Optional[torch.Tensor]], reference: Dict[str, Optional[torch.Tensor]],
            dtype: torch.dtype, lowp: Optional[Dict[str, Optional[torch.Tensor]]] = None,
            extra_atol: float = 0.0, what: Optional[str] = None) -> None:
    """Every result of ``fast`` against ``reference`` (same keys) under ``TOLERANCE[op]``; a ``None``
    result (an input without a gradient) must be ``None`` on both sides. ``lowp`` is the reference in
    the inputs' low precision, which the ``Relative`` rule needs (``None``: the rule is ``atol`` alone);
    ``what`` names the comparison in a failure (default: the result's name)."""
    assert list(fast) == list(reference), f"{op}: results {list(fast)} vs reference {list(reference)}"
    for name, got in fast.items():
        want = reference[name]
        if got is None or want is None:
            assert got is None and want is None, f"{op} {name}: only one side has it"
            continue
        r = rule(op, name, dtype)
        label = f"{op} {what or name} {str(dtype).split('.')[-1]}"
        if isinstance(r, Close):
            assert_close(got, want, label, r.atol, r.rtol)
        else:
            assert_within(got, want, None if lowp is None else lowp[name], label, r.atol, extra_atol)


def check(op: str, name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
          lowp: Optional[torch.Tensor] = None, what: Optional[str] = None) -> None:
    """One result of ``op`` against its reference under ``TOLERANCE[op][name][dtype]``."""
    compare(op, {name: got}, {name: want}, dtype, None if lowp is None else {name: lowp}, what=what)


def same(got: torch.Tensor, want: torch.Tensor, what: str = "value") -> None:
    """A reference against plain PyTorch or a hand-computed value (``TOLERANCE["reference"]``)."""
    check("reference", "*", got, want, want.dtype, what=what)


def run(fn: Callable, args: Sequence, grad_out, wrt: Dict[int, str], out_name: str = "out",
        **kwargs) -> Dict[str, Optional[torch.Tensor]]:
    """``{out_name: fn(*args, **kwargs)}`` plus ``{wrt[i]: d(out * grad_out).sum() / d args[i]}``.

    The arguments at the positions in ``wrt`` become fresh leaves (``detach()`` keeps a view's strides;
    a ``None`` stays ``None`` and so does its gradient); ``grad_out`` is a tensor or a number.
    """
    args = list(args)
    leaves = {}
    for i in wrt:
        if args[i] is not None:
            args[i] = leaves[i] = args[i].detach().requires_grad_(True)
    out = fn(*args, **kwargs)
    if torch.is_tensor(grad_out):
        grad_out = grad_out.to(out.device, out.dtype)
    used = [leaves[i] for i in wrt if i in leaves]
    grads = iter(torch.autograd.grad(out, used, grad_out if torch.is_tensor(grad_out)
                                     else torch.full_like(out, grad_out)))
    result = {out_name: out.detach()}
    for i, name in wrt.items():
        result[name] = next(grads) if i in leaves else None
    return result


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Every ``torch.empty*`` (and C++ ``at::empty``) inside fills floats with NaN and integers with
    their largest value (PyTorch's ``fill_uninitialized_memory`` under deterministic algorithms)."""
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
