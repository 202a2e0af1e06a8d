"""The Python inference API (``ifbf_fast.load_model`` -> ``Segmenter``): the loader's preprocessing bit
for bit, the test-time options passed through to ``engine.evaluate``, batches, outputs at the input
size, the colour helpers, the CLI giving the API's result, and clear errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ifbf_fast
from ifbf_fast.data import normalize, read_image, render_scene
from ifbf_fast.engine.evaluate import predict as engine_predict
from ifbf_fast.inference import InferenceError


@pytest.fixture(autouse=True)
def _reference_ops():
    """The reference ops: the Triton interpreter would take ~10 s per forward of the FBF modules on the
    CPU; what is tested here does not depend on the implementation (conftest restores the switch)."""
    from ifbf_fast import ops

    ops.set_impl("reference")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    """The session's tiny checkpoint (tests/conftest.py): crop 48."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def model(ckpt):
    return ifbf_fast.load_model(ckpt, device="cpu")


def scene(h=32, w=48, seed=0):
    return render_scene(h, w, np.random.default_rng(seed))[0]


def expected(model, image, **kw):
    """The engine's prediction on the evaluation loader's normalisation (numpy)."""
    x = torch.from_numpy(np.ascontiguousarray(normalize(image).transpose(2, 0, 1)))[None]
    return engine_predict(model.model, x, **kw).argmax(1)[0].numpy()


def test_the_model_knows_its_checkpoint_and_preprocessing(model):
    from ifbf_fast.data import IMAGENET_MEAN, IMAGENET_STD

    assert isinstance(model, ifbf_fast.Segmenter) and not model.model.training
    assert (model.num_classes, model.crop_size, model.device.type) == (19, (48, 48), "cpu")
    assert (model.mean, model.std) == (IMAGENET_MEAN, IMAGENET_STD) and model.class_names[0] == "road"
    image = scene()
    x = model.to_tensor(image)
    assert x.shape == (1, 3, 32, 48) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.from_numpy(normalize(image).transpose(2, 0, 1)))   # bit for bit


@pytest.mark.parametrize("kw", [
    dict(),
    dict(scales=(0.75, 1.25), flip=True),
    dict(mode="slide", crop=(24, 24), stride=(16, 16), max_batch=3),
])
def test_predict_is_the_engine_prediction_at_the_input_size(model, kw):
    image = scene(seed=1)
    pred = model.predict(image, **kw)
    assert pred.shape == image.shape[:2] and pred.dtype == np.uint8
    engine_kw = dict(scales=kw.get("scales", (1.0,)), flip=kw.get("flip", False), mode=kw.get("mode", "whole"),
                     crop_size=kw.get("crop"), stride=kw.get("stride"), max_batch=kw.get("max_batch"))
    assert np.array_equal(pred, expected(model, image, **engine_kw))


def test_slide_defaults_to_the_training_crop(model):
    image = scene(seed=2)
    assert np.array_equal(model.predict(image, mode="slide"),
                          expected(model, image, mode="slide", crop_size=(48, 48)))


def test_paths_lists_and_arrays(model, tmp_path):
    import cv2

    a, b = scene(seed=3), scene(h=24, w=30, seed=4)
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, a[:, :, ::-1])
    one = model.predict(a)
    assert np.array_equal(model.predict(path), one)
    assert np.array_equal(model.predict(tmp_path / "a.png"), one)           # pathlib.Path
    mixed = model.predict([path, b, a])
    assert isinstance(mixed, list) and [m.shape for m in mixed] == [(32, 48), (24, 30), (32, 48)]
    assert np.array_equal(mixed[0], one) and np.array_equal(mixed[1], model.predict(b))
    batch = model.predict(np.stack([a, a[:, ::-1], a]))
    assert batch.shape == (3, 32, 48) and batch.dtype == np.uint8
    assert np.array_equal(batch[0], one) and np.array_equal(batch[1], model.predict(np.ascontiguousarray(a[:, ::-1])))
    assert model.predict(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 8, 8)


def test_images_of_one_size_share_forwards_up_to_max_batch(model):
    seen = []
    hook = model.model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    try:
        a = scene(h=16, w=24)
        model.predict([a, a, a, scene(h=16, w=20), a], max_batch=2)
        assert [s[0] for s in seen] == [2, 1, 1, 1]                 # sizes change -> new group
        seen.clear()
        model.predict(np.stack([a] * 3), flip=True, max_batch=4)    # 2 images x 2 views, then 1 x 2
        assert [s[0] for s in seen] == [4, 2]
        seen.clear()
        model.predict(np.stack([a] * 3), max_batch=0)               # 0: no cap
        assert [s[0] for s in seen] == [3]
    finally:
        hook.remove()


def test_colour_and_overlay_helpers(model, tmp_path):
    from ifbf_fast.data import PALETTE

    image = scene(seed=5)
    pred = model.predict(image)
    color = ifbf_fast.colorize(pred)
    assert color.shape == (32, 48, 3) and np.array_equal(color, PALETTE[pred])
    assert np.array_equal(model.colorize(pred), color)
    mixed = ifbf_fast.overlay(image, color, 0.25)
    assert np.array_equal(mixed, np.clip(0.75 * image + 0.25 * color.astype(np.float32) + 0.5, 0, 255).astype(np.uint8))
    import cv2
    cv2.imwrite(str(tmp_path / "s.png"), image[:, :, ::-1])
    assert np.array_equal(model.overlay(str(tmp_path / "s.png"), pred, 0.25), mixed)


def test_the_predict_cli_writes_the_api_prediction(model, ckpt, tmp_path):
    from ifbf_fast.data import PALETTE
    from ifbf_fast.predict import main

    import cv2
    image = scene(seed=6)
    cv2.imwrite(str(tmp_path / "in.png"), image[:, :, ::-1])
    assert main(["--checkpoint", ckpt, str(tmp_path / "in.png"), "--out", str(tmp_path / "o"), "--format", "color",
                 "--gpus", "0", "--flip", "--scales", "0.5", "1.0", "--impl", "reference"]) == 0
    color = cv2.imread(str(tmp_path / "o" / "in_color.png"))[:, :, ::-1]
    assert np.array_equal(color, PALETTE[model.predict(read_image(str(tmp_path / "in.png")), scales=(0.5, 1.0),
                                                       flip=True)])


def test_bad_input_is_named(model, tmp_path):
    from ifbf_fast.data import DataReadError
    from ifbf_fast.engine.checkpoint import CheckpointError

    with pytest.raises(ValueError, match=r"RGB uint8 array \(H, W, 3\).*shape \(8, 8\) dtype uint8"):
        model.predict(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        model.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"image 1 must be"):
        model.predict([np.zeros((8, 8, 3), np.uint8), 3])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        model.predict(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(DataReadError, match="nothing.png"):
        model.predict(str(tmp_path / "nothing.png"))
    with pytest.raises(ValueError, match="mode='slide'"):
        model.predict(scene(), crop=(8, 8))
    with pytest.raises(ValueError, match="mode must be one of"):
        model.predict(scene(), mode="tiles")
    with pytest.raises(CheckpointError, match="does not exist"):
        ifbf_fast.load_model(str(tmp_path / "no.pt"), device="cpu")
    model.crop_size, saved = None, model.crop_size
    try:
        with pytest.raises(InferenceError, match="give a crop"):
            model.predict(scene(), mode="slide")
    finally:
        model.crop_size = saved


def test_import_stays_light():
    code = "import sys, ifbf_fast; assert 'torch' not in sys.modules; assert callable(ifbf_fast.load_model)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
