"""Your own data end to end: train.py on the synthetic city written in the folder layout (one step at
the table of bad inputs' tiny settings), then evaluate and predict with its checkpoint: the class table
travels in the checkpoint, so names, colours and mask ids are the dataset's, not Cityscapes'."""
import os

import cv2
import numpy as np
import pytest
import torch

from ifbf_fast.data import class_table_of, generate_city
from ifbf_fast.data.synthetic import FOLDER_CLASSES
from ifbf_fast.engine.config import parse_args
from ifbf_fast.engine.trainer import main

from .._cli import args_list


@pytest.fixture(scope="module")
def folder_city(tmp_path_factory):
    return generate_city(str(tmp_path_factory.mktemp("folder_city")), n_train=2, n_val=1, height=32, width=64,
                         seed=3, layout="folder")


def words(city, out, **overrides):
    values = dict(data=city, out=str(out), backbone="resnet18", crop_size=32, scales=[1.0], batch_size=2,
                  workers=0, iters=1, warmup_iters=0, lr=0.01, eval_every=0, ckpt_every=1, log_every=1, gpus=0,
                  seed=1, impl="reference", loader="torch")
    values.update(overrides)
    return args_list(values) + ["--no-progress"]


def test_num_classes_follows_the_class_table(folder_city, tmp_path, capsys):
    args = parse_args(words(folder_city, tmp_path))
    assert args.num_classes == len(FOLDER_CLASSES) == 9 and args.classes["names"] == list(FOLDER_CLASSES)
    assert parse_args(words(folder_city, tmp_path, num_classes=9)).num_classes == 9
    with pytest.raises(SystemExit) as exc:
        parse_args(words(folder_city, tmp_path, num_classes=19))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-classes 19: " in err and "classes.yaml lists 9 classes" in err
    assert parse_args(["--data", str(tmp_path)]).num_classes == 19        # not a folder layout: Cityscapes'


def test_train_evaluate_predict_on_the_folder_layout(folder_city, tmp_path, capsys):
    from ifbf_fast import evaluate, load_model, predict

    out = tmp_path / "run"
    assert main(words(folder_city, out)) == 0
    log = capsys.readouterr().out + open(out / "train.log").read()
    assert "traffic sign" in log and "terrain" not in log        # the IoU table has the folder classes
    ckpt = str(out / "best.pt")
    table = class_table_of(folder_city)
    model = load_model(ckpt, "cpu")
    assert model.num_classes == 9 and model.class_names == list(FOLDER_CLASSES) and model.classes == table
    state = torch.load(ckpt, weights_only=True)
    assert state["args"]["classes"]["names"] == list(FOLDER_CLASSES)

    preds = tmp_path / "preds"
    assert evaluate.main(["--checkpoint", ckpt, "--data", folder_city, "--gpus", "0", "--workers", "0", "--impl",
                          "reference", "--no-progress", "--save-predictions", str(preds)]) == 0
    text = capsys.readouterr().out
    assert "1 images" in text and "traffic sign" in text and "mIoU" in text
    names = open(os.path.join(folder_city, "splits", "val.txt")).read().split()
    saved = [cv2.imread(str(preds / f"{n}.png"), cv2.IMREAD_UNCHANGED) for n in names]
    assert all(m is not None and m.shape == (32, 64) for m in saved)
    assert set(np.unique(np.concatenate([m.ravel() for m in saved])).tolist()) <= set(table.ids)  # mask ids

    image = os.path.join(folder_city, "images", names[0] + ".png")
    assert predict.main([image, "--checkpoint", ckpt, "--out", str(tmp_path / "p"), "--gpus", "0", "--impl",
                         "reference", "--format", "color"]) == 0
    color = cv2.imread(str(tmp_path / "p" / f"{names[0]}_color.png"))[:, :, ::-1]
    assert {tuple(c) for c in color.reshape(-1, 3).tolist()} <= {tuple(c) for c in table.palette.tolist()}

    # the data's classes must be the checkpoint's; submissions need Cityscapes' classes
    from ifbf_fast.data.synthetic import generate_city as gen
    cs = gen(str(tmp_path / "cs"), n_train=1, n_val=1, height=32, width=64, seed=1)
    assert evaluate.main(["--checkpoint", ckpt, "--data", cs, "--gpus", "0", "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "are not the checkpoint's (9 classes: road, sidewalk, building, pole, ...)" in err
    assert predict.main([image, "--checkpoint", ckpt, "--out", str(tmp_path / "s"), "--gpus", "0",
                         "--format", "submission"]) == 2
    assert "--format submission needs a checkpoint with Cityscapes' classes" in capsys.readouterr().err
