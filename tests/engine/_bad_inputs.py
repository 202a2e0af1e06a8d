"""What the table of bad inputs shares (tests/engine/test_bad_inputs*.py): the train.py words of a row,
the one-line check, the fake checkpoints of a 2-step run and the corrupted copies of the tiny city.

The table is split by what a row drives: test_bad_inputs.py (train.py: options, YAML values, runs,
resumes), test_bad_inputs_data.py (the preflight check and the loaders on a corrupted city),
test_bad_inputs_inference.py (python -m ifbf_fast.{evaluate,predict,export}). Each row counts in the
session's "bad inputs: N tried, M handled" through the ``tally`` fixture (tests/engine/conftest.py).
"""
import os
import shutil

import cv2
import numpy as np

from ifbf_fast.engine.config import model_meta, to_dict

from .._cli import args_list

BASE = dict(backbone="resnet18", crop_size=32, batch_size=2, workers=0, iters=2, warmup_iters=1,
            eval_every=0, ckpt_every=1, gpus=0, impl="reference", loader="torch", seed=1)


def words_for(city, out, **overrides):
    values = dict(BASE, data=city, out=str(out))
    values.update(overrides)
    extra = values.pop("extra", [])
    return args_list({k: v for k, v in values.items() if v is not None}) + ["--no-progress"] + extra


def one_error_line(err: str, expected: str) -> str:
    """The single ``...: error: ...`` line of ``err``; fails on a traceback or several error lines."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err[-3000:]
    assert expected in lines[0], (expected, lines[0])
    return lines[0]



def fake_checkpoint(args, iteration: int) -> dict:
    """What train.py writes, minus the weights: every resume check happens before anything is
    loaded into the model, so these rows need no training run."""
    return {"model": {}, "optimizer": {}, "iteration": iteration, "epoch": 0, "batches_in_epoch": iteration,
            "meta": model_meta(args), "args": to_dict(args)}



def first_file(city, kind, split="train"):
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
        path = first_file(root, "leftImg8bit")
        data = open(path, "rb").read()
        cut = data[: len(data) // 2] + data[-12:] if how == "cut_image" else data[: len(data) - 20]
        open(path, "wb").write(cut)
    elif how == "rgb_label":
        path = first_file(root, "gtFine")
        label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        cv2.imwrite(path, np.stack([label] * 3, -1))
    elif how == "palette_val_label":
        from PIL import Image
        path = first_file(root, "gtFine", "val")
        image = Image.fromarray(cv2.imread(path, cv2.IMREAD_UNCHANGED), mode="P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        image.save(path)
    elif how == "id_250":
        path = first_file(root, "gtFine")
        label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        label[0, :5] = 250
        cv2.imwrite(path, label)
    elif how == "unreadable":
        # The tests run as root, whom chmod 000 does not stop: make listing the folder fail as it
        # does for another user.
        path = os.path.dirname(first_file(root, "gtFine"))
        real = os.listdir

        def listdir(p="."):
            if os.path.abspath(os.fspath(p)) == os.path.abspath(path):
                raise PermissionError(13, "Permission denied", os.fspath(p))
            return real(p)
        monkeypatch.setattr(os, "listdir", listdir)
    else:
        raise ValueError(how)
    return root, path

