"""The table of bad inputs, inference rows (see tests/engine/test_bad_inputs.py for the table's
rules): the command lines ``python -m ifbf_fast.{evaluate,predict,export}``, their options and paths,
and errors of the checkpoint or image found before any forward."""
import os

import cv2
import numpy as np
import pytest
import torch

from ._bad_inputs import first_file, one_error_line


# The inference command lines. Words are added to the tool's BASE words (a later option wins); in them
# {ckpt} is the session's tiny checkpoint (crop 48), {city} the tiny city, {image} one of its val images, {tmp} an
# empty folder, {garbage} a file that is not a checkpoint, {broken} a PNG cut short, {photo} a PNG whose
# name is not a Cityscapes name, {none} a path that does not exist, {nocrop} the tiny checkpoint without
# a saved training crop. No row runs a forward.
INFERENCE_BASE = {
    "evaluate": ["--checkpoint", "{ckpt}", "--data", "{city}", "--gpus", "0", "--workers", "0", "--impl",
                 "reference", "--no-progress"],
    "predict": ["--checkpoint", "{ckpt}", "--out", "{tmp}/o", "--gpus", "0", "--impl", "reference"],
    "export": ["--checkpoint", "{ckpt}", "--format", "onnx", "--out", "{tmp}/m.onnx", "--no-check"],
}

INFERENCE = [  # (tool, words, expected text, exit code)
    # evaluate: options
    ("evaluate", ["--scales", "nan"], "argument --scales: expected a finite number, got 'nan'", 2),
    ("evaluate", ["--scales", "1", "inf"], "argument --scales: expected a finite number, got 'inf'", 2),
    ("evaluate", ["--scales", "0.5", "0"], "--scales must be positive; got 0.5 0", 2),
    ("evaluate", ["--scales", "-1"], "--scales must be positive", 2),
    ("evaluate", ["--scales", "big"], "argument --scales: expected a number, got 'big'", 2),
    ("evaluate", ["--crop", "48", "48"], "--crop/--stride are for --mode slide", 2),
    ("evaluate", ["--stride", "8", "8"], "--stride: --crop/--stride are for --mode slide", 2),
    ("evaluate", ["--mode", "slide", "--crop", "0", "8"], "--crop must be positive; got 0 8", 2),
    ("evaluate", ["--mode", "slide", "--crop", "8", "8", "--stride", "4", "9"], "must not exceed --crop 8 8", 2),
    ("evaluate", ["--mode", "slide", "--crop", "8"], "argument --crop: expected 2 arguments", 2),
    ("evaluate", ["--mode", "tiles"], "argument --mode: invalid choice: 'tiles'", 2),
    ("evaluate", ["--max-batch", "-1"], "--max-batch must be >= 0 (0: all at once); got -1", 2),
    ("evaluate", ["--batch-size", "0"], "--batch-size must be >= 1; got 0", 2),
    ("evaluate", ["--procs", "0"], "--procs must be >= 1; got 0", 2),
    ("evaluate", ["--workers", "-1"], "--workers must be >= 0; got -1", 2),
    ("evaluate", ["--gpus", "-1"], "--gpus must be >= 0; got -1", 2),
    ("evaluate", ["--gpus", "1", "--procs", "2"], "--procs is for CPU runs (--gpus 0)", 2),
    ("evaluate", ["--amp", "fp32"], "argument --amp: invalid choice: 'fp32'", 2),
    ("evaluate", ["--checkpoint", "{none}"], "--checkpoint {none}: no such file", 2),
    ("evaluate", ["--checkpoint", "{tmp}"], "--checkpoint {tmp}: a folder, not a file", 2),
    ("evaluate", ["--data", "{none}"], "--data {none}: no such directory", 2),
    ("evaluate", ["--out", "{tmp}"], "--out {tmp}: is a folder; give a JSON file name", 2),
    ("evaluate", ["--save-predictions", "{garbage}"], "--save-predictions {garbage}: is a file", 2),
    # evaluate: against the machine, the checkpoint and the data
    ("evaluate", ["--gpus", "2"], "--gpus 2 but CUDA is not available here", 2),
    ("evaluate", ["--amp", "fp16"], "--amp fp16 needs a GPU", 2),
    ("evaluate", ["--amp", "fp16", "--procs", "2"], "--amp fp16 needs a GPU", 2),
    ("evaluate", ["--mode", "slide", "--stride", "100", "100"], "--stride 100 100 must not exceed the crop 48x48", 2),
    ("evaluate", ["--mode", "slide", "--stride", "100", "100", "--procs", "2"], "must not exceed the crop 48x48", 2),
    ("evaluate", ["--checkpoint", "{nocrop}", "--mode", "slide"], "mode slide: give a crop (--crop H W)", 2),
    ("evaluate", ["--checkpoint", "{garbage}"], "could not be read", 1),
    ("evaluate", ["--data", "{tmp}"], "is not a Cityscapes layout for split 'val'", 1),
    ("evaluate", ["--split", "test"], "is not a Cityscapes layout for split 'test'", 1),
    # predict: options
    ("predict", ["{image}", "--alpha", "nan"], "argument --alpha: expected a finite number, got 'nan'", 2),
    ("predict", ["{image}", "--alpha", "1.5"], "--alpha must be in [0, 1]; got 1.5", 2),
    ("predict", ["{image}", "--alpha", "-0.1"], "--alpha must be in [0, 1]; got -0.1", 2),
    ("predict", ["{image}", "--scales", "nan"], "argument --scales: expected a finite number", 2),
    ("predict", ["{image}", "--scales", "0"], "--scales must be positive", 2),
    ("predict", ["{image}", "--crop", "32", "32"], "--crop/--stride are for --mode slide", 2),
    ("predict", ["{image}", "--gpus", "2"], "argument --gpus: invalid choice: 2", 2),
    ("predict", ["{image}", "--format", "jpeg"], "argument --format: invalid choice: 'jpeg'", 2),
    ("predict", ["{image}", "--format", "submission", "color"], "--format submission writes a folder to zip", 2),
    ("predict", ["{image}", "--checkpoint", "{none}"], "--checkpoint {none}: no such file", 2),
    ("predict", ["{image}", "--out", "{garbage}"], "--out {garbage}: is a file; give a folder", 2),
    ("predict", [], "the following arguments are required: IMAGES_OR_DIR", 2),
    # predict: against the inputs, the machine and the checkpoint
    ("predict", ["{none}"], "{none}: no such file or folder", 2),
    ("predict", ["{tmp}"], "no .png/.jpg/.jpeg images in this folder", 2),
    ("predict", ["{photo}", "--format", "submission"], "not a Cityscapes file name", 2),
    ("predict", ["{image}", "--gpus", "1"], "--gpus 1 but CUDA is not available here", 2),
    ("predict", ["{image}", "--mode", "slide", "--stride", "49", "8"], "--stride 49 8 must not exceed the crop 48x48",
     2),
    ("predict", ["{image}", "--checkpoint", "{nocrop}", "--mode", "slide"], "the checkpoint records no training crop",
     2),
    ("predict", ["{image}", "--checkpoint", "{garbage}"], "could not be read", 1),
    ("predict", ["{broken}"], "cannot decode", 1),
    # export
    ("export", ["--format", "tflite"], "argument --format: unknown format 'tflite'; expected one of onnx, torch-export",
     2),
    ("export", ["--size", "0", "64"], "--size must be positive; got 0 64", 2),
    ("export", ["--size", "32"], "argument --size: expected 2 arguments", 2),
    ("export", ["--checkpoint", "{none}"], "--checkpoint {none}: no such file", 2),
    ("export", ["--image", "{none}"], "--image {none}: no such file", 2),
    ("export", ["--out", "{tmp}"], "is a folder; give a file name", 2),
    ("export", ["--out", "{none}/m.onnx"], "does not exist", 2),
    ("export", ["--checkpoint", "{garbage}"], "could not be read", 1),
    ("export", ["--image", "{broken}"], "cannot decode", 1),
]


@pytest.fixture(scope="module")
def inference_inputs(tiny_city, tiny_checkpoint, tmp_path_factory):
    """The files the INFERENCE rows name (see there); {tmp} is made per row."""
    folder = tmp_path_factory.mktemp("inference_inputs")
    garbage, broken, photo = folder / "garbage.pt", folder / "broken.png", folder / "photo.png"
    garbage.write_bytes(b"not a checkpoint")
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cv2.imwrite(str(photo), np.zeros((8, 8, 3), np.uint8))
    ckpt = tiny_checkpoint
    state = torch.load(ckpt, weights_only=True)
    state["args"]["crop_size"] = None
    torch.save(state, folder / "nocrop.pt")
    return {"ckpt": ckpt, "nocrop": str(folder / "nocrop.pt"), "city": tiny_city,
            "image": first_file(tiny_city, "leftImg8bit", "val"), "garbage": str(garbage), "broken": str(broken),
            "photo": str(photo), "none": str(folder / "no" / "such")}


def _inference_main(tool):
    from ifbf_fast import evaluate, export, predict
    return {"evaluate": evaluate.main, "predict": predict.main, "export": export.main}[tool]


@pytest.mark.parametrize("case", INFERENCE, ids=[f"{c[0]} {' '.join(c[1])}" for c in INFERENCE])
def test_bad_inference_input(case, inference_inputs, tmp_path, capsys, tally):
    tool, words, expected, code = case
    if ("CUDA is not" in expected or "needs a GPU" in expected) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    names = dict(inference_inputs, tmp=str(tmp_path))
    argv = [w.format(**names) for w in INFERENCE_BASE[tool] + words]
    try:
        rc = _inference_main(tool)(argv)
    except SystemExit as exc:       # argparse (Parser.error)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err[-3000:]
    one_error_line(err, expected.format(**names))
    assert "usage:" not in err and err.startswith(f"python -m ifbf_fast.{tool}: error: "), err[-3000:]
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "m.onnx")   # nothing written
    tally(True)

