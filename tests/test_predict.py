"""``python -m ifbf_fast.predict``: Cityscapes submission names and label ids, the palette, overlays,
and the CLI end to end on a checkpoint from a 2-step training run."""
import glob
import json
import os

import cv2
import numpy as np
import pytest
from cityscapesscripts.helpers.labels import trainId2label

from ifbf_fast.data import read_image
from ifbf_fast.predict import PredictError, main, overlay, submission_name, write_submission

from .engine.test_evaluate_official import official_evaluation


def read_png(path):
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img if img.ndim == 2 else img[:, :, ::-1]    # RGB


def test_submission_names_follow_cityscapes():
    assert submission_name("berlin_000123_000019_leftImg8bit.png") == ("berlin", "berlin_000123_000019_leftImg8bit.png")
    assert submission_name("/x/test/bad-honnef/bad-honnef_000000_000123_leftImg8bit.png") == \
        ("bad-honnef", "bad-honnef_000000_000123_leftImg8bit.png")
    assert submission_name("mainz_000001_000002") == ("mainz", "mainz_000001_000002_leftImg8bit.png")
    for bad in ("photo.png", "berlin_abc_000019_leftImg8bit.png", "berlin_000001.png"):
        with pytest.raises(PredictError, match="not a Cityscapes file name"):
            submission_name(bad)


def test_submission_files_hold_label_ids_where_the_official_scripts_look(tmp_path):
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs

    train_ids = np.array([list(range(19)) + [255]], dtype=np.uint8)
    path = write_submission(str(tmp_path), "bonn/bonn_000042_000019_leftImg8bit.png", train_ids)
    assert path == os.path.join(str(tmp_path), "bonn", "bonn_000042_000019_leftImg8bit.png")
    ids = read_png(path)
    assert ids.dtype == np.uint8 and ids.shape == (1, 20)
    assert ids[0, :19].tolist() == [trainId2label[t].id for t in range(19)]
    assert ids[0, [0, 13, 18, 19]].tolist() == [7, 26, 33, 0]     # road, car, bicycle, ignore -> unlabeled
    args = type(cs.args)()
    args.predictionPath, args.predictionWalk = str(tmp_path), None
    assert cs.getPrediction(args, "/gt/bonn/bonn_000042_000019_gtFine_labelIds.png") == path


def test_colour_mask_palette_and_overlay(tmp_path):
    from ifbf_fast.data import PALETTE, colorize

    assert [tuple(c) for c in PALETTE] == [trainId2label[t].color for t in range(19)]
    assert tuple(PALETTE[0]) == (128, 64, 128) and tuple(PALETTE[13]) == (0, 0, 142)   # road, car
    color = colorize(np.array([[0, 10, 255]], dtype=np.uint8))
    assert color.tolist() == [[[128, 64, 128], [70, 130, 180], [0, 0, 0]]]
    image = np.array([[[0, 0, 0], [255, 255, 255], [10, 20, 30]]], dtype=np.uint8)
    assert overlay(image, color, 0.5).tolist() == [[[64, 32, 64], [163, 193, 218], [5, 10, 15]]]
    assert np.array_equal(overlay(image, color, 0.0), image) and np.array_equal(overlay(image, color, 1.0), color)


@pytest.fixture
def city(tiny_city):
    """The session's synthetic city (tests/conftest.py)."""
    return tiny_city


@pytest.fixture
def checkpoint(trained_run):
    """best.pt of the session's 2-step training run (tests/conftest.py)."""
    return os.path.join(trained_run, "best.pt")


def test_cli_pictures(checkpoint, city, tmp_path):
    from ifbf_fast.data import PALETTE

    val = os.path.join(city, "leftImg8bit", "val")
    out = str(tmp_path / "pics")
    assert main(["--checkpoint", checkpoint, val, "--out", out, "--format", "color", "overlay", "panel",
                 "--impl", "reference", "--gpus", "0", "--flip", "--scales", "0.75", "1.0"]) == 0
    images = sorted(glob.glob(os.path.join(val, "*", "*.png")))
    assert len(images) == 3       # the session city's val images (tests/conftest.py TINY_CITY)
    palette = {tuple(c) for c in PALETTE}
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        folder = os.path.join(out, os.path.basename(os.path.dirname(path)))   # the city folder is kept
        image = read_image(path)
        color = read_png(os.path.join(folder, stem + "_color.png"))
        assert color.shape == image.shape and {tuple(c) for c in color.reshape(-1, 3)} <= palette
        assert np.array_equal(read_png(os.path.join(folder, stem + "_overlay.png")), overlay(image, color))
        panel = read_png(os.path.join(folder, stem + "_panel.png"))
        assert np.array_equal(panel, np.concatenate([image, color, overlay(image, color)], axis=1))


def test_cli_submission_matches_evaluate(checkpoint, city, tmp_path, capsys):
    """predict's submission files, scored by cityscapesscripts, give evaluate's numbers for the same
    checkpoint and test-time settings; colour and labelIds outputs agree pixel for pixel."""
    from ifbf_fast.data import PALETTE, TRAIN_TO_LABEL
    from ifbf_fast.evaluate import main as evaluate_main

    val = os.path.join(city, "leftImg8bit", "val")
    common = ["--checkpoint", checkpoint, "--impl", "reference", "--gpus", "0", "--mode", "slide",
              "--crop", "64", "64", "--flip"]
    sub, pics = str(tmp_path / "sub"), str(tmp_path / "pics")
    assert main(common + [val, "--out", sub, "--format", "submission"]) == 0
    files = sorted(glob.glob(os.path.join(sub, "*", "*")))
    assert [os.path.relpath(f, sub) for f in files] == \
        [f"gammaheim/gammaheim_00000{i}_000019_leftImg8bit.png" for i in range(3)]   # the 3 val images
    assert evaluate_main(common + ["--data", city, "--workers", "0", "--no-progress",
                                   "--out", str(tmp_path / "e.json")]) == 0
    ours = json.load(open(tmp_path / "e.json"))
    official = official_evaluation(city, sub)
    for name, iou in ours["iou"].items():
        ref = official["classScores"][name]
        assert (iou is None and ref != ref) or iou == pytest.approx(ref, abs=1e-12), name
    assert ours["miou"] == pytest.approx(official["averageScoreClasses"], abs=1e-12)
    # the colour mask of the same image is the same prediction
    assert main(common + [files[0].replace(sub, val), "--out", pics, "--format", "color"]) == 0
    color = read_png(os.path.join(pics, "gammaheim_000000_000019_leftImg8bit_color.png"))
    train_ids = np.argmax(np.all(color[:, :, None] == PALETTE[None, None], axis=-1), axis=-1)
    assert np.array_equal(TRAIN_TO_LABEL[train_ids], read_png(files[0]))


@pytest.mark.parametrize("case, message, code", [      # 2: a usage error, as argparse's
    ("name", "not a Cityscapes file name", 2),
    ("mixed", "--format submission writes a folder to zip", 2),
    ("missing", "no such file or folder", 2),
    ("empty", "no .png/.jpg/.jpeg images in this folder", 2),
    ("checkpoint", "no such file", 2),
    ("image", "cannot decode", 1),
])
def test_bad_input_gives_one_line_errors(case, message, code, checkpoint, city, tmp_path, capsys):
    image = glob.glob(os.path.join(city, "leftImg8bit", "val", "*", "*.png"))[0]
    ckpt, inputs, fmt = checkpoint, [image], ["color"]
    if case == "name":
        inputs, fmt = [str(tmp_path / "photo.png")], ["submission"]
        cv2.imwrite(inputs[0], np.zeros((8, 8, 3), np.uint8))
    elif case == "mixed":
        fmt = ["submission", "color"]
    elif case == "missing":
        inputs = [str(tmp_path / "nothing.png")]
    elif case == "empty":
        inputs = [str(tmp_path)]
    elif case == "checkpoint":
        ckpt = str(tmp_path / "no.pt")
    else:
        inputs = [str(tmp_path / "broken.png")]
        open(inputs[0], "wb").write(b"\x89PNG\r\n\x1a\nnot really")
    try:
        rc = main(["--checkpoint", ckpt, *inputs, "--out", str(tmp_path / "o"), "--format", *fmt,
                   "--impl", "reference", "--gpus", "0"])
    except SystemExit as exc:       # argparse-level (Parser.error)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.startswith("python -m ifbf_fast.predict: error:") and message in err, err
    assert err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o")
