"""``ofaconv verify`` and ``ofaconv push --dry-run`` treat every family alike: they accept a folder
exactly as its conversion wrote it (OFA, BertCLIP and Chinese-CLIP packages, and a package's tower
subfolders) and refuse it, naming the file, once a weight, the config or remote code was edited, a
file was dropped in, or a link was planted."""

import json
import os
import shutil

import pytest

from ofaconv.cli import main

FAMILIES = ["ofa", "bertclip", "cnclip"]


@pytest.fixture
def converted(request, tmp_path):
    """A private copy of a folder made by the real convert command (session fixtures in conftest)."""
    def copy(family: str):
        source = request.getfixturevalue(f"{family}_verified_folder")
        return shutil.copytree(source, tmp_path / "out", symlinks=True)
    return copy


def run(capsys, *argv):
    capsys.readouterr()  # what the session fixtures printed while converting
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def verify(capsys, folder):
    code, out, err = run(capsys, "verify", folder, "--json")
    return code, (json.loads(out) if code in (0, 3) else None), err


def dry_run(capsys, folder):
    return run(capsys, "push", folder, "alice/model", "--dry-run")


@pytest.mark.parametrize("family", FAMILIES)
def test_verified_folder_is_accepted(family, converted, capsys):
    folder = converted(family)
    code, checks, err = verify(capsys, folder)
    assert code == 0, (checks, err)
    assert checks[0]["name"] == "manifest" and checks[0]["passed"] and "match conversion_report.json" in checks[0]["detail"]
    assert len(checks) > 2 and all(c["passed"] for c in checks)
    code, out, err = dry_run(capsys, folder)
    assert code == 0, err
    assert "report: conversion_report.json passed; every file matches its manifest" in out
    assert out.rstrip().endswith("nothing was uploaded (dry run)")
    tag = "image-text-to-text" if family == "ofa" else "zero-shot-image-classification"
    assert f"  pipeline_tag: {tag}" in out.splitlines()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recorded, why", [([], "no checks recorded"),
                                           ([{"name": "logits", "passed": False}], "check 'logits' failed")])
def test_folder_whose_conversion_was_not_proven_is_refused(family, recorded, why, converted, capsys):
    """Without --against a folder is only as proven as its report's checks: none run (a conversion
    without --verify) or one failed makes ``verify`` fail, for every family alike."""
    folder = converted(family)
    report = json.loads((folder / "conversion_report.json").read_text())
    report.update(checks=recorded, passed=False)
    (folder / "conversion_report.json").write_text(json.dumps(report))
    code, checks, err = verify(capsys, folder)
    assert code == 3, (checks, err)
    assert checks[-1]["name"] == "report" and not checks[-1]["passed"] and why in checks[-1]["detail"]
    assert all(c["passed"] for c in checks[:-1])


@pytest.mark.parametrize("family", ["bertclip", "cnclip"])
@pytest.mark.parametrize("tower, tag", [("vision_tower", "image-feature-extraction"),
                                        ("text_tower", "feature-extraction")])
def test_tower_subfolder_is_accepted_alone(family, tower, tag, converted, capsys):
    folder = converted(family) / tower
    code, checks, err = verify(capsys, folder)
    assert code == 0, (checks, err)
    assert checks[0]["detail"].endswith(f"match ../conversion_report.json under {tower}/, no links")
    code, out, err = dry_run(capsys, folder)
    assert code == 0, err
    lines = out.splitlines()
    assert f"  pipeline_tag: {tag}" in lines
    assert any(line.split()[0] == "README.md" and "card built for alice/model" in line for line in lines[1:-1])
    assert not any(line.split()[0].startswith(("vision_tower/", "text_tower/")) for line in lines[1:-1] if line.strip())
    # the tower is refused once edited, like any folder
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    code, checks, _ = verify(capsys, folder)
    assert code == 3 and checks[0]["detail"].startswith("config.json: size ")


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _weights(folder):
    _flip_last_byte(folder / "model.safetensors")
    return "model.safetensors: sha256 "


def _tower_weights(folder):
    _flip_last_byte(folder / "vision_tower" / "model.safetensors")
    return "vision_tower/model.safetensors: sha256 "


def _config(folder):
    config = json.loads((folder / "config.json").read_text())
    config["vision_config" if "vision_config" in config else "encoder_layers"] = "no longer loads"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return "config.json: size "


def _remote_code(folder):
    with open(folder / "modeling_ofa.py", "a") as f:
        f.write("\nimport os  # runs on every user's machine with trust_remote_code\n")
    return "modeling_ofa.py: size "


def _extra_file(folder):
    (folder / "extra.py").write_text("print('not written by the conversion')\n")
    return "extra.py: present but not written by the conversion"


def _extra_in_subfolder(folder):
    (folder / "vision_tower" / "notes.txt").write_text("dropped in\n")
    return "vision_tower/notes.txt: present but not written by the conversion"


def _link_to_file(folder):
    token = folder.parent / "token"
    token.write_text("hf_secret_token_outside_the_folder")
    os.symlink(token, folder / "token")
    return "token: a symbolic link"


def _link_to_directory(folder):
    home = folder.parent / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / "notes.txt").write_text("private")
    os.symlink(home, folder / "home")
    return "home: a symbolic link"


def _file_replaced_by_link(folder):
    # a listed file swapped for a link to a copy of itself: same bytes, still refused
    copy = folder.parent / "config-copy.json"
    shutil.copy(folder / "config.json", copy)
    (folder / "config.json").unlink()
    os.symlink(copy, folder / "config.json")
    return "config.json: a symbolic link"


EDITS = {
    "weights": (_weights, FAMILIES),
    "tower_weights": (_tower_weights, ["bertclip", "cnclip"]),
    "config": (_config, FAMILIES),
    "remote_code": (_remote_code, ["ofa"]),
    "extra_file": (_extra_file, FAMILIES),
    "extra_in_subfolder": (_extra_in_subfolder, ["bertclip", "cnclip"]),
    "link_to_file": (_link_to_file, FAMILIES),
    "link_to_directory": (_link_to_directory, FAMILIES),
    "file_replaced_by_link": (_file_replaced_by_link, FAMILIES),
}
CASES = [(edit, family) for edit, (_, families) in EDITS.items() for family in families]


@pytest.mark.parametrize("edit, family", CASES, ids=[f"{e}-{f}" for e, f in CASES])
def test_edited_folder_is_refused(edit, family, converted, capsys):
    folder = converted(family)
    expected = EDITS[edit][0](folder)

    code, checks, err = verify(capsys, folder)
    assert code == 3, (checks, err)
    assert [c["name"] for c in checks] == ["manifest"] and not checks[0]["passed"]
    assert checks[0]["detail"].startswith(expected), checks[0]["detail"]

    code, out, err = dry_run(capsys, folder)
    assert code == 2 and out == ""
    assert err.startswith(f"ofaconv: error: refusing to push {folder}: {expected}"), err
    assert err.rstrip().endswith("(--allow-unverified does not override this)") and err.count("\n") == 1
    code, out, err = run(capsys, "push", folder, "alice/model", "--dry-run", "--allow-unverified")
    assert code == 2 and out == "" and expected in err


SOURCES = {"bertclip": "bertclip", "cnclip": "src/clip_cn_vit-b-16.pt"}


@pytest.mark.parametrize("family", ["bertclip", "cnclip"])
def test_clip_verify_against_its_source(family, request, converted, capsys, tmp_path):
    from ofaconv.clip import synth

    folder = converted(family)
    source = request.getfixturevalue(f"{family}_verified_folder").parent / SOURCES[family]
    before = json.loads((folder / "conversion_report.json").read_text())
    code, out, err = run(capsys, "verify", folder, "--against", source, "--json")
    assert code == 0, out + err
    checks = json.loads(out)
    names = [c["name"] for c in checks]
    assert names[:3] == ["manifest", "source", "tensors"] and "logits_over_exp_logit_scale" in names
    after = json.loads((folder / "conversion_report.json").read_text())
    assert after["checks"] == checks[1:] and after["files"] == before["files"]  # checks recorded, manifest kept
    assert verify(capsys, folder)[0] == 0  # the rewritten report still matches the folder

    other = synth.write_legacy_bertclip(tmp_path / "other", seed=1) if family == "bertclip" else \
        synth.write_cnclip_pt(tmp_path / "other", "ViT-B-16", seed=1)
    code, out, err = run(capsys, "verify", folder, "--against", other, "--json")
    assert code == 3, out + err
    failed = {c["name"] for c in json.loads(out) if not c["passed"]}
    assert {"source", "tensors"} <= failed, out
    code, out, err = run(capsys, "push", folder, "alice/model", "--dry-run")
    assert code == 2 and "check 'source'" in err and "(pass --allow-unverified to push anyway)" in err
