"""``--help`` of train.py and of the inference command lines: help on every option, one honest default
each (no "(default: True)" on a switch, no "(default: None)"), the defaults a bare run uses."""
import importlib

import pytest

from ifbf_fast.engine.config import parse_args


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
