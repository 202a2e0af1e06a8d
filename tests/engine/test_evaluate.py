"""engine.evaluate with models whose output is known: averaging over scales, flips and sliding-window
tiles, padding of small images, batching, and mIoU through ``evaluate`` on constructed predictions."""
import math

import pytest
import torch
import torch.nn.functional as F

from ifbf_fast.engine.evaluate import evaluate, predict, tile_starts


class Probe(torch.nn.Module):
    """Logits that reveal what the model saw. Channel 0: the column index inside the input it was
    given (not flip-equivariant); channel 1: the input's channel 0 (content, passed through);
    channel 2: the height of the input it was given. Records every input shape."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        n, _, h, w = x.shape
        col = torch.arange(w, dtype=torch.float32).expand(n, 1, h, w)
        height = torch.full((n, 1, h, w), float(h))
        return {"out": torch.cat([col, x[:, :1].float(), height], 1)}


def ramp(n=2, h=6, w=10):
    """Images whose channel 0 is the column index plus 100 * the image index."""
    x = torch.zeros(n, 3, h, w)
    x[:, 0] = torch.arange(w, dtype=torch.float32) + 100 * torch.arange(n, dtype=torch.float32)[:, None, None]
    return x


def test_tile_starts():
    assert tile_starts(10, 6, 4) == [0, 4]
    assert tile_starts(10, 10, 3) == [0]
    assert tile_starts(5, 8, 4) == [0]          # smaller than the crop: one (padded) tile
    assert tile_starts(11, 4, 3) == [0, 3, 6, 7]   # last tile clamped to the border
    assert tile_starts(12, 4, 4) == [0, 4, 8]


def test_whole_single_view_is_the_model_output():
    model, x = Probe(), ramp()
    out = predict(model, x)
    assert torch.equal(out, model(x)["out"])


def test_flip_unflips_the_output_and_averages():
    model, x = Probe(), ramp(n=2, w=10)
    out = predict(model, x, flip=True)
    # The flipped view's column map, flipped back, is 9 - j: the mean is 4.5 everywhere. Without the
    # un-flip it would stay j; without flipping the input, channel 1 would average to a constant.
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 4.5))
    assert torch.equal(out[:, 1], x[:, 0])
    # One forward for both views of both images (the flips ride in the same batch).
    assert model.shapes == [(4, 3, 6, 10)]


def test_scales_are_averaged_with_equal_weight_at_full_resolution():
    model, x = Probe(), ramp(n=1, h=8, w=12)
    out = predict(model, x, scales=(0.5, 1.0, 1.5), flip=True)
    assert out.shape == (1, 3, 8, 12)
    # channel 2 is the input height of each view: 4, 8 and 12, each seen with and without flip
    assert torch.allclose(out[:, 2], torch.full_like(out[:, 2], (4 + 8 + 12) / 3))
    assert sorted(s[2:] for s in model.shapes) == [(4, 6), (8, 12), (12, 18)]
    assert all(s[0] == 2 for s in model.shapes)


def test_views_are_resized_bilinearly_to_the_input_size():
    model, x = Probe(), ramp(n=1, h=8, w=12)
    out = predict(model, x, scales=(0.5,))
    small = F.interpolate(x, size=(4, 6), mode="bilinear", align_corners=False)
    expected = F.interpolate(model(small)["out"], size=(8, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected)


def test_slide_averages_overlapping_tiles():
    model, x = Probe(), ramp(n=2, h=6, w=10)
    out = predict(model, x, mode="slide", crop_size=(6, 6), stride=(4, 4))
    # tiles start at columns 0 and 4; columns 4 and 5 are in both (local columns 4,5 and 0,1)
    expected = torch.tensor([0, 1, 2, 3, 2, 3, 2, 3, 4, 5], dtype=torch.float32)
    assert torch.equal(out[:, 0], expected.expand(2, 6, 10))
    assert torch.equal(out[:, 1], x[:, 0])      # every tile put back where it came from
    assert model.shapes == [(4, 3, 6, 6)]       # 2 images x 2 tiles in one forward


def test_slide_with_flip_scales_and_max_batch():
    model, x = Probe(), ramp(n=1, h=6, w=10)
    out = predict(model, x, scales=(1.0,), flip=True, mode="slide", crop_size=6, stride=4, max_batch=3)
    # flipped image: tile columns map to 9 - j; un-flipped mean of the two column maps:
    plain = torch.tensor([0, 1, 2, 3, 2, 3, 2, 3, 4, 5], dtype=torch.float32)
    assert torch.allclose(out[0, 0], ((plain + plain.flip(0)) / 2).expand(6, 10))
    assert torch.equal(out[:, 1], x[:, 0])
    assert [s[0] for s in model.shapes] == [3, 1]   # 2 views x 2 tiles in chunks of 3


def test_slide_pads_small_images_and_cuts_the_padding():
    model, x = Probe(), ramp(n=1, h=5, w=7)
    out = predict(model, x, mode="slide", crop_size=(8, 8))
    assert out.shape == (1, 3, 5, 7)
    assert model.shapes == [(1, 3, 8, 8)]
    assert torch.equal(out[:, 1], x[:, 0])
    assert torch.equal(out[0, 2], torch.full((5, 7), 8.0))


def test_slide_with_a_crop_equal_to_the_image_is_whole():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3, padding=1))
    x = torch.randn(2, 3, 12, 16)
    assert torch.allclose(predict(net, x, (1.0,), True, mode="slide", crop_size=(12, 16)),
                          predict(net, x, (1.0,), True), atol=1e-6)
    # at scale 0.5 the 6x8 view is padded to the crop, so the border logits change
    assert not torch.allclose(predict(net, x, (0.5,), mode="slide", crop_size=(12, 16)),
                              predict(net, x, (0.5,)), atol=1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop_size"):
        predict(Probe(), ramp(), mode="slide")
    with pytest.raises(ValueError, match="uncovered"):
        predict(Probe(), ramp(), mode="slide", crop_size=4, stride=(2, 5))
    with pytest.raises(ValueError, match="mode"):
        predict(Probe(), ramp(), mode="tiles")


class Oracle(torch.nn.Module):
    """Predicts the class id written into the image's channel 0 (one-hot logits); 19 classes."""

    def forward(self, x):
        return {"out": F.one_hot(x[:, 0].round().long(), 19).permute(0, 3, 1, 2).float()}


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int64], ids=str)   # the loaders give uint8
def test_evaluate_on_constructed_predictions(label_dtype):
    # Ground truth / prediction pairs; class 5 only in the ground truth, class 6 only predicted;
    # the 15 other classes appear in neither and must not count in the mean.
    target = torch.tensor([[[0, 0, 0, 1], [1, 2, 5, 255]], [[2, 2, 1, 0], [5, 5, 255, 255]]], dtype=label_dtype)
    pred = torch.tensor([[[0, 0, 1, 1], [1, 2, 2, 6]], [[2, 0, 1, 0], [5, 6, 3, 0]]])
    images = torch.zeros(2, 3, 2, 4)
    images[:, 0] = pred.float()
    loader = [{"image": images[i:i + 1], "label": target[i:i + 1], "name": [f"im{i}"]} for i in range(2)]
    seen = []
    res = evaluate(Oracle(), loader, 19, torch.device("cpu"), (1.0,), True,
                   on_prediction=lambda names, p: seen.append((names, p.clone())))
    # per class (tp, ground truth, predicted), ignored pixels dropped: 0 (3, 4, 4), 1 (3, 3, 4),
    # 2 (2, 3, 3), 5 (1, 3, 1), 6 (0, 0, 1); 3 is predicted only on ignored pixels: absent
    iou = {0: 3 / 5, 1: 3 / 4, 2: 2 / 4, 5: 1 / 3, 6: 0.0}
    for c in range(19):
        if c in iou:
            assert res["iou"][c] == pytest.approx(iou[c]), c
        else:
            assert math.isnan(res["iou"][c]), c
    assert res["miou"] == pytest.approx(sum(iou.values()) / 5)
    assert res["pixel_acc"] == pytest.approx(9 / 13)
    assert res["images"] == 2 and res["pixels"] == 13
    assert torch.tensor(res["confusion"]).sum() == 13
    assert [s[0] for s in seen] == [["im0"], ["im1"]] and torch.equal(seen[1][1], pred[1:])


def test_evaluate_keeps_the_positional_call_of_the_trainer_and_restores_train_mode():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 19, 1), torch.nn.BatchNorm2d(19))
    net.train()
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 19, (3, 8, 8))
    loader = [{"image": x[i:i + 1], "label": y[i:i + 1]} for i in range(3)]
    import contextlib
    res = evaluate(net, loader, 19, torch.device("cpu"), [1.0], False, contextlib.nullcontext, True)
    assert net.training
    net.eval()
    expected = (net(x).argmax(1) == y).float().mean().item()
    assert res["pixel_acc"] == pytest.approx(expected)
    batched = evaluate(net, [{"image": x, "label": y}], 19, torch.device("cpu"))
    assert batched["confusion"] == res["confusion"]
