"""The table of bad inputs, data rows (see tests/engine/test_bad_inputs.py for the table's rules):
``check`` (the preflight ``python -m ifbf_fast.data.check`` on a corrupted copy of the tiny city) and
``loader`` (the DALI and reference loaders on that copy, without the preflight: the error must still
name the file)."""
import os

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



# --- your own data: the folder layout (ifbf_fast.data.folder) -------------------------------------
# A row plants one problem in a copy of the synthetic city written in the folder layout and drives
# ``check`` (python -m ifbf_fast.data.check: exit 1, one PROBLEM line naming the file), ``train``
# (train.py's main: one ``train.py: error:`` line, before any step) or ``evaluate``.

FOLDER = [  # (id, tool, how, expected text, exit code)
    ("classes-yaml-missing-key", "train", ("yaml", "ignore_id: 255\n"), "classes.yaml: missing key 'classes'", 1),
    ("classes-yaml-not-yaml", "check", ("yaml", "classes: [\n"), "classes.yaml: not valid YAML", 1),
    ("classes-yaml-duplicate-id", "check",
     ("yaml", "classes:\n  - {name: a, id: 7, color: [1, 2, 3]}\n  - {name: b, id: 7, color: [1, 2, 3]}\n"),
     "class 1 (b): duplicate id 7 (also class 0, a)", 1),
    ("classes-yaml-duplicate-name", "train",
     ("yaml", "classes:\n  - {name: a, id: 7, color: [1, 2, 3]}\n  - {name: a, id: 8, color: [1, 2, 3]}\n"),
     "class 1 (a): duplicate name 'a' (also class 0)", 1),
    ("classes-yaml-colour-2-bytes", "train", ("yaml", "classes:\n  - {name: a, id: 7, color: [1, 2]}\n"),
     "color must be three bytes [R, G, B] in 0..255, got [1, 2]", 1),
    ("classes-yaml-id-300", "check", ("yaml", "classes:\n  - {name: a, id: 300, color: [1, 2, 3]}\n"),
     "class 0 (a): id 300 is outside 0..255", 1),
    ("classes-yaml-ignore-is-a-class", "train",
     ("yaml", "ignore_id: 7\nclasses:\n  - {name: a, id: 7, color: [1, 2, 3]}\n"), "id 7 is the ignore_id", 1),
    ("num-classes-contradicts-table", "train", ("words", ["--num-classes", "19"]),
     "--num-classes 19: {root}/classes.yaml lists 9 classes; omit --num-classes", 2),
    ("folder-missing-mask", "check", ("remove", "masks/{first}.png"), "'{first}' has no mask: expected", 1),
    ("folder-missing-image", "check", ("remove", "images/{first}.png"), "'{first}' has no image: expected", 1),
    ("folder-size-mismatch", "check", ("small_mask", "masks/{first}.png"), "size mismatch: image", 1),
    ("folder-unknown-mask-id", "check", ("mask_id", "masks/{first}.png"),
     "has values that are not ids of classes.yaml (nor its ignore_id 255): 99 (4 px)", 1),
    ("folder-name-listed-twice", "check", ("list", "{first}\n{first}\n"), "'{first}' is listed twice (also line 1)",
     1),
    ("folder-name-with-extension", "check", ("list", "{first}.png\n"), "(list NAMEs without their extension)", 1),
    ("folder-no-val-list", "check", ("remove", "splits/val.txt"), "has no split 'val': expected the list", 1),
    ("folder-evaluate-no-split-list", "evaluate", ("words", ["--split", "test"]), "has no split 'test'", 1),
]


@pytest.fixture(scope="module")
def folder_city(tmp_path_factory):
    from ifbf_fast.data import generate_city
    return generate_city(str(tmp_path_factory.mktemp("folder_city")), n_train=2, n_val=1, height=32, width=64,
                         seed=3, layout="folder")


@pytest.mark.parametrize("case", FOLDER, ids=[c[0] for c in FOLDER])
def test_bad_folder_input(case, folder_city, tmp_path, capsys, tally):
    import shutil

    import cv2
    import numpy as np

    from ifbf_fast.data.check import main as check_main
    from ifbf_fast.engine.trainer import main as train_main

    from ._bad_inputs import one_error_line, words_for

    name, tool, (how, what), expected, code = case
    root = str(tmp_path / "data")
    shutil.copytree(folder_city, root)
    first = open(os.path.join(root, "splits", "train.txt")).read().split()[0]
    named = None
    if how == "yaml":
        named = os.path.join(root, "classes.yaml")
        open(named, "w").write(what)
    elif how in ("remove", "small_mask", "mask_id"):
        named = os.path.join(root, what.format(first=first))
        if how == "remove":
            os.remove(named)
        else:
            mask = cv2.imread(named, cv2.IMREAD_UNCHANGED)
            if how == "small_mask":
                mask = mask[:-1]
            else:
                mask[0, :4] = 99
            cv2.imwrite(named, np.ascontiguousarray(mask))
    elif how == "list":
        named = os.path.join(root, "splits", "train.txt")
        open(named, "w").write(what.format(first=first))
    expected = expected.format(root=root, first=first)
    if tool == "check":
        assert check_main([root, "--workers", "1"]) == code
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("PROBLEM:")]
        assert len(lines) == 1 and expected in lines[0] and (named is None or named in lines[0]), lines
    else:
        extra = what if how == "words" else []
        if tool == "train":
            try:
                rc = train_main(words_for(root, tmp_path / "out", extra=extra))
            except SystemExit as exc:       # parse time: argparse's exit
                rc = exc.code
        else:
            from ifbf_fast.evaluate import main as evaluate_main
            ckpt = tmp_path / "never_read.pt"      # the split is checked before the checkpoint is loaded
            ckpt.write_bytes(b"x")
            rc = evaluate_main(["--checkpoint", str(ckpt), "--data", root, "--gpus", "0", "--workers", "0",
                                "--no-progress"] + extra)
        assert rc == code
        line = one_error_line(capsys.readouterr().err, expected)
        assert named is None or named in line, line
        assert not os.path.exists(tmp_path / "out" / "iter_00000001.pt")
    tally(True)
