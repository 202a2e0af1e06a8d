"""Our mIoU, per-class IoU and pixel accuracy against the official ``cityscapesscripts`` evaluation
(``evalPixelLevelSemanticLabeling``) on the same predictions of the synthetic city."""
import copy
import glob
import math
import os

import numpy as np
import pytest
import torch

from ifbf_fast.data import CLASS_NAMES, build_loader, generate_city
from ifbf_fast.engine.evaluate import evaluate
from ifbf_fast.predict import write_submission


def official_evaluation(root: str, prediction_dir: str, split: str = "val") -> dict:
    """Run cityscapesscripts' pixel-level evaluation programmatically on labelIds PNGs."""
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs

    args = copy.copy(cs.args)   # the module's global CArgs: leave it untouched
    args.cityscapesPath = root
    args.groundTruthSearch = os.path.join(root, "gtFine", split, "*", "*_gtFine_labelIds.png")
    args.predictionPath, args.predictionWalk = prediction_dir, None
    args.evalInstLevelScore = False    # needs *_instanceIds.png, which the synthetic city has not
    args.evalPixelAccuracy = False
    args.JSONOutput, args.quiet, args.colorized = False, True, False
    gts = sorted(glob.glob(args.groundTruthSearch))
    assert gts, args.groundTruthSearch
    preds = [cs.getPrediction(args, gt) for gt in gts]
    return cs.evaluateImgLists(preds, gts, args)


def official_pixel_accuracy(result: dict) -> float:
    """Correct / all pixels whose ground truth is one of the 19 evaluated classes."""
    from cityscapesscripts.helpers.labels import labels

    ids = [lab.id for lab in labels if not lab.ignoreInEval and lab.id >= 0]
    mat = np.asarray(result["confMatrix"], dtype=np.int64)
    return float(sum(mat[i, i] for i in ids) / mat[ids, :].sum())


def assert_same_as_official(ours: dict, official: dict) -> None:
    present = 0
    for name, iou in zip(CLASS_NAMES, ours["iou"]):
        ref = official["classScores"][name]
        if math.isnan(ref):
            assert math.isnan(iou), name
        else:
            present += 1
            assert iou == pytest.approx(ref, abs=1e-12), name
    assert ours["miou"] == pytest.approx(official["averageScoreClasses"], abs=1e-12)
    assert ours["pixel_acc"] == pytest.approx(official_pixel_accuracy(official), abs=1e-12)
    return present


class PixelNet(torch.nn.Module):
    """A per-pixel linear classifier on (colour, row): many classes right, many wrong, 16-18 never."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight          # (19, 5)

    @staticmethod
    def features(x):
        n, _, h, w = x.shape
        row = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(n, 1, h, w)
        return torch.cat([x, row, torch.ones_like(row)], 1)

    def forward(self, x):
        out = torch.einsum("kc,nchw->nkhw", self.weight, self.features(x))
        out[:, 16:] = -1e4
        return {"out": out}

    @classmethod
    def fit(cls, loader):
        """Least squares to one-hot targets over the valid pixels of ``loader``."""
        feats, targets = [], []
        for batch in loader:
            f = cls.features(batch["image"]).permute(0, 2, 3, 1).reshape(-1, 5)
            t = batch["label"].reshape(-1).long()       # one_hot takes int64 (the loaders give uint8)
            feats.append(f[t != 255])
            targets.append(torch.nn.functional.one_hot(t[t != 255], 19).float())
        return cls(torch.linalg.lstsq(torch.cat(feats), torch.cat(targets)).solution.T)


def test_same_numbers_as_cityscapesscripts(tmp_path):
    root = generate_city(str(tmp_path / "city"), n_train=0, n_val=4, height=64, width=128, seed=7)
    pred_dir = str(tmp_path / "results")
    loader = build_loader(root, "val", 2, train=False, workers=0)
    ours = evaluate(PixelNet.fit(loader), loader, 19, torch.device("cpu"), (0.75, 1.0), True,
                    on_prediction=lambda names, pred: [write_submission(pred_dir, n, p)
                                                       for n, p in zip(names, pred.numpy())])
    assert len(glob.glob(os.path.join(pred_dir, "gammaheim", "gammaheim_*_leftImg8bit.png"))) == 4
    official = official_evaluation(root, pred_dir)
    present = assert_same_as_official(ours, official)
    # a meaningful comparison: IoUs well inside (0, 1) and 0; classes 16-18 absent from both
    assert present >= 8 and sum(0.05 < v < 0.95 for v in ours["iou"][:16]) >= 3
    assert all(math.isnan(v) for v in ours["iou"][16:])
    assert np.asarray(official["confMatrix"]).sum() == 4 * 64 * 128
