"""InPlace-ABN's CUDA launches checked on the CPU: the bytes model against the op's minimum, the work in
flight per launch on a 132-SM GPU, and the NCS row split (unaligned head, 16-byte body, tail) covering
every element exactly once.

Everything here comes from csrc/inplace_abn_plan.h through ifbf_fast._C (``launch_model``,
``abn_row_split``): the functions the CUDA launchers and kernels run, compiled into every build of the
extension, so these tests run without nvcc or a GPU.
"""
import importlib

import numpy as np
import pytest
import torch

A = importlib.import_module("ifbf_fast.ops.inplace_abn")   # the module (ifbf_fast.ops.inplace_abn is also the op)

_C = pytest.importorskip("ifbf_fast._C")

# Every InPlace-ABN of IFBFNet-R101 at crop 876, output stride 16 (ifbf_fast/models; docs/DESIGN.md
# section 1), as (channels, plane side): the stem at 1/2 (438), layer1 and the decoder at 1/4 (219),
# layer2 at 1/8 (110; its first conv1 still at 219), layer3 at 1/16 (55; its first conv1 at 110),
# layer4 dilated at 1/16, the ASPP branches and projection at 1/16, the spatial stream at 1/2 and 1/4.
NETWORK = {
    "stem": (64, 438), "layer1_mid": (64, 219), "layer1_out": (256, 219), "layer2_in": (128, 219),
    "layer2_mid": (128, 110), "layer2_out": (512, 110), "layer3_in": (256, 110), "layer3_mid": (256, 55),
    "layer3_out": (1024, 55), "layer4_mid": (512, 55), "layer4_out": (2048, 55), "aspp": (256, 55),
    "decoder": (256, 219), "head": (128, 219),
}
# ASPP's image pooling branch normalises (N, 256, 1, 1): 256 * N values in all, one block's worth of
# work, where no grid can fill 132 SMs; it is counted in the bytes but not held to the grid rules.
POOLING = (256, 1)
BATCHES = (2, 4)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _cases():
    for name, (c, side) in NETWORK.items():
        for batch in BATCHES:
            yield pytest.param((batch, c, side, side), id=f"{name}-{batch}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", list(_cases()) + [pytest.param((2, *POOLING, 1), id="aspp_pool-2")])
def test_bytes_model_within_10_percent_of_the_minimum(shape, layout, dtype):
    launches = A.launch_model(shape, DTYPES[dtype], layout == "channels_last")
    assert [m["name"] for m in launches] == ["statistics_reduce", "statistics_combine", "forward_map",
                                             "backward_reduce", "backward_combine", "backward_map"]
    total = sum(m["read"] + m["written"] for m in launches)
    minimum = A.min_bytes(shape, DTYPES[dtype])
    assert minimum <= total, f"{total / minimum:.4f} x the minimum"
    if shape[2] > 1:   # the pooling branch's 512 values weigh less than its per-channel constants
        assert total <= 1.10 * minimum, f"{total / minimum:.4f} x the minimum"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", list(_cases()))
def test_every_launch_keeps_a_132_sm_gpu_busy(shape, layout, dtype):
    """Each launch at the network's shapes gives >= 2 waves on 132 SMs (at the blocks per SM its kernel
    is compiled for) or keeps 4 independent 16-byte loads in flight per thread; the partial reduces run
    on >= 132 programs; the hot loops are vectorised (16 bytes per access)."""
    elt = torch.empty((), dtype=DTYPES[dtype]).element_size()
    for m in A.launch_model(shape, DTYPES[dtype], layout == "channels_last"):
        work = A.work_in_flight(m)
        assert work["waves"] >= 2 or work["loads_per_thread"] >= 4, (m, work)
        if m["kind"] == "combine":
            continue      # per-channel partial states only: a warp per channel, 4 loads in flight per lane
        assert m["vec"] * elt == 16, m
        if m["kind"].startswith("reduce"):
            assert work["programs"] >= A.SM_COUNT_H200, (m, work)


def test_evaluation_launches():
    """Evaluation without parameter gradients: running statistics -> constants, the two maps."""
    launches = A.launch_model((2, 256, 219, 219), torch.bfloat16, False, training=False)
    assert [m["name"] for m in launches] == ["eval_statistics", "forward_map", "backward_map"]
    assert A.min_bytes((2, 256, 219, 219), torch.bfloat16, training=False) == 5 * 2 * 256 * 219 * 219 * 2
    total = sum(m["read"] + m["written"] for m in launches)
    assert total <= 1.01 * A.min_bytes((2, 256, 219, 219), torch.bfloat16, training=False)


def test_unaligned_pointers_fall_back_to_scalar_accesses():
    """vec 1 (pointers that disagree on their 16-byte offset): the same grids over scalar accesses."""
    m = A.launch_model((2, 64, 7, 9), torch.float16, False, vec=1)
    assert {x["vec"] for x in m if x["kind"] != "combine"} == {1}
    nsc = A.launch_model((2, 60, 7, 9), torch.float16, True)   # C % 8 != 0: no 16-byte channel vectors
    assert {x["vec"] for x in nsc if x["kind"] != "combine"} == {1}


# --- the NCS row split: every element exactly once ----------------------------------------------------

def _ncs_coverage(rows, S, p0, vec, chunks, unit):
    """What the NCS kernels touch, by their arithmetic (inplace_abn_kernels.cuh reduce_ncs_kernel /
    map_ncs_kernel): warp unit (row, chunk), lane l, access k: body vector j = chunk * unit + k * 32 + l
    if j < body; the first chunk's lanes l < head + tail take element l (head) or S - tail + l - head."""
    hits = np.zeros(rows * S, dtype=np.int64)
    lanes, ks = np.arange(32), np.arange(unit // 32)
    for row in range(rows):
        head, body, tail = _C.abn_row_split(p0 + row * S, S, vec)
        assert head + vec * body + tail == S and head < vec and tail < vec
        if body:
            assert (p0 + row * S + head) % vec == 0, "body vectors start on a 16-byte boundary"
        for chunk in range(chunks):
            j = (chunk * unit + ks[:, None] * 32 + lanes[None, :]).ravel()
            j = j[j < body]
            elems = (head + j[:, None] * vec + np.arange(vec)[None, :]).ravel()
            np.add.at(hits, row * S + elems, 1)
        if vec > 1:
            ends = lanes[lanes < head + tail]
            elems = np.where(ends < head, ends, S - tail + ends - head)
            np.add.at(hits, row * S + elems, 1)
    return hits


@pytest.mark.parametrize("vec", [1, 2, 4, 8])
@pytest.mark.parametrize("S", [2, 3, 7, 8, 9, 15, 17, 33, 127, 129, 257, 1025, 3025])   # S = 1 runs channels last
def test_row_split_covers_every_element_once(S, vec):
    elt = 16 // vec
    dtype = {2: torch.float16, 4: torch.float32, 8: torch.float64}.get(elt, torch.float16)
    rows = 3 if S > 1000 else 5
    for tensors in (1, 2):                  # statistics / forward map, backward reduce / dx map
        unit = 32 * (4 // tensors)
        for p0 in range(vec):               # the tensors' offset from a 16-byte boundary, in elements
            plans = A.launch_model((1, rows, S), dtype, False, vec=vec)
            chunks = {m["chunks"] for m in plans if m["kind"] in ("reduce_ncs", "map_ncs")
                      and m["tensors"] == tensors}
            assert len(chunks) == 1
            hits = _ncs_coverage(rows, S, p0, vec, chunks.pop(), unit)
            assert (hits == 1).all(), (S, vec, p0, tensors, np.flatnonzero(hits != 1)[:8])


def test_row_split_network_planes():
    """Odd planes of the network (438^2, 219^2, 110^2, 55^2) split as the kernels expect at every
    offset, in the int64 arithmetic of large tensors too."""
    for side in (438, 219, 110, 55):
        S = side * side
        for vec in (4, 8):
            for start in (0, 1, 3, vec - 1, 2 ** 33 + 5):
                head, body, tail = _C.abn_row_split(start, S, vec)
                assert head == (-start) % vec and head + vec * body + tail == S and 0 <= tail < vec
