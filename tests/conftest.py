"""Test-wide set-up and the fixtures built once per session.

TRITON_INTERPRET=1 must be set before any Triton kernel is imported, so that the kernels run on CPU
tensors under Triton's interpreter on machines without a GPU (docs/DESIGN.md section 7). On a GPU
machine set IFBF_TEST_GPU=1 to leave it off and test the compiled kernels on CUDA tensors.

Session fixtures (read-only: copy before changing anything in them): ``tiny_city``, a synthetic city;
``tiny_checkpoint``, a train.py checkpoint written without training (tests/_tiny_checkpoint.py);
``trained_run``, the --out folder of one 2-step training run on ``tiny_city``. The tests in
tests/nn and tests/models run the reference ops (``_reference_ops_for_module_tests``).
"""

import os

if os.environ.get("IFBF_TEST_GPU", "0") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests._tally import BAD_INPUTS  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N workers share the cores; torch's intra-op threads would oversubscribe them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_sessionfinish(session):
    output = getattr(session.config, "workeroutput", None)   # an xdist worker: hand its tally over
    if output is not None:
        output["bad_inputs"] = dict(BAD_INPUTS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: add up the workers' tallies of the table of bad inputs."""
    for key, value in getattr(node, "workeroutput", {}).get("bad_inputs", {}).items():
        BAD_INPUTS[key] += value


def pytest_terminal_summary(terminalreporter):
    if BAD_INPUTS["tried"]:
        terminalreporter.write_line(f"bad inputs: {BAD_INPUTS['tried']} tried, {BAD_INPUTS['handled']} handled")


@pytest.fixture(autouse=True)
def _seed_and_reset_impl():
    """Fresh, reproducible random inputs per test, and the implementation switch left as found."""
    from ifbf_fast.ops import _impl

    torch.manual_seed(0)
    saved = (_impl._global, list(_impl._stack))
    yield
    _impl._global, _impl._stack[:] = saved[0], saved[1]


@pytest.fixture
def device():
    """The device the fast paths are tested on: CUDA when IFBF_TEST_GPU=1, else the CPU."""
    if os.environ.get("IFBF_TEST_GPU", "0") not in ("", "0"):
        if not torch.cuda.is_available():
            pytest.skip("IFBF_TEST_GPU=1 but no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


#: tests in these folders check modules and models, not the fast paths (tests/ops does that against the
#: references): they run the reference ops, because under TRITON_INTERPRET=1 the Triton kernels would
#: make every forward pass slow, and a fast path under construction must not mask a module bug (nor the
#: reverse). A test there that wants the switch's default says ``ops.use_impl("auto")``.
REFERENCE_OPS_FOLDERS = ("nn", "models")


@pytest.fixture(autouse=True)
def _reference_ops_for_module_tests(request):
    from ifbf_fast import ops

    if request.path.parent.name in REFERENCE_OPS_FOLDERS and request.path.parent.parent.name == "tests":
        with ops.use_impl("reference"):
            yield
    else:
        yield


#: the session's synthetic city: 8 train images (batch 9 is larger than the split, two --procs ranks
#: get 4 each) and 3 val images (two processes evaluate an uneven 2 + 1), 64x128
TINY_CITY = dict(n_train=8, n_val=3, height=64, width=128, seed=3)


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory):
    """The path of the session's synthetic city (``TINY_CITY``)."""
    from ifbf_fast.data import generate_city
    return generate_city(str(tmp_path_factory.mktemp("tiny_city")), **TINY_CITY)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A ResNet-18 train.py checkpoint with crop 48 and non-trivial norm/FBF weights, no training."""
    from ._tiny_checkpoint import write_tiny_checkpoint
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_checkpoint")), crop=48)


@pytest.fixture(scope="session")
def trained_run(tiny_city, tmp_path_factory):
    """--out of one 2-step run on ``tiny_city`` (crop 64, batch 4, reference ops, the end-of-training
    evaluation): ``iter_00000002.pt`` and ``best.pt``."""
    from ifbf_fast.engine.config import parse_args
    from ifbf_fast.engine.trainer import train

    from ._cli import args_list
    out = str(tmp_path_factory.mktemp("trained_run"))
    words = args_list(dict(data=tiny_city, out=out, backbone="resnet18", crop_size=64, scales=[1.0], batch_size=4,
                           workers=0, iters=2, warmup_iters=1, eval_every=0, ckpt_every=2, gpus=0, seed=1,
                           impl="reference")) + ["--no-progress"]
    train(parse_args(words))
    return out
