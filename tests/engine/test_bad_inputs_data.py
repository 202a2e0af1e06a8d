"""The table of bad inputs, data rows (see tests/engine/test_bad_inputs.py for the table's rules):
``check`` (the preflight ``python -m ifbf_fast.data.check`` on a corrupted copy of the tiny city) and
``loader`` (the DALI and reference loaders on that copy, without the preflight: the error must still
name the file)."""
import pytest

from ._bad_inputs import corrupt


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

