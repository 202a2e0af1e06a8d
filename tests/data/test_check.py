"""Preflight: every planted problem is reported in one pass, naming the files; the CLI exit code."""

import os
import shutil
import subprocess
import sys

import numpy as np

from ifbf_fast.data import check_dataset
from ifbf_fast.data.check import main

from .conftest import write_pair


def test_clean_synthetic_city_passes(city, capsys):
    report = check_dataset(city, ("train", "val"))
    assert report.ok, report.format()
    assert report.pairs == {"train": 6, "val": 3}
    assert main([city, "--workers", "1"]) == 0
    assert "OK" in capsys.readouterr().out


def test_all_planted_problems_reported(tmp_path, capsys):
    root = str(tmp_path)
    write_pair(root, "train", "c", "c_000000_000019")  # clean
    no_label_img, no_label_lab = write_pair(root, "train", "c", "c_000001_000019", label=False)
    orphan_img, orphan_lab = write_pair(root, "train", "c", "c_000002_000019", image=False)
    trunc_img, _ = write_pair(root, "train", "c", "c_000003_000019")
    data = open(trunc_img, "rb").read()
    open(trunc_img, "wb").write(data[: len(data) - 20])
    mis_img, mis_lab = write_pair(root, "val", "d", "d_000000_000019",
                                  label=np.full((10, 10), 7, np.uint8))
    bad = np.full((16, 24), 7, np.uint8)
    bad[0, :3] = 34
    bad[1, 0] = 250
    _, bad_lab = write_pair(root, "val", "d", "d_000001_000019", label=bad)

    report = check_dataset(root, ("train", "val", "test"), workers=2)
    text = report.format()
    assert not report.ok
    problems = report.problems

    def one(*needles):
        hits = [p for p in problems if all(n in p for n in needles)]
        assert len(hits) == 1, (needles, text)
        return hits[0]

    one(no_label_img, no_label_lab, "no label")
    one(orphan_lab, orphan_img, "no image")
    one(trunc_img, "truncated")
    one(mis_img, mis_lab, "size mismatch")
    msg = one(bad_lab, "not Cityscapes labelIds")
    assert "34 (3 px)" in msg and "250 (1 px)" in msg
    one(os.path.join(root, "leftImg8bit", "test"))  # missing split folder
    assert len(problems) == 7, text  # the two missing test folders count once each
    assert report.pairs == {"train": 2, "val": 2, "test": 0}

    assert main([root, "--splits", "train", "val"]) == 1
    out = capsys.readouterr().out
    assert out.count("PROBLEM:") == 5 and trunc_img in out


def test_missing_root_reported(tmp_path):
    report = check_dataset(str(tmp_path / "absent"))
    assert not report.ok and "does not exist" in report.problems[0]


def test_cli_module_exit_code(city, tmp_path):
    root = str(tmp_path / "c")
    shutil.copytree(city, root)
    label = os.path.join(root, "gtFine", "val", "gammaheim", "gammaheim_000000_000019_gtFine_labelIds.png")
    os.remove(label)
    run = subprocess.run([sys.executable, "-m", "ifbf_fast.data.check", root, "--workers", "1"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    assert label in run.stdout and "RuntimeWarning" not in run.stderr
