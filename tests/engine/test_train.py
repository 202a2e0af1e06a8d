"""train.py end to end on a tiny synthetic city: the CLI, bad input, a run whose loss falls, exact
resume, refusal of another model's checkpoint, the non-finite-loss guard."""
import os
import subprocess
import sys

import pytest
import torch

from ifbf_fast.engine import checkpoint as ck
from ifbf_fast.engine.config import parse_args
from ifbf_fast.engine.trainer import TrainingError, main, train

from .._cli import args_list

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def city(tiny_city):
    """The session's synthetic city (tests/conftest.py)."""
    return tiny_city


def tiny(city, out, **overrides):
    values = dict(data=city, out=str(out), backbone="resnet18", crop_size=64, scales=[0.75, 1.0, 1.25],
                  batch_size=4, workers=0, iters=6, warmup_iters=1, lr=0.01, eval_every=0, ckpt_every=3,
                  log_every=1, progress=False, gpus=0, seed=1, impl="reference", loader="torch")
    values.update(overrides)
    words = args_list({k: v for k, v in values.items() if k != "progress"})
    if not values["progress"]:
        words.append("--no-progress")
    return parse_args(words)


def test_help_lists_the_main_options():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--gpus", "--compile", "--impl", "--data", "--amp", "--resume", "--config"):
        assert flag in out


@pytest.mark.parametrize("words, message", [
    (["--data", "/no/such/dir"], "--data /no/such/dir: no such directory"),
    (["--pretrained", "/no/such.pth"], "--pretrained /no/such.pth: no such file"),
    (["--impl", "fastest"], "invalid choice: 'fastest'"),
    (["--iters", "0"], "--iters must be > 0"),
    (["--keep-ratio", "1.5"], "--keep-ratio must be in (0, 1]"),
])
def test_bad_options_give_one_line_errors(words, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(words)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: resnet18\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg)])
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err
    cfg.write_text("backbone: vgg16\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg)])
    assert "backbone: 'vgg16' is not one of" in capsys.readouterr().err


def test_not_a_cityscapes_folder_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--gpus", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("train.py: error:") and "leftImg8bit" in err
    assert not (tmp_path / "o").exists()


def test_defaults_are_the_paper_recipe_with_data(tmp_path):
    args = parse_args(["--data", str(tmp_path)])
    assert (args.backbone, args.crop_size, args.batch_size, args.iters, args.lr) == ("resnet101", 876, 4, 81000, 0.01)
    assert (args.lr_mult, args.aux_weight, args.keep_ratio, args.weight_decay) == (10.0, 0.4, 0.75, 5e-4)
    assert args.config_used is None
    assert parse_args([]).config_used.endswith("cpu_default.yaml")


@pytest.mark.slow
def test_short_run_loss_falls_and_writes_checkpoints(city, tmp_path):
    args = tiny(city, tmp_path, iters=24, lr=0.02, ckpt_every=12, keep_last=1, eval_every=24)
    out = train(args)
    losses = out["losses"]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert out["eval"]["pixels"] == 2 * 64 * 128 - 0 or out["eval"]["pixels"] > 0
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path))] == ["iter_00000024.pt"]
    assert os.path.exists(tmp_path / "best.pt") and os.path.exists(tmp_path / "args.yaml")
    state = ck.load(str(tmp_path / "iter_00000024.pt"))
    assert state["iteration"] == 24 and state["args"]["backbone"] == "resnet18"


@pytest.mark.slow
def test_resume_is_exact(city, tmp_path):
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        full = train(tiny(city, tmp_path / "full", iters=6, ckpt_every=3))
        half = train(tiny(city, tmp_path / "half", iters=6, ckpt_every=3))
        # Pretend the second run died after step 3: drop its later checkpoint and resume.
        os.remove(tmp_path / "half" / "iter_00000006.pt")
        resumed = train(tiny(city, tmp_path / "half", iters=6, ckpt_every=3, resume="latest"))
    finally:
        torch.use_deterministic_algorithms(False)
    assert half["losses"] == full["losses"], (half["losses"], full["losses"])
    assert resumed["losses"] == half["losses"][3:], (resumed["losses"], half["losses"])
    a = ck.load(str(tmp_path / "full" / "iter_00000006.pt"))["model"]
    b = ck.load(str(tmp_path / "half" / "iter_00000006.pt"))["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(city, tmp_path, capsys):
    train(tiny(city, tmp_path, iters=2, ckpt_every=2))
    words = args_list(dict(data=city, out=str(tmp_path), backbone="resnet18", crop_size=64, batch_size=4,
                           workers=0, iters=4, warmup_iters=1, gpus=0, spatial_channels=64, resume="latest"))
    assert main(words) == 2
    assert "spatial_channels: checkpoint 128 vs this run 64" in capsys.readouterr().err


def test_nonfinite_loss_skips_the_step():
    from ifbf_fast.engine.step import TrainStep, fused_sgd
    model = torch.nn.Conv2d(3, 2, 1)
    before = model.weight.detach().clone()
    opt = fused_sgd(list(model.parameters()), lr=0.1, momentum=0.9, weight_decay=0.0)
    batch = {"image": torch.randn(1, 3, 4, 4), "label": torch.zeros(1, 4, 4, dtype=torch.long)}

    def nan_loss(outputs, labels):
        return {"loss": outputs["out"].sum() * float("nan")}

    step = TrainStep(lambda x: {"out": model(x)}, model, nan_loss, opt, None, torch.device("cpu"))
    got = step(batch)
    assert float(got["skipped"]) == 1.0 and torch.equal(model.weight, before)
    assert step.read_counters()["skipped"] == 1


def test_too_many_consecutive_nonfinite_steps_stop_the_run():
    from ifbf_fast.engine.logger import Logger
    from ifbf_fast.engine.trainer import check_counters
    args = parse_args(["--max-nonfinite", "3", "--log-every", "5", "--out", "/nonexistent", "--no-progress"])
    log = Logger(args, enabled=False)
    ok = {"skipped": 2, "consecutive": 2, "max_consecutive": 2, "bad_labels": 0, "steps": 5}
    check_counters(ok, 5, args, log)
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss"):
        check_counters(dict(ok, max_consecutive=3), 10, args, log)
    with pytest.raises(TrainingError, match=r"label pixel\(s\) hold an id outside \[0, 19\)"):
        check_counters(dict(ok, bad_labels=7), 10, args, log)


@pytest.mark.slow
def test_two_steps_with_every_fast_path(city, tmp_path, monkeypatch):
    """impl=fast: the Triton FBF and OHEM kernels (interpreter on CPU) and the C++ ABN all run in
    training and in its end-of-training evaluation; asking for "fast" raises instead of falling back, so
    this fails if any path is missing. The evaluation runs at scale 0.5 (32x64): under the interpreter a
    full-size forward of the FBF kernels costs more than the two training steps. The decoder is built
    64 wide (train.py's model with ``decoder_channels=64``, as the engine tests do): the interpreted
    FBF kernels' (C, C) epilogue at the paper's 256 was most of this test's time."""
    import ifbf_fast.models as models

    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda spec: build(dict(spec, decoder_channels=64)))
    out = train(tiny(city, tmp_path, iters=2, crop_size=32, batch_size=2, ckpt_every=2, impl="fast",
                     eval_scales=[0.5], spatial_channels=16))
    assert len(out["losses"]) == 2 and all(v == v for v in out["losses"])


@pytest.mark.slow
def test_trains_through_the_dali_loader(city, tmp_path):
    pytest.importorskip("nvidia.dali")
    out = train(tiny(city, tmp_path, iters=3, ckpt_every=3, loader="dali", workers=1, eval_every=3))
    assert len(out["losses"]) == 3 and out["eval"]["pixels"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_cpu_processes_over_gloo(city, tmp_path):
    """``--gpus 0 --procs 2``: the spawn path with DDP, sharded loaders and a shared evaluation."""
    words = args_list(dict(data=city, out=str(tmp_path), backbone="resnet18", crop_size=64, batch_size=2,
                           workers=0, iters=2, warmup_iters=1, eval_every=2, gpus=0, procs=2,
                           impl="reference", loader="torch")) + ["--no-progress"]
    assert main(words) == 0
    state = ck.load(str(tmp_path / "iter_00000002.pt"))
    assert state["iteration"] == 2 and state["args"]["procs"] == 2 and "rng" in state


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_under_torchrun(city, tmp_path):
    """torchrun (the launcher of clusters): each rank is the process train.py runs in; both finish
    with exit code 0 (a finished rank leaves through exit_worker, as spawned workers do)."""
    words = args_list(dict(data=city, out=str(tmp_path), backbone="resnet18", crop_size=64, batch_size=2,
                           workers=0, iters=2, warmup_iters=1, eval_every=2, gpus=0,
                           impl="reference", loader="torch")) + ["--no-progress"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(root, "train.py"), *words], cwd=root, env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = ck.load(str(tmp_path / "iter_00000002.pt"))
    assert state["iteration"] == 2 and "rng" in state


@pytest.mark.slow
def test_a_run_leaves_a_text_log_metrics_and_tensorboard(city, tmp_path, capsys):
    """Without a TTY: periodic plain lines with step, loss, lr, img/s and ETA; the same in train.log;
    metrics.jsonl with one object per log interval and per evaluation; TensorBoard event files with
    per-class IoU and preview images."""
    import json
    train(tiny(city, tmp_path, iters=4, log_every=2, eval_every=4, ckpt_every=4))
    printed = capsys.readouterr().out
    step_lines = [ln for ln in printed.splitlines() if ln.startswith("step ")]
    assert len(step_lines) == 2 and all(k in step_lines[-1] for k in ("loss", "lr", "img/s", "eta"))
    log = (tmp_path / "train.log").read_text()
    assert "step 4/4:" in log and "evaluation at step 4" in log and "mIoU" in log
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "eval" not in r]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in steps] == [2, 4] and {"loss", "lr", "images_per_s", "skipped"} <= set(steps[0])
    assert len(evals) == 1 and evals[0]["step"] == 4 and "road" in evals[0]["eval"]["iou"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()
    assert "train/loss" in tags["scalars"] and "val/mIoU" in tags["scalars"] and "val_iou/road" in tags["scalars"]
    assert "val_prediction/0" in tags["images"]
