"""``python -m ifbf_fast.export``: InPlace-ABN swapped for the reference ABN (same state_dict, same
output), the ONNX file run by onnxruntime on the CPU against PyTorch, a torch.export program, graphs
free of the project's custom ops, and one-line errors."""
import os

import numpy as np
import pytest
import torch

import ifbf_fast
from ifbf_fast import ops
from ifbf_fast.data import render_scene
from ifbf_fast.export import Logits, exportable, main

SIZE = (32, 64)


@pytest.fixture
def ckpt(tiny_checkpoint):
    """The session's tiny checkpoint (tests/conftest.py): InPlace-ABN-Sync, crop 48."""
    return tiny_checkpoint


def picture(seed=1):
    return render_scene(*SIZE, np.random.default_rng(seed))[0]


def pytorch_logits(ckpt, image, impl):
    with ops.use_impl(impl), torch.no_grad():
        model = ifbf_fast.load_model(ckpt, device="cpu")
        return Logits(model.model)(model.to_tensor(image)).numpy(), model


def assert_close(got, want, what):
    diff = np.abs(got - want).max()
    assert diff <= 1e-4 * max(1.0, np.abs(want).max()), f"{what}: largest difference {diff}"
    # argmax agrees wherever the top two logits are further apart than the difference
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * diff
    assert clear.mean() > 0.99 and np.array_equal(got.argmax(1)[clear], want.argmax(1)[clear]), what


def test_swap_keeps_the_state_dict_and_the_output(ckpt):
    from ifbf_fast.nn import ABN, InPlaceABN, InPlaceABNSync

    model = ifbf_fast.load_model(ckpt, device="cpu").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {type(m) for m in model.modules()}
    assert InPlaceABNSync in kinds or InPlaceABN in kinds
    x = torch.randn(1, 3, *SIZE)
    with ops.use_impl("reference"), torch.no_grad():
        want = model(x)["out"]
        exportable(model)
        got = model(x)["out"]
    assert not any(isinstance(m, (InPlaceABN, InPlaceABNSync)) for m in model.modules())
    assert sum(type(m) is ABN for m in model.modules()) > 20
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(got, want)


def test_onnx_runs_in_onnxruntime_like_pytorch(ckpt, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = str(tmp_path / "m.onnx")
    assert main(["--checkpoint", ckpt, "--format", "onnx", "--out", out, "--size", *map(str, SIZE)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("check on a synthetic-city scene at 32x64: onnxruntime (CPU) vs PyTorch")
    assert "argmax agrees on" in printed[0]
    assert printed[-1].startswith(f"wrote {out} (onnx") and "(1, 19, 32, 64)" in printed[-1]
    graph = onnx.load(out).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}           # standard operators only
    assert {"Conv", "Sigmoid", "LeakyRelu"} <= {n.op_type for n in graph.node}    # Sigmoid: the FBF gates
    # another image, against the model as loaded: fast C++ InPlace-ABN (and the Triton FBF under the
    # interpreter) in PyTorch, the reference forms in the ONNX graph
    image = picture(seed=7)
    want, model = pytorch_logits(ckpt, image, "auto")
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": model.to_tensor(image).numpy()})[0]
    assert got.shape == (1, 19, *SIZE)
    assert_close(got, want, "onnxruntime vs PyTorch (auto)")


def test_torch_export_program_with_an_image(ckpt, tmp_path, capsys):
    import cv2

    image = render_scene(48, 80, np.random.default_rng(2))[0]
    path = str(tmp_path / "scene.png")
    cv2.imwrite(path, image[:, :, ::-1])
    out = str(tmp_path / "m.pt2")
    with ops.use_impl("reference"):     # the ONNX test checks against the fast paths; here, save the interpreter's time
        assert main(["--checkpoint", ckpt, "--format", "torch-export", "--out", out, "--image", path,
                     "--size", *map(str, SIZE)]) == 0
    printed = capsys.readouterr().out
    assert f"check on {path} at 32x64: torch.export.load vs PyTorch" in printed and f"wrote {out}" in printed
    program = torch.export.load(out)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert targets and not any("ifbf_fast" in t for t in targets), sorted(targets)
    small = cv2.resize(image, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_LINEAR)
    want, model = pytorch_logits(ckpt, small, "reference")
    with torch.no_grad():
        got = program.module()(model.to_tensor(small)).numpy()
    assert_close(got, want, "torch.export vs PyTorch")


@pytest.mark.parametrize("case, message, code", [      # 2: a usage error, as argparse's
    ("checkpoint", "no such file", 2),
    ("format", "unknown format 'tflite'; expected one of onnx, torch-export", 2),
    ("folder", "does not exist", 2),
    ("is_dir", "is a folder; give a file name", 2),
    ("image", "cannot decode", 1),
])
def test_bad_input_gives_one_line_errors(case, message, code, ckpt, tmp_path, capsys):
    words = {"--checkpoint": ckpt, "--format": "onnx", "--out": str(tmp_path / "m.onnx")}
    extra = []
    if case == "checkpoint":
        words["--checkpoint"] = str(tmp_path / "none.pt")
    elif case == "format":
        words["--format"] = "tflite"
    elif case == "folder":
        words["--out"] = str(tmp_path / "no" / "such" / "m.onnx")
    elif case == "is_dir":
        words["--out"] = str(tmp_path)
    else:
        extra = ["--image", str(tmp_path / "broken.png")]
        open(extra[1], "wb").write(b"\x89PNG\r\n\x1a\nnot really")
    try:
        rc = main([w for kv in words.items() for w in kv] + extra)
    except SystemExit as exc:       # argparse-level (Parser.error)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.startswith("python -m ifbf_fast.export: error:") and message in err, err
    assert err.count("\n") == 1
    assert not os.path.exists(tmp_path / "m.onnx")
