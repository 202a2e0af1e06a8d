"""``python -m ifbf_fast.evaluate`` end to end on a checkpoint from a 2-step training run: the same
confusion matrix for 1 and 2 processes (gloo, CPU) and any batch size, the table and JSON file,
sliding window + multi-scale + flip, prediction files the official evaluation agrees with, and
one-line errors for bad input."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from ifbf_fast.data import LABEL_TO_TRAIN, read_label_ids
from ifbf_fast.evaluate import main

from .test_evaluate_official import assert_same_as_official, official_evaluation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def city(tiny_city):
    """The session's synthetic city (tests/conftest.py): 3 val images."""
    return tiny_city


@pytest.fixture
def checkpoint(trained_run):
    """The last checkpoint of the session's 2-step training run (tests/conftest.py)."""
    return os.path.join(trained_run, "iter_00000002.pt")


def cli(checkpoint, city, *words):
    return ["--checkpoint", checkpoint, "--data", city, "--impl", "reference", "--workers", "0",
            "--no-progress", *words]


def valid_pixels(city):
    labels = glob.glob(os.path.join(city, "gtFine", "val", "*", "*_gtFine_labelIds.png"))
    return sum(int((LABEL_TO_TRAIN[read_label_ids(p)] != 255).sum()) for p in labels)


@pytest.mark.slow
def test_one_or_two_processes_and_any_batch_size_give_the_same_matrix(checkpoint, city, tmp_path):
    results = {}
    # 2 processes over gloo, in a subprocess with a timeout: shards of 2 and 1 images, batch 2
    path = str(tmp_path / "two.json")
    proc = subprocess.run([sys.executable, "-m", "ifbf_fast.evaluate", *cli(checkpoint, city), "--gpus", "0",
                           "--procs", "2", "--batch-size", "2", "--out", path],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results["2 procs, batch 2"] = json.load(open(path))
    for batch in (1, 3):
        path = str(tmp_path / f"b{batch}.json")
        assert main(cli(checkpoint, city, "--gpus", "0", "--batch-size", str(batch), "--out", path)) == 0
        results[f"1 proc, batch {batch}"] = json.load(open(path))
    ref = results["1 proc, batch 1"]
    assert ref["images"] == 3 and ref["pixels"] == valid_pixels(city)
    assert ref["processes"] == 1 and results["2 procs, batch 2"]["processes"] == 2
    for name, res in results.items():
        assert res["confusion"] == ref["confusion"], name
        assert (res["images"], res["miou"], res["pixel_acc"]) == (ref["images"], ref["miou"], ref["pixel_acc"]), name


def test_table_json_slide_multiscale_flip_and_official_agreement(checkpoint, city, tmp_path, capsys):
    out, preds = str(tmp_path / "res" / "slide.json"), str(tmp_path / "preds")
    assert main(cli(checkpoint, city, "--gpus", "0", "--mode", "slide", "--crop", "64", "64", "--stride", "48", "48",
                    "--scales", "0.75", "1.0", "--flip", "--batch-size", "2", "--max-batch", "5", "--channels-last",
                    "--out", out, "--save-predictions", preds)) == 0
    printed = capsys.readouterr().out
    for word in ("road", "sidewalk", "traffic sign", "bicycle", "mIoU", "pixel acc", "mode slide crop 64x64"):
        assert word in printed, word
    doc = json.load(open(out))
    assert (doc["mode"], doc["crop"], doc["stride"], doc["scales"], doc["flip"]) == \
        ("slide", [64, 64], [48, 48], [0.75, 1.0], True)
    assert list(doc["iou"])[:2] == ["road", "sidewalk"] and len(doc["iou"]) == 19
    assert None in doc["iou"].values()          # classes absent from the city and the prediction: null
    assert f"{100 * doc['miou']:7.2f}" in printed
    # the saved predictions, scored by cityscapesscripts, give the same numbers
    ours = {"iou": [float("nan") if v is None else v for v in doc["iou"].values()], "miou": doc["miou"],
            "pixel_acc": doc["pixel_acc"]}
    assert_same_as_official(ours, official_evaluation(city, preds))


def test_whole_mode_defaults_match_the_training_run_evaluation(checkpoint, city, tmp_path):
    """The checkpoint's own end-of-training evaluation (whole image, scale 1) is reproduced."""
    from ifbf_fast.engine.checkpoint import load

    assert main(cli(checkpoint, city, "--gpus", "0", "--out", str(tmp_path / "w.json"))) == 0
    doc = json.load(open(tmp_path / "w.json"))
    assert doc["miou"] == pytest.approx(load(checkpoint)["best_miou"], abs=1e-12)


@pytest.mark.parametrize("case, message, code", [
    ("missing", "no such file", 2),          # a path that does not exist: a usage error, as argparse's
    ("garbage", "could not be read", 1),
    ("no_model", "is not an ifbf_fast checkpoint (no 'model' entry)", 1),
    ("no_args", "is not an ifbf_fast checkpoint (no 'args'/'meta' entries)", 1),
    ("other_model", "was made for another model: num_classes", 1),
    ("bad_weights", "cannot rebuild its model", 1),
    ("bad_data", "is not a Cityscapes layout", 1),
    ("bad_data_2procs", "is not a Cityscapes layout", 1),
])
def test_bad_input_gives_one_line_errors(case, message, code, checkpoint, city, tmp_path, capsys):
    ckpt, data, extra = checkpoint, city, []
    if case == "missing":
        ckpt = str(tmp_path / "nope.pt")
    elif case == "garbage":
        ckpt = str(tmp_path / "garbage.pt")
        open(ckpt, "w").write("not a checkpoint")
    elif case in ("no_model", "no_args", "other_model", "bad_weights"):
        state = torch.load(checkpoint, weights_only=True)
        if case == "no_model":
            state = {"weights": state["model"]}
        elif case == "no_args":
            del state["args"]
        elif case == "other_model":
            state["meta"]["num_classes"] = 8
        else:
            state["model"] = {k: v for k, v in list(state["model"].items())[:-3]}
        ckpt = str(tmp_path / f"{case}.pt")
        torch.save(state, ckpt)
    else:
        data = str(tmp_path)
        extra = ["--procs", "2"] if case == "bad_data_2procs" else []
    try:
        rc = main(cli(ckpt, data, "--gpus", "0", *extra))
    except SystemExit as exc:       # argparse-level (Parser.error)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.startswith("python -m ifbf_fast.evaluate: error:") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_options_are_refused_by_argparse(checkpoint, city, capsys):
    for words, message in ((["--crop", "48", "48"], "--crop/--stride are for --mode slide"),
                           (["--mode", "slide", "--crop", "0", "8"], "--crop must be positive"),
                           (["--scales", "0"], "--scales must be positive"),
                           (["--scales", "nan"], "argument --scales: expected a finite number"),
                           (["--mode", "slide", "--crop", "8", "8", "--stride", "4", "9"], "must not exceed --crop"),
                           (["--max-batch", "-1"], "--max-batch must be >= 0")):
        with pytest.raises(SystemExit) as exc:
            main(cli(checkpoint, city, *words))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and err.count("\n") == 1, err   # one line, no usage block


def test_max_batch_defaults_to_8_and_0_means_all_at_once(tmp_path):
    from ifbf_fast.evaluate import parse_args as eval_args
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"")          # parse_args checks that the paths exist, nothing more
    assert eval_args(["--checkpoint", str(ckpt), "--data", str(tmp_path)]).max_batch == 8
    assert eval_args(["--checkpoint", str(ckpt), "--data", str(tmp_path), "--max-batch", "0"]).max_batch is None
