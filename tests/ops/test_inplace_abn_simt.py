"""InPlace-ABN's CUDA launchers and kernels, run on the CPU by the SIMT emulator (ifbf_fast/utils/simt_emu.py).

These are the sources nvcc compiles for the GPU (csrc/inplace_abn_*.cu, inplace_abn_launch.cuh,
inplace_abn_kernels.cuh), built as C++ against csrc/simt/simt_emu.h: every block of every grid runs, its
threads meeting at __syncthreads and the warp shuffles, with the plans and vector widths a GPU would get.
Each entry point is checked against a float64 reference on fresh random inputs, in both layouts, fp32 /
fp16 / bf16, with odd planes (unaligned heads and tails of the 16-byte NCS rows), channel counts that are
and are not multiples of the vector width, rows that start off a 16-byte boundary (vector and scalar
paths), several chunks per row, and grids smaller than the work (grid-stride loops). Every tensor is a
view into a larger buffer filled with NaN: a read outside the tensor spreads NaN into the results and a
write outside it, or an element left unwritten, shows as a changed guard or a NaN in the output. The
recorded launches are compared with the plans of ``ifbf_fast.ops.inplace_abn.launch_model``.
"""
import importlib
import os

import pytest
import torch

A = importlib.import_module("ifbf_fast.ops.inplace_abn")
simt_emu = importlib.import_module("ifbf_fast.utils.simt_emu")

pytest.importorskip("ifbf_fast._C")

EPS, MOMENTUM, SLOPE = 1e-5, 0.1, 0.01
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
GUARD = 24   # NaN elements before and after every tensor


# No source tree or no C++ compiler: skip, saying why. Any other build failure fails the tests. On a GPU
# machine (IFBF_TEST_GPU=1) the CUDA kernels themselves are tested (test_inplace_abn.py): the emulator
# would only spend the lent machine's time.
_ON_GPU = os.environ.get("IFBF_TEST_GPU", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(_ON_GPU or simt_emu.unavailable() is not None,
                                reason="IFBF_TEST_GPU=1: the CUDA kernels run on the GPU instead" if _ON_GPU
                                else str(simt_emu.unavailable()))


@pytest.fixture(scope="module")
def emu():
    m = simt_emu.load()
    yield m
    m.set_sms(132)
    m.set_schedule(0, 0)


class Guarded:
    """A tensor of ``shape`` and ``dtype`` living ``offset`` elements into a NaN-filled buffer."""

    def __init__(self, shape, dtype, channels_last=False, offset=0, fill=None):
        numel = 1
        for d in shape:
            numel *= d
        self.start = GUARD + offset
        self.buf = torch.full((numel + 2 * GUARD + offset,), float("nan"), dtype=dtype)
        self.numel = numel
        flat = self.buf[self.start:self.start + numel]
        if channels_last:
            n, c, *sp = shape
            self.t = flat.view(n, *sp, c).movedim(-1, 1)
        else:
            self.t = flat.view(shape)
        if fill is not None:
            self.t.copy_(fill)

    def guards_intact(self):
        head, tail = self.buf[:self.start], self.buf[self.start + self.numel:]
        return bool(torch.isnan(head).all() and torch.isnan(tail).all())


def _act_ref(act, y):
    """z = act^-1(y) and act'(z), float64 (the inverse the backward kernels apply)."""
    if act == "identity":
        return y, torch.ones_like(y)
    if act == "leaky_relu":
        neg = y < 0
        return torch.where(neg, y / SLOPE, y), torch.where(neg, torch.full_like(y, SLOPE), torch.ones_like(y))
    neg = y.clamp(max=0)
    return y.clamp(min=0) + torch.log1p(neg.clamp(min=-0.9999999)), 1 + neg


def _act_fwd(act, z):
    return A.apply_activation(z, act, SLOPE)   # the package's one definition


def _bc(v, x):
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _moved(emu, call):
    """call(), and the full-size bytes it read and wrote through the kernels' accessors (the hot loops'
    vectors, the scalar kernels' narrow ones, the rows' scalar ends)."""
    before = emu.counts()
    call()
    after = emu.counts()
    return sum(after[k] - before[k] for k in ("vector_bytes", "narrow_bytes", "scalar_bytes"))


CASES = [
    # (shape, channels_last, offset of every full-size tensor in elements)
    pytest.param((2, 5, 7, 9), False, 0, id="nchw-odd-plane"),            # S = 63: head 0, tail per vec
    pytest.param((2, 3, 37, 41), False, 0, id="nchw-3-chunks"),           # S = 1517: several warp units per row
    pytest.param((2, 4, 5, 7), False, 1, id="nchw-misaligned-rows"),      # p0 = 1: every row's head differs
    pytest.param((3, 6, 1, 1), False, 0, id="nc11-as-channels-last"),     # S = 1 runs as (M, C)
    pytest.param((2, 16, 5, 7), True, 0, id="nhwc-c16"),                  # vectorised channels
    pytest.param((2, 12, 6, 5), True, 0, id="nhwc-c12"),                  # fp32 vectorised, fp16/bf16 scalar
    pytest.param((3, 20, 9, 11), True, 0, id="nhwc-c20-rows"),            # several row tiles
    pytest.param((2, 16, 5, 7), True, 2, id="nhwc-misaligned"),           # scalar fallback
]


def _inputs(shape, dtype, channels_last, offset, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = Guarded(shape, dtype, channels_last, offset,
                (torch.randn(shape, generator=g) * 2 + torch.randn(1, c, 1, 1, generator=g) * 3).to(dtype))
    w = (torch.randn(c, generator=g) * 1.5) if affine else None
    if w is not None:
        w[0] = 0.0      # sign(0) = 0 in dweight
    b = torch.randn(c, generator=g) if affine else None
    return x, w, b, g


@pytest.mark.parametrize("sms", [132, 1], ids=["h200", "1sm"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape, channels_last, offset", CASES)
def test_training_chain_against_float64(emu, shape, channels_last, offset, dtype, sms):
    """train_statistics -> forward -> backward_reduce_params -> backward_dx, as inplace_abn.cpp chains
    them on CUDA, against float64 arithmetic on the same (rounded) inputs."""
    dt = DTYPES[dtype]
    emu.set_sms(sms)
    emu.reset()
    act = "leaky_relu"
    x, w, b, g = _inputs(shape, dt, channels_last, offset)
    c = shape[1]
    f64 = dict(dtype=torch.float64)
    mean, invstd = torch.full((c,), float("nan"), **f64), torch.full((c,), float("nan"), **f64)
    invstd_saved = torch.full((c,), float("nan"))
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    nbt = torch.tensor(7, dtype=torch.long)
    size = x.t.numel() * x.t.element_size()
    # Each pass moves each full-size element exactly once (the bytes model of inplace_abn_plan.h): the
    # statistics read x, the forward reads x and writes y, the backward reduce reads y and dy, the dx
    # map reads y and dy and writes dx.
    assert _moved(emu, lambda: emu.train_statistics(x.t, mean, invstd, invstd_saved, rm, rv, nbt, MOMENTUM,
                                                     EPS)) == size

    xd = x.t.double()
    n = xd.numel() // c
    m_ref = xd.mean(_dims(xd))
    v_ref = xd.var(_dims(xd), unbiased=False)
    torch.testing.assert_close(mean, m_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(invstd, 1 / torch.sqrt(v_ref + EPS), rtol=1e-10, atol=0)
    torch.testing.assert_close(invstd_saved, (1 / torch.sqrt(v_ref + EPS)).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(rm, ((1 - MOMENTUM) * rm0 + MOMENTUM * m_ref).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, ((1 - MOMENTUM) * rv0 + MOMENTUM * v_ref * n / (n - 1)).float(),
                               rtol=1e-6, atol=1e-7)
    assert int(nbt) == 8

    y = Guarded(shape, dt, channels_last, offset)
    assert _moved(emu, lambda: emu.forward(x.t, mean, invstd, w, b, EPS, simt_emu.ACT[act], SLOPE, y.t)) == 2 * size
    gain = w.double().abs() + EPS
    z_ref = (xd - _bc(mean, xd)) * _bc(invstd * gain, xd) + _bc(b.double(), xd)
    y_ref = _act_fwd(act, z_ref)
    assert not torch.isnan(y.t).any(), "forward map left elements unwritten"
    torch.testing.assert_close(y.t.double(), y_ref, **TOL[dt])

    dy = Guarded(shape, dt, channels_last, offset, torch.randn(shape, generator=g).to(dt))
    dweight, dbias, mdz, mdzx = (torch.full((c,), float("nan")) for _ in range(4))
    assert _moved(emu, lambda: emu.backward_reduce_params(y.t, dy.t, w, b, EPS, simt_emu.ACT[act], SLOPE, True,
                                                         dweight, dbias, mdz, mdzx)) == 2 * size
    yd, dyd = y.t.double(), dy.t.double()
    z, dact = _act_ref(act, yd)
    dz = dyd * dact
    xhat = (z - _bc(b.double(), yd)) / _bc(gain, yd)
    s_dz, s_dzx = dz.sum(_dims(yd)), (dz * xhat).sum(_dims(yd))
    scale = dz.abs().sum(_dims(yd)).max().item() + 1   # fp32 sums over the batch: tolerance by magnitude
    torch.testing.assert_close(dbias.double(), s_dz, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(dweight.double(), s_dzx * torch.sign(w.double()), rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(mdz.double(), s_dz / n, rtol=1e-5, atol=1e-5 * scale / n)
    torch.testing.assert_close(mdzx.double(), s_dzx / n, rtol=1e-5, atol=1e-5 * scale / n)

    dx = Guarded(shape, dt, channels_last, offset)
    assert _moved(emu, lambda: emu.backward_dx(y.t, dy.t, invstd_saved, w, b, mdz, mdzx, EPS, simt_emu.ACT[act],
                                               SLOPE, dx.t)) == 3 * size
    dx_ref = _bc(gain * invstd_saved.double(), yd) * (dz - _bc(mdz.double(), yd) - xhat * _bc(mdzx.double(), yd))
    assert not torch.isnan(dx.t).any(), "dx map left elements unwritten"
    torch.testing.assert_close(dx.t.double(), dx_ref, **TOL[dt])

    for t in (x, y, dy, dx):
        assert t.guards_intact(), "a kernel wrote outside its tensor"

    # The launches are the plans of launch_model (grid and block of each), 6 in all.
    vec = 0 if offset == 0 else 1 if channels_last else 0
    planned = A.launch_model(shape, dt, channels_last or shape[2] * shape[3] == 1, sms=sms, vec=vec)
    got = emu.launches()
    assert len(got) == len(planned) == 6
    for p, (grid, block) in zip(planned, got):
        assert (grid[0], grid[1]) == tuple(p["grid"]) and (block[0], block[1]) == tuple(p["block"]), p["name"]


@pytest.mark.parametrize("act", ["leaky_relu", "elu", "identity"])
@pytest.mark.parametrize("shape, channels_last, offset", [CASES[0], CASES[4], CASES[5]])
def test_primitives_and_activations(emu, shape, channels_last, offset, act):
    """The synchronised path's primitives (statistics, backward_reduce, running_update) and the evaluation
    chain (eval_statistics -> forward -> dx without the batch means), every activation, no affine
    parameters for identity."""
    dt = torch.float32
    emu.set_sms(132)
    affine = act != "identity"
    x, w, b, g = _inputs(shape, dt, channels_last, offset, affine=affine, seed=1)
    c = shape[1]
    xd = x.t.double()
    mean, var, count = emu.statistics(x.t)
    torch.testing.assert_close(mean, xd.mean(_dims(xd)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, xd.var(_dims(xd), unbiased=False), rtol=1e-10, atol=1e-12)
    assert int(count.item()) == xd.numel() // c

    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    n = float(xd.numel() // c)
    emu.running_update(mean, var, torch.tensor([n], dtype=torch.float64), rm, rv, None, MOMENTUM)
    torch.testing.assert_close(rm, ((1 - MOMENTUM) * rm0 + MOMENTUM * mean).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, ((1 - MOMENTUM) * rv0 + MOMENTUM * var * n / (n - 1)).float(), rtol=1e-6, atol=1e-7)

    emean, einv = torch.full((c,), float("nan"), dtype=torch.float64), torch.full((c,), float("nan"), dtype=torch.float64)
    esaved = torch.full((c,), float("nan"))
    emu.eval_statistics(rm, rv, EPS, emean, einv, esaved)
    torch.testing.assert_close(emean, rm.double(), rtol=0, atol=0)
    torch.testing.assert_close(einv, 1 / torch.sqrt(rv.double() + EPS), rtol=1e-12, atol=0)

    y = Guarded(shape, dt, channels_last, offset)
    emu.forward(x.t, emean, einv, w, b, EPS, simt_emu.ACT[act], SLOPE, y.t)
    gain = w.double().abs() + EPS if affine else torch.ones(c, dtype=torch.float64)
    bias = b.double() if affine else torch.zeros(c, dtype=torch.float64)
    y_ref = _act_fwd(act, (xd - _bc(emean, xd)) * _bc(einv * gain, xd) + _bc(bias, xd))
    torch.testing.assert_close(y.t.double(), y_ref, **TOL[dt])

    dy = Guarded(shape, dt, channels_last, offset, torch.randn(shape, generator=g))
    s_dz, s_dzx = emu.backward_reduce(y.t, dy.t, w, b, EPS, simt_emu.ACT[act], SLOPE)
    yd, dyd = y.t.double(), dy.t.double()
    z, dact = _act_ref(act, yd)
    dz = dyd * dact
    xhat = (z - _bc(bias, yd)) / _bc(gain, yd)
    scale = dz.abs().sum(_dims(yd)).max().item() + 1
    torch.testing.assert_close(s_dz.double(), dz.sum(_dims(yd)), rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(s_dzx.double(), (dz * xhat).sum(_dims(yd)), rtol=1e-5, atol=1e-4 * scale)

    dx = Guarded(shape, dt, channels_last, offset)
    emu.backward_dx(y.t, dy.t, esaved, w, b, None, None, EPS, simt_emu.ACT[act], SLOPE, dx.t)
    torch.testing.assert_close(dx.t.double(), _bc(gain * esaved.double(), yd) * dz, **TOL[dt])
    for t in (x, y, dy, dx):
        assert t.guards_intact(), "a kernel wrote outside its tensor"


def test_statistics_do_not_cancel_far_from_zero(emu):
    """The shifted float64 sums: values 1e6 +- 1 in fp32 keep their variance (plain fp32 sums of squares
    lose every digit)."""
    emu.set_sms(132)
    g = torch.Generator().manual_seed(3)
    x = (1e6 + torch.randn(2, 4, 9, 13, generator=g)).float()
    mean, var, _ = emu.statistics(x)
    xd = x.double()
    torch.testing.assert_close(var, xd.var(_dims(xd), unbiased=False), rtol=1e-9, atol=0)


def test_emulator_runs_shuffles_and_barriers(emu):
    """The emulator computes a shuffle + shared-memory block reduction exactly, with a grid-stride loop."""
    m = emu
    x = torch.arange(1000, dtype=torch.float32)
    out = m.selftest_block_sum(x, 3, 128)
    assert out.sum().item() == x.sum().item() and not torch.isnan(out).any()


def test_emulator_refuses_what_a_gpu_faults_on(emu):
    """What would be undefined or a fault on a GPU fails the launch with one clear error: a full-warp
    shuffle that some lanes never reach, a misaligned 16-byte access, a block of 2048 threads."""
    m = emu
    out = m.selftest_partial_warp(32)                       # every lane: fine
    assert out[:31].tolist() == [float(i + 1) for i in range(31)] and out[31].item() == 31
    with pytest.raises(RuntimeError, match="only 16 of 32 lanes reached"):
        m.selftest_partial_warp(16)
    buf = torch.arange(16, dtype=torch.float32)
    assert m.selftest_vector_load(buf, 4).item() == 4 + 5 + 6 + 7
    with pytest.raises(RuntimeError, match="misaligned address"):
        m.selftest_vector_load(buf, 1)
    with pytest.raises(RuntimeError, match="invalid configuration"):
        m.selftest_block_sum(buf, 1, 2048)


NETWORK = [
    # IFBFNet-R101 planes at crop 876 (tests/ops/test_inplace_abn_bytes.py NETWORK), batch 1
    pytest.param((1, 256, 55, 55), False, id="layer3_mid-nchw"),
    pytest.param((1, 256, 55, 55), True, id="layer3_mid-channels_last"),
    pytest.param((1, 64, 110, 110), False, id="layer2_mid-64-nchw"),
]


@pytest.mark.parametrize("shape, channels_last", NETWORK)
def test_network_planes_bf16(emu, shape, channels_last):
    """The planes of the network (odd 55^2 and 110^2 rows, hundreds of blocks) in bf16 with the H200's
    plans: forward and backward against float64, every element written, the launches as planned, and
    the forward map's bytes moved as 16-byte vectors but for the rows' unaligned ends (scalar, under 1%)."""
    emu.set_sms(132)
    emu.reset()
    x, w, b, g = _inputs(shape, torch.bfloat16, channels_last, 0, seed=5)
    c = shape[1]
    mean, invstd = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    saved, rm, rv = torch.empty(c), torch.zeros(c), torch.ones(c)
    emu.train_statistics(x.t, mean, invstd, saved, rm, rv, None, MOMENTUM, EPS)
    xd = x.t.double()
    torch.testing.assert_close(mean, xd.mean(_dims(xd)), rtol=1e-10, atol=1e-12)
    y = Guarded(shape, torch.bfloat16, channels_last)
    before = emu.counts()
    emu.forward(x.t, mean, invstd, w, b, EPS, simt_emu.ACT["leaky_relu"], SLOPE, y.t)
    after = emu.counts()
    # The map reads x and writes y: all but the rows' unaligned heads and tails as 16-byte vectors
    # (55^2 and 110^2 are odd: every NCHW row starts at a different offset from a 16-byte boundary).
    moved = 2 * x.t.numel() * x.t.element_size()
    assert after["narrow_bytes"] == before["narrow_bytes"]
    assert after["vector_bytes"] - before["vector_bytes"] >= 0.99 * moved
    assert sum(after[k] - before[k] for k in ("vector_bytes", "scalar_bytes")) == moved
    gain = w.double().abs() + EPS
    y_ref = _act_fwd("leaky_relu", (xd - _bc(mean, xd)) * _bc(invstd * gain, xd) + _bc(b.double(), xd))
    torch.testing.assert_close(y.t.double(), y_ref, **TOL[torch.bfloat16])
    dy = Guarded(shape, torch.bfloat16, channels_last, 0, torch.randn(shape, generator=g).to(torch.bfloat16))
    dweight, dbias, mdz, mdzx = (torch.empty(c) for _ in range(4))
    emu.backward_reduce_params(y.t, dy.t, w, b, EPS, simt_emu.ACT["leaky_relu"], SLOPE, True, dweight, dbias,
                               mdz, mdzx)
    yd, dyd = y.t.double(), dy.t.double()
    z, dact = _act_ref("leaky_relu", yd)
    dz = dyd * dact
    scale = dz.abs().sum(_dims(yd)).max().item() + 1
    torch.testing.assert_close(dbias.double(), dz.sum(_dims(yd)), rtol=1e-5, atol=1e-5 * scale)
    dx = Guarded(shape, torch.bfloat16, channels_last)
    emu.backward_dx(y.t, dy.t, saved, w, b, mdz, mdzx, EPS, simt_emu.ACT["leaky_relu"], SLOPE, dx.t)
    xhat = (z - _bc(b.double(), yd)) / _bc(gain, yd)
    dx_ref = _bc(gain * saved.double(), yd) * (dz - _bc(mdz.double(), yd) - xhat * _bc(mdzx.double(), yd))
    torch.testing.assert_close(dx.t.double(), dx_ref, **TOL[torch.bfloat16])
    for t in (x, y, dy, dx):
        assert t.guards_intact()
    planned = A.launch_model(shape, torch.bfloat16, channels_last)
    assert [(grid[0], grid[1]) for grid, _ in emu.launches()] == [tuple(p["grid"]) for p in planned]


def _chain(emu, shape, dtype, channels_last, act="leaky_relu"):
    """Every output of the training chain and of the primitives, for the schedule comparison."""
    x, w, b, g = _inputs(shape, dtype, channels_last, 0, seed=11)
    c = shape[1]
    mean, invstd = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    saved, rm, rv = torch.empty(c), torch.zeros(c), torch.ones(c)
    nbt = torch.tensor(0, dtype=torch.long)
    emu.train_statistics(x.t, mean, invstd, saved, rm, rv, nbt, MOMENTUM, EPS)
    y = torch.empty_like(x.t)
    emu.forward(x.t, mean, invstd, w, b, EPS, simt_emu.ACT[act], SLOPE, y)
    dy = torch.randn(shape, generator=g).to(dtype)
    dy = dy.contiguous(memory_format=torch.channels_last) if channels_last else dy
    dw, db, mdz, mdzx = (torch.empty(c) for _ in range(4))
    emu.backward_reduce_params(y, dy, w, b, EPS, simt_emu.ACT[act], SLOPE, True, dw, db, mdz, mdzx)
    dx = torch.empty_like(y)
    emu.backward_dx(y, dy, saved, w, b, mdz, mdzx, EPS, simt_emu.ACT[act], SLOPE, dx)
    stats = emu.statistics(x.t)
    sums = emu.backward_reduce(y, dy, w, b, EPS, simt_emu.ACT[act], SLOPE)
    return [mean, invstd, saved, rm, rv, nbt, y, dw, db, mdz, mdzx, dx, *stats, *sums]


@pytest.mark.parametrize("sms", [132, 1], ids=["h200", "1sm"])
@pytest.mark.parametrize("shape, channels_last, dtype", [
    pytest.param((2, 5, 37, 41), False, torch.bfloat16, id="nchw-bf16"),
    pytest.param((3, 20, 9, 11), True, torch.float32, id="nhwc-c20-fp32"),
    pytest.param((2, 16, 5, 7), True, torch.float16, id="nhwc-c16-fp16"),
])
def test_results_do_not_depend_on_the_schedule(emu, shape, channels_last, dtype, sms):
    """Blocks in ascending, descending and two shuffled orders, and threads between barriers likewise:
    bitwise the same results (no race between threads of a block, no order between blocks; the
    reductions are deterministic)."""
    emu.set_sms(sms)
    runs = []
    for mode, seed in ((0, 0), (1, 0), (2, 1), (2, 2)):
        emu.set_schedule(mode, seed)
        runs.append(_chain(emu, shape, dtype, channels_last))
    emu.set_schedule(0, 0)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_schedules_expose_a_race(emu):
    """The emulator's schedules do show a race: threads that read a neighbour's shared slot without a
    barrier see its new value in one order and the previous call's in the other."""
    emu.set_schedule(0, 0)
    emu.selftest_race(64, 0)                   # the slots now hold call 0's values
    up = emu.selftest_race(64, 1)              # ascending: each neighbour has not written yet
    emu.set_schedule(1, 0)
    down = emu.selftest_race(64, 2)            # descending: each neighbour already has
    emu.set_schedule(0, 0)
    assert up[:63].tolist() == [float(i + 1) for i in range(63)]           # call 0's stale values
    assert down[:63].tolist() == [2000.0 + i + 1 for i in range(63)]       # call 2's own
