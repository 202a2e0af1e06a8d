"""The table of bad inputs (issue 17): each row is an input a user can get wrong and the one line that
must come back, with its exit code (2: usage error, as argparse; 1: bad data or an unreadable
checkpoint). A row passes when the message holds the expected text, is one line and comes without a
traceback. The session prints "bad inputs: N tried, M handled" (the ``tally`` fixture of
tests/engine/conftest.py; every row takes it).

Kinds of row, and where they are: here ``args`` (command line, ``parse_args``), ``yaml`` (a ``--config``
file), ``run`` (``main`` on the tiny synthetic city, stopping before or at the first step), ``resume``
(``main`` against the checkpoints of a 2-step run); in test_bad_inputs_data.py ``check`` (the preflight
``python -m ifbf_fast.data.check`` on a corrupted copy of the city) and ``loader`` (the DALI and
reference loaders on that copy, without the preflight: the error must still name the file); in
test_bad_inputs_inference.py ``evaluate`` / ``predict`` / ``export`` (the inference command lines,
``python -m ifbf_fast.{evaluate,predict,export}``: options and paths, and errors of the checkpoint or
image found before any forward). The helpers they share are in _bad_inputs.py; the ``--help`` checks
in test_help.py.
"""
import os
import shutil
import subprocess

import pytest
import torch

from ifbf_fast.engine import checkpoint as ck
from ifbf_fast.engine import preflight
from ifbf_fast.engine.config import parse_args
from ifbf_fast.engine.trainer import main

from ._bad_inputs import corrupt, fake_checkpoint, first_file, one_error_line, words_for


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


@pytest.fixture(scope="module")
def trained(tiny_city, tmp_path_factory):
    """--out of a 2-step run of BASE (checkpoints at steps 1 and 2, without weights)."""
    out = tmp_path_factory.mktemp("trained")
    args = parse_args(words_for(tiny_city, out))
    for it in (1, 2):
        ck.save_atomic(fake_checkpoint(args, it), str(out / ck.CKPT_PATTERN.format(it)))
    return str(out)



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
        expected_file = first_file(data, "leftImg8bit")
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
    that loads and says which it skipped (what ``build_run`` calls, on real files)."""
    out = tmp_path / "o"
    out.mkdir()
    os.link(os.path.join(trained, "iter_00000001.pt"), out / "iter_00000001.pt")
    data = open(os.path.join(trained, "iter_00000002.pt"), "rb").read()
    (out / "iter_00000002.pt").write_bytes(data[: len(data) // 2])
    args = parse_args(words_for(tiny_city, out, resume="latest", iters=4))
    logs = []
    path, state = preflight.resume_state(args, "cpu", logs.append)
    assert path == str(out / "iter_00000001.pt") and state.iteration == 1
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


def test_scalar_where_a_list_belongs_is_a_one_element_list(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("scales: 0.5\neval_scales: 1\nlr: 1\n")
    args = parse_args(["--config", str(cfg)])
    assert args.scales == [0.5] and args.eval_scales == [1.0] and args.lr == 1.0 and isinstance(args.lr, float)

