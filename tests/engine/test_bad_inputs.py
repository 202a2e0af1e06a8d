"""The table of bad inputs (issue 17): each row is an input a user can get wrong and the one line that
must come back, with its exit code (2: usage error, as argparse; 1: bad data or an unreadable
checkpoint). A row passes when the message holds the expected text, is one line and comes without a
traceback. The session prints "bad inputs: N tried, M handled" (tests/engine/conftest.py).

Kinds of row: ``args`` (command line, ``parse_args``), ``yaml`` (a ``--config`` file), ``run``
(``main`` on the tiny synthetic city, stopping before or at the first step), ``resume`` (``main``
against the checkpoints of a 2-step run), ``check`` (the preflight ``python -m ifbf_fast.data.check``
on a corrupted copy of the city), ``loader`` (the DALI and reference loaders on that copy, without
the preflight: the error must still name the file), ``evaluate`` / ``predict`` / ``export`` (the
inference command lines, ``python -m ifbf_fast.{evaluate,predict,export}``: options and paths, and
errors of the checkpoint or image found before any forward; the tiny checkpoint of
tests/_tiny_checkpoint.py where a row needs one).
"""
import os
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import torch

from ifbf_fast.engine import checkpoint as ck
from ifbf_fast.engine import preflight
from ifbf_fast.engine.config import args_list, model_meta, parse_args, to_dict
from ifbf_fast.engine.trainer import main

from .._tiny_checkpoint import write_tiny_checkpoint

BASE = dict(backbone="resnet18", crop_size=32, batch_size=2, workers=0, iters=2, warmup_iters=1,
            eval_every=0, ckpt_every=1, gpus=0, impl="reference", loader="torch", seed=1)


def words_for(city, out, **overrides):
    values = dict(BASE, data=city, out=str(out))
    values.update(overrides)
    extra = values.pop("extra", [])
    return args_list({k: v for k, v in values.items() if v is not None}) + ["--no-progress"] + extra


# --- the table ----------------------------------------------------------------------------------

ARGS = [  # (words, expected text); all exit 2
    (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    (["--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--momentum", "nan"], "argument --momentum: expected a finite number"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--momentum", "-0.5"], "--momentum must be in [0, 1)"),
    (["--aux-weight", "nan"], "argument --aux-weight: expected a finite number"),
    (["--aux-weight", "-1"], "--aux-weight must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0; got -1.0"),
    (["--weight-decay=-inf"], "argument --weight-decay: expected a finite number"),
    (["--poly-power", "nan"], "argument --poly-power: expected a finite number"),
    (["--poly-power", "-1"], "--poly-power must be >= 0"),
    (["--lr-mult", "inf"], "argument --lr-mult: expected a finite number"),
    (["--keep-ratio", "nan"], "argument --keep-ratio: expected a finite number"),
    (["--ohem-thresh", "nan"], "argument --ohem-thresh: expected a finite number"),
    (["--ohem-thresh", "1.5"], "--ohem-thresh must be in (0, 1] or none"),
    (["--scales", "0.5", "nan"], "argument --scales: expected a finite number, got 'nan'"),
    (["--scales", "0"], "--scales must be positive"),
    (["--eval-scales", "inf"], "argument --eval-scales: expected a finite number"),
    (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["--num-classes", "5"], "--num-classes 5: the labels are Cityscapes train ids"),
    (["--num-classes", "20"], "only --num-classes 19 is valid"),
    (["--crop-size", "8", "--batch-size", "1"], "--batch-size 1: ASPP's image-pooling branch"),
    (["--crop-size", "8", "--batch-size", "1", "--no-aspp"], "the minimum at output stride 16 is --crop-size 17"),
    (["--crop-size", "8", "--batch-size", "1", "--no-aspp", "--output-stride", "8"],
     "the minimum at output stride 8 is --crop-size 9"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--max-nonfinite", "0"], "--max-nonfinite must be > 0"),
    (["--gpus", "-1"], "--gpus must be >= 0"),
    (["--procs", "0"], "--procs must be >= 1"),
]

YAML = [  # (file text, expected text); all exit 2
    ("lr: true\n", "lr: expected a number, got True"),
    ("lr: .nan\n", "lr: expected a finite number, got nan"),
    ("momentum: .inf\n", "momentum: expected a finite number"),
    ("lr: [0.1]\n", "lr: expected a single value, got list"),
    ("momentum: 1.5\n", "--momentum must be in [0, 1)"),
    ("weight_decay: -1\n", "--weight-decay must be >= 0"),
    ("aux: \"no\"\n", "aux: expected true or false (a YAML boolean), got 'no'"),
    ("aux: 0\n", "aux: expected true or false"),
    ("compile: yes please\n", "compile: expected true or false"),
    ("crop_size: 64.5\n", "crop_size: expected an integer, got 64.5"),
    ("crop_size: [1, 2]\n", "crop_size: expected a single value, got list [1, 2]"),
    ("crop_size: true\n", "crop_size: expected an integer, got True"),
    ("crop_size: null\n", "crop_size: null is not allowed"),
    ("scales: [0.5, abc]\n", "scales: expected a number, got 'abc'"),
    ("scales: []\n", "scales: expected at least one value"),
    ("scales: .nan\n", "scales: expected a finite number"),
    ("amp: off\n", "quote the word"),
    ("backbone: resnet19\n", "backbone: 'resnet19' is not one of"),
    ("num_classes: 8\n", "--num-classes 8"),
    ("- lr\n- 0.1\n", "expected a mapping of option names to values"),
    ("lr: [unclosed\n", "not valid YAML"),
]

RUN = [  # (id, overrides or a builder name, expected text, exit code)
    ("pretrained-not-state-dict", "notsd", "does not hold a state_dict", 2),
    ("pretrained-malicious-pickle", "evil", "weights_only loading refused it, nothing in it was run", 2),
    ("pretrained-module-pickle", "module", "weights_only loading refused it", 2),
    ("pretrained-garbage", "garbage", "is not a loadable torch state_dict", 2),
    ("pretrained-other-keys", "wrongkeys", "does not match this resnet18", 2),
    ("gpus-without-gpu", dict(gpus=2), "--gpus 2 but CUDA is not available here", 2),
    ("batch-larger-than-dataset", dict(batch_size=9), "--batch-size 9: the train split", 2),
    ("out-cannot-be-created", "out_sys", "cannot create the folder", 2),
    ("out-is-a-file", "out_file", "cannot create the folder", 2),
    ("out-read-only", "out_readonly", "the folder is not writable", 2),
    ("out-full", "out_full", "but two checkpoints of this model need about", 2),
    ("bad-data-file", "bad_data", "failed the preflight check", 1),
    ("procs-2-rank-error", dict(procs=2, batch_size=5), "--batch-size 5: the train split", 2),
]

RESUME = [  # (id, overrides, expected text, exit code), against a 2-step run's checkpoints
    ("other-batch-size", dict(batch_size=3, iters=4), "resume with --batch-size 2", 2),
    ("inplace-abn-as-bn", dict(norm="bn", iters=4), "whose affine differs (InPlace-ABN's |w| + eps vs BatchNorm's w)", 2),
    ("other-model", dict(spatial_channels=64, iters=4), "spatial_channels: checkpoint 128 vs this run 64", 2),
    ("iters-at-step", dict(iters=2), "--iters 2: checkpoint", 2),
    ("iters-below-step", dict(iters=1, warmup_iters=0), "is already at step 2; nothing to train", 2),
    ("explicit-corrupt", "corrupt_explicit", "could not be read", 1),
    ("none-loads", "all_corrupt", "no usable checkpoint iter_*.pt", 1),
    ("nothing-to-resume", "empty", "no usable checkpoint iter_*.pt", 1),
]

CHECK = [  # (id, how to corrupt the copy, expected text); python -m ifbf_fast.data.check exits 1
    ("png-cut-in-the-middle", "cut_image", "cannot decode image"),
    ("png-truncated", "truncate_image", "truncated PNG"),
    ("label-3-channels", "rgb_label", "must be a single-channel 8-bit labelIds PNG"),
    ("val-label-palette-colour", "palette_val_label", "must be a single-channel 8-bit labelIds PNG"),
    ("label-id-250", "id_250", "250 (5 px)"),
    ("unreadable-folder", "unreadable", "cannot read the folder"),
]

LOADER = [  # (id, loader, corruption, expected text): DataReadError naming the file, no preflight
    ("dali-png-cut-in-the-middle", "dali", "cut_image", "cannot decode image"),
    ("dali-label-3-channels", "dali", "rgb_label", "got 8-bit RGB"),
    ("dali-val-label-colour", "dali", "palette_val_label", "got 8-bit palette"),
    ("torch-val-label-colour", "torch", "palette_val_label", "must be a single-channel 8-bit"),
]


# The inference command lines. Words are added to the tool's BASE words (a later option wins); in them
# {ckpt} is the tiny checkpoint (crop 64), {city} the tiny city, {image} one of its val images, {tmp} an
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
    ("evaluate", ["--mode", "slide", "--stride", "100", "100"], "--stride 100 100 must not exceed the crop 64x64", 2),
    ("evaluate", ["--mode", "slide", "--stride", "100", "100", "--procs", "2"], "must not exceed the crop 64x64", 2),
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
    ("predict", ["{image}", "--mode", "slide", "--stride", "65", "8"], "--stride 65 8 must not exceed the crop 64x64",
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


# --- helpers ------------------------------------------------------------------------------------

def one_error_line(err: str, expected: str) -> str:
    """The single ``...: error: ...`` line of ``err``; fails on a traceback or several error lines."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err[-3000:]
    assert expected in lines[0], (expected, lines[0])
    return lines[0]


@pytest.fixture
def tally(bad_input_tally):
    bad_input_tally["tried"] += 1
    done = []
    yield done.append
    if done:
        bad_input_tally["handled"] += 1


def fake_checkpoint(args, iteration: int) -> dict:
    """What train.py writes, minus the weights: every resume check happens before anything is
    loaded into the model, so these rows need no training run."""
    return {"model": {}, "optimizer": {}, "iteration": iteration, "epoch": 0, "batches_in_epoch": iteration,
            "meta": model_meta(args), "args": to_dict(args)}


@pytest.fixture(scope="module")
def trained(tiny_city, tmp_path_factory):
    """--out of a 2-step run of BASE (checkpoints at steps 1 and 2, without weights)."""
    out = tmp_path_factory.mktemp("trained")
    args = parse_args(words_for(tiny_city, out))
    for it in (1, 2):
        ck.save_atomic(fake_checkpoint(args, it), str(out / ck.CKPT_PATTERN.format(it)))
    return str(out)


def _first(city, kind, split="train"):
    """The first image (kind leftImg8bit) or labelIds file (gtFine) of ``split``."""
    folder = os.path.join(city, kind, split)
    city_dir = os.path.join(folder, sorted(os.listdir(folder))[0])
    suffix = "_leftImg8bit.png" if kind == "leftImg8bit" else "_gtFine_labelIds.png"
    return os.path.join(city_dir, sorted(n for n in os.listdir(city_dir) if n.endswith(suffix))[0])


def corrupt(city, how, dst, monkeypatch):
    """A copy of ``city`` in ``dst`` with one planted problem; returns (root, the file or folder named)."""
    root = os.path.join(dst, "city")
    shutil.copytree(city, root)
    if how in ("cut_image", "truncate_image"):
        path = _first(root, "leftImg8bit")
        data = open(path, "rb").read()
        cut = data[: len(data) // 2] + data[-12:] if how == "cut_image" else data[: len(data) - 20]
        open(path, "wb").write(cut)
    elif how == "rgb_label":
        path = _first(root, "gtFine")
        label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        cv2.imwrite(path, np.stack([label] * 3, -1))
    elif how == "palette_val_label":
        from PIL import Image
        path = _first(root, "gtFine", "val")
        image = Image.fromarray(cv2.imread(path, cv2.IMREAD_UNCHANGED), mode="P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        image.save(path)
    elif how == "id_250":
        path = _first(root, "gtFine")
        label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        label[0, :5] = 250
        cv2.imwrite(path, label)
    elif how == "unreadable":
        # The tests run as root, whom chmod 000 does not stop: make listing the folder fail as it
        # does for another user.
        path = os.path.dirname(_first(root, "gtFine"))
        real = os.listdir

        def listdir(p="."):
            if os.path.abspath(os.fspath(p)) == os.path.abspath(path):
                raise PermissionError(13, "Permission denied", os.fspath(p))
            return real(p)
        monkeypatch.setattr(os, "listdir", listdir)
    else:
        raise ValueError(how)
    return root, path


# --- the rows -----------------------------------------------------------------------------------

@pytest.mark.parametrize("words, expected", ARGS, ids=[" ".join(w) for w, _ in ARGS])
def test_bad_option(words, expected, tmp_path, capsys, tally):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--data", str(tmp_path)] + words)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    one_error_line(err, expected)
    assert err.count("\n") == 1, err          # the line alone, no usage block
    tally(True)


@pytest.mark.parametrize("text, expected", YAML, ids=[t.strip() for t, _ in YAML])
def test_bad_yaml_value(text, expected, tmp_path, capsys, tally):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--config", str(cfg)])
    assert exc.value.code == 2
    one_error_line(capsys.readouterr().err, expected)
    tally(True)


def _pretrained(kind, tmp_path):
    path = str(tmp_path / f"{kind}.pt")
    if kind == "notsd":
        torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, path)
    elif kind == "evil":
        torch.save({"w": _Evil(str(tmp_path / "pwned"))}, path)
    elif kind == "module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "garbage":
        open(path, "wb").write(b"\x00not a torch file" * 10)
    elif kind == "wrongkeys":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "head.weight": torch.zeros(2)}, path)
    return path


class _Evil:
    """Pickles to ``os.system('touch ...')``: loading it without weights_only would run it."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("case", RUN, ids=[c[0] for c in RUN])
def test_bad_run_input(case, tiny_city, tmp_path, capfd, monkeypatch, tally):
    name, how, expected, code = case
    overrides, out, data = {}, tmp_path / "out", tiny_city
    if isinstance(how, dict):
        overrides = how
        if overrides.get("gpus") and torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    elif how in ("notsd", "evil", "module", "garbage", "wrongkeys"):
        overrides = {"pretrained": _pretrained(how, tmp_path)}
    elif how == "out_sys":
        out = "/sys/ifbf_fast_out"       # sysfs refuses new folders, to root too
        try:
            os.mkdir(out)
        except OSError:
            pass
        else:
            os.rmdir(out)
            pytest.skip("/sys takes new folders here")
    elif how == "out_file":
        out = tmp_path / "a_file"
        out.write_text("x")
        out = out / "sub"
    elif how == "out_readonly":
        out.mkdir()
        if os.geteuid() == 0:   # root ignores permissions; an immutable folder stops root too
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)]).returncode:
                pytest.skip("running as root without chattr +i: no way to make a folder read-only")
        else:
            out.chmod(0o500)
    elif how == "out_full":
        from ifbf_fast.engine import preflight
        monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30,
                                                                                             3 << 20))
    elif how == "bad_data":
        data, _ = corrupt(tiny_city, "truncate_image", str(tmp_path), monkeypatch)
        expected_file = _first(data, "leftImg8bit")
    try:
        rc = main(words_for(data, out, **overrides))
    finally:
        if how == "out_readonly" and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(out)])
    err = capfd.readouterr().err
    assert rc == code, err[-3000:]
    if how == "bad_data":
        assert "Traceback" not in err and expected in err and expected_file in err, err[-3000:]
    else:
        line = one_error_line(err, expected)
        if "procs" in overrides:
            assert line.startswith("train.py: error: rank ")
    if how == "evil":
        assert not os.path.exists(tmp_path / "pwned")
    tally(True)


@pytest.mark.parametrize("case", RESUME, ids=[c[0] for c in RESUME])
def test_bad_resume(case, trained, tiny_city, tmp_path, capfd, tally):
    name, how, expected, code = case
    out, overrides = trained, {}
    if isinstance(how, dict):
        overrides = dict(how, resume="latest")
    elif how == "corrupt_explicit":
        bad = tmp_path / "cut.pt"
        data = open(os.path.join(trained, "iter_00000002.pt"), "rb").read()
        bad.write_bytes(data[: len(data) // 2])
        overrides = dict(resume=str(bad), iters=4, out=str(tmp_path / "o"))
    elif how == "all_corrupt":
        for it in (1, 2):
            (tmp_path / ck.CKPT_PATTERN.format(it)).write_bytes(b"PK\x03\x04 cut short")
        out, overrides = tmp_path, dict(resume="latest", iters=4)
    elif how == "empty":
        out, overrides = tmp_path, dict(resume="latest", iters=4)
    rc = main(words_for(tiny_city, overrides.pop("out", out), **overrides))
    err = capfd.readouterr().err
    assert rc == code, err[-3000:]
    one_error_line(err, expected)
    tally(True)


def test_truncated_latest_falls_back(trained, tiny_city, tmp_path, tally):
    """The newest checkpoint cut short (a full disk, a copy interrupted): --resume takes the newest one
    that loads and says which it skipped (what ``_train`` calls, on real files)."""
    out = tmp_path / "o"
    out.mkdir()
    os.link(os.path.join(trained, "iter_00000001.pt"), out / "iter_00000001.pt")
    data = open(os.path.join(trained, "iter_00000002.pt"), "rb").read()
    (out / "iter_00000002.pt").write_bytes(data[: len(data) // 2])
    args = parse_args(words_for(tiny_city, out, resume="latest", iters=4))
    logs = []
    path, state = preflight.resume_state(args, "cpu", logs.append)
    assert path == str(out / "iter_00000001.pt") and state["iteration"] == 1
    assert len(logs) == 2 and "iter_00000002.pt could not be read" in logs[0], logs
    assert f"falling back to {path}, the newest checkpoint that loads" in logs[1]
    tally(True)


def test_stale_temporaries_removed_at_start(tiny_city, tmp_path, tally):
    """A kill during a checkpoint write leaves ``.NAME.tmp.PID`` the size of a checkpoint: removed when
    the next run prepares --out, if the writer is gone and the name is ours."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [tmp_path / f".iter_00000003.pt.tmp.{dead.pid}", tmp_path / f".best.pt.tmp.{dead.pid}"]
    alive = tmp_path / f".iter_00000004.pt.tmp.{os.getppid()}"     # a live writer: left alone
    other = [tmp_path / ".iter_00000003.pt.tmp.x", tmp_path / "notes.pt.tmp.1"]   # not our names
    for p in stale + [alive] + other:
        p.write_bytes(b"\0" * 100)
    logs = []
    preflight.prepare_output(parse_args(words_for(tiny_city, tmp_path)), torch.nn.Linear(2, 2), logs.append)
    assert not any(p.exists() for p in stale) and alive.exists() and all(p.exists() for p in other)
    assert logs == [f"removed 2 temporary file(s) an interrupted checkpoint write left in {tmp_path}"]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in [alive] + other)   # the probe is gone
    tally(True)


@pytest.mark.parametrize("case", CHECK, ids=[c[0] for c in CHECK])
def test_preflight_names_the_file(case, tiny_city, tmp_path, capsys, monkeypatch, tally):
    from ifbf_fast.data.check import main as check_main

    name, how, expected = case
    root, path = corrupt(tiny_city, how, str(tmp_path), monkeypatch)
    assert check_main([root, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("PROBLEM:")]
    assert len(lines) == 1 and expected in lines[0] and path in lines[0], out
    assert "has no label" not in out and "has no image" not in out
    tally(True)


@pytest.mark.parametrize("case", LOADER, ids=[c[0] for c in LOADER])
def test_loader_names_the_file(case, tiny_city, tmp_path, monkeypatch, tally):
    from ifbf_fast.data import DataReadError, build_loader

    name, loader, how, expected = case
    root, path = corrupt(tiny_city, how, str(tmp_path), monkeypatch)
    split = "val" if "val" in how else "train"
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
        from ifbf_fast.data.dali import build_dali_loader
        make = build_dali_loader
    else:
        make = build_loader
    kwargs = dict(batch_size=8, crop_size=32, scales=[1.0], train=True) if split == "train" else dict(train=False)
    ld = make(root, split, workers=1 if loader == "dali" else 0, **kwargs)
    ld.set_epoch(0)
    with pytest.raises(DataReadError) as exc:
        for _ in ld:
            pass
    msg = str(exc.value)
    assert path in msg and expected in msg and "\n" not in msg, msg
    tally(True)


# --- the inference command lines ----------------------------------------------------------------

@pytest.fixture(scope="module")
def inference_inputs(tiny_city, tmp_path_factory):
    """The files the INFERENCE rows name (see there); {tmp} is made per row."""
    folder = tmp_path_factory.mktemp("inference_inputs")
    garbage, broken, photo = folder / "garbage.pt", folder / "broken.png", folder / "photo.png"
    garbage.write_bytes(b"not a checkpoint")
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cv2.imwrite(str(photo), np.zeros((8, 8, 3), np.uint8))
    ckpt = write_tiny_checkpoint(str(folder / "ckpt"), crop=64)
    state = torch.load(ckpt, weights_only=True)
    state["args"]["crop_size"] = None
    torch.save(state, folder / "nocrop.pt")
    return {"ckpt": ckpt, "nocrop": str(folder / "nocrop.pt"), "city": tiny_city,
            "image": _first(tiny_city, "leftImg8bit", "val"), "garbage": str(garbage), "broken": str(broken),
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


def test_scalar_where_a_list_belongs_is_a_one_element_list(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("scales: 0.5\neval_scales: 1\nlr: 1\n")
    args = parse_args(["--config", str(cfg)])
    assert args.scales == [0.5] and args.eval_scales == [1.0] and args.lr == 1.0 and isinstance(args.lr, float)


# --- train.py --help ----------------------------------------------------------------------------

def _blocks(text):
    """{option strings: help text} of a ``--help`` text, each option's lines joined."""
    blocks, current = {}, None
    for line in text.split("\n\n", 1)[1].splitlines():      # after the usage block
        if line.startswith("  -") or (line.startswith("  ") and not line.startswith("   ") and current is None
                                      and line.strip() and not line.strip().endswith(":")):
            invocation, _, help_text = line.strip().partition("  ")
            current = invocation
            blocks[current] = help_text.strip()
        elif line.startswith("    ") and current is not None:
            blocks[current] = (blocks[current] + " " + line.strip()).strip()
        else:
            current = None
    return blocks


def _help_blocks(words, capsys, monkeypatch):
    """(text, {option strings: help text}) from ``train.py [words] --help``."""
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit) as exc:
        parse_args(words + ["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    return text, _blocks(text)


def _assert_honest_help(invocation, help_text):
    """Help text present, one default at most, none of the misleading ones argparse's
    ArgumentDefaultsHelpFormatter adds ("--no-aspp (default: True)", "(default: None)")."""
    assert help_text and help_text != "(default: %(default)s)", f"{invocation}: no help text"
    assert help_text.count("default:") <= 1, f"{invocation}: {help_text}"
    for shown in ("(default: True)", "(default: False)", "(default: None)"):
        assert shown not in help_text, f"{invocation}: {help_text}"


@pytest.mark.parametrize("tool, count", [("evaluate", 20), ("predict", 16), ("export", 7)])
def test_inference_help_is_honest(tool, count, capsys, monkeypatch):
    import importlib

    monkeypatch.setenv("COLUMNS", "300")
    module = importlib.import_module(f"ifbf_fast.{tool}")
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    blocks = _blocks(capsys.readouterr().out)
    assert len(blocks) == count, sorted(blocks)
    for invocation, help_text in blocks.items():
        _assert_honest_help(invocation, help_text)
    if tool != "export":
        assert blocks["--max-batch MAX_BATCH"].endswith("(default: 8)")
        assert blocks["--impl {auto,fast,reference}"].endswith("else auto")
        assert "(default" not in blocks["--flip"] and "(default" not in blocks["--channels-last"]


def test_help_shows_the_defaults_a_bare_run_uses(capsys, monkeypatch):
    text, blocks = _help_blocks([], capsys, monkeypatch)
    bare = parse_args([])
    assert "Defaults shown: the built-in CPU default configs/cpu_default.yaml" in " ".join(text.split())
    assert len(blocks) >= 50, blocks
    for invocation, help_text in blocks.items():
        _assert_honest_help(invocation, help_text)
        if invocation.startswith("--no-") and "ablation" in help_text:
            assert "default: with it" in help_text
        dest = invocation.split()[0].lstrip("-").replace("-", "_").split(",")[0]
        if "(default: " in help_text and hasattr(bare, dest):
            shown = help_text.rsplit("(default: ", 1)[1].rstrip(")")
            assert shown == str(getattr(bare, dest)), (invocation, shown, getattr(bare, dest))
    assert sum("ablation" in h for h in blocks.values()) == 5
    assert "(default: 128)" in blocks["--crop-size CROP_SIZE"]           # cpu_default.yaml, not the paper's 876
    assert blocks["--impl {auto,fast,reference}"].endswith("else auto")
    for flag in ("--lr LR", "--momentum MOMENTUM", "--seed SEED", "--backbone {resnet18,resnet34,resnet50,resnet101}",
                 "--ckpt-every CKPT_EVERY", "--log-every LOG_EVERY"):
        assert not blocks[flag].startswith("(default"), (flag, blocks[flag])


def test_help_with_data_shows_the_paper_recipe(tmp_path, capsys, monkeypatch):
    text, blocks = _help_blocks(["--data", str(tmp_path)], capsys, monkeypatch)
    assert "Defaults shown: the paper's recipe" in " ".join(text.split())
    assert "(default: 876)" in blocks["--crop-size CROP_SIZE"]
    assert "(default: resnet101)" in blocks["--backbone {resnet18,resnet34,resnet50,resnet101}"]
