"""OutputFolder, the one writer of output folders: what --force may replace (never an input, never
a folder ofaconv did not write), temp siblings of killed runs, file modes, one run per output, and
the manifest of every file written."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ofaconv.cli import main as cli
from ofaconv.core import registry
from ofaconv.core.errors import OfaconvError
from ofaconv.core.report import REPORT_NAME, SCHEMA, folder_files, validate_report
from ofaconv.core.writer import OutputBusyError, OutputFolder, check_output, remove_stale_siblings, write_shards

REPORT = {"schema": SCHEMA, "kind": "conversion", "model_family": "ofa",
          "checks": [{"name": "probe", "passed": True, "metric": "max_abs_diff", "value": 0.0, "gate": 0.0}],
          "passed": True}


@pytest.fixture
def no_card(monkeypatch):
    monkeypatch.setattr(registry, "card_writer", lambda: None)


def write_output(out, *, force=False, protect=(), extra=None) -> dict:
    with OutputFolder(out, force=force, protect=protect) as folder:
        folder.write_json("config.json", {"model_type": "test"})
        for name, text in (extra or {}).items():
            folder.write_text(name, text)
        return folder.commit(REPORT)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from ofaconv.ofa.synth import write_synthetic_checkpoint

    path = tmp_path_factory.mktemp("src") / "ckpt.pt"
    write_synthetic_checkpoint(path, "ofa-tiny", size="micro", seed=0)
    return path


# -- defect 3: --force replaces only an earlier ofaconv output, never an input ---------------------

def test_force_into_the_checkpoints_own_folder_deletes_nothing(checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    ckpt = src / "ckpt.pt"
    ckpt.write_bytes(checkpoint.read_bytes())
    (src / "notes.txt").write_text("mine")
    before = tree(src)
    assert cli(["convert", str(ckpt), str(src), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(src) in err and "input" in err
    assert tree(src) == before
    assert cli(["convert", str(ckpt), str(ckpt), "--force"]) == 2  # OUT is the checkpoint itself
    assert tree(src) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_force_refuses_a_users_folder_without_an_ofaconv_report(checkpoint, tmp_path, capsys):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    assert cli(["convert", str(checkpoint), str(user), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(user) in err and "conversion_report.json" in err
    assert tree(user) == {"cat.jpg": b"\xff\xd8 not really"}


@pytest.mark.parametrize("relation", ["same", "parent", "inside"])
def test_protected_inputs(tmp_path, no_card, relation):
    source = tmp_path / "old_port"
    source.mkdir()
    (source / "pytorch_model.bin").write_bytes(b"weights")
    out = {"same": source, "parent": tmp_path, "inside": source / "new"}[relation]
    with pytest.raises(OfaconvError, match="input"):
        write_output(out, force=True, protect=[source])
    assert tree(source) == {"pytorch_model.bin": b"weights"}


def test_protection_sees_through_symlinks(tmp_path, no_card):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "ckpt.pt").write_bytes(b"x")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with pytest.raises(OfaconvError, match="input"):
        write_output(tmp_path / "alias", force=True, protect=[tmp_path / "real" / "ckpt.pt"])


def test_force_replaces_an_earlier_output_and_only_that(tmp_path, no_card):
    out = tmp_path / "out"
    write_output(out, extra={"a.txt": "1"})
    with pytest.raises(OfaconvError, match="--force"):
        write_output(out)
    write_output(out, force=True, extra={"b.txt": "2"})
    assert sorted(tree(out)) == ["b.txt", "config.json", REPORT_NAME]
    for intruder in ("user.txt", ".hidden", "sub/deeper.txt"):
        path = out / intruder
        path.parent.mkdir(exist_ok=True)
        path.write_text("not ofaconv's")
        with pytest.raises(OfaconvError, match=f"{intruder} is not in its manifest"):
            write_output(out, force=True)
        assert path.read_text() == "not ofaconv's"
        path.unlink()
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(OfaconvError, match="symbolic link"):
        write_output(out, force=True)


def test_an_empty_folder_needs_no_force_and_a_file_is_never_replaced(tmp_path, no_card):
    (tmp_path / "empty").mkdir()
    write_output(tmp_path / "empty")
    assert (tmp_path / "empty" / REPORT_NAME).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OfaconvError, match="not a folder"):
        write_output(tmp_path / "file", force=True)


# -- defect 5: temp siblings name ofaconv and their process; the next run removes dead ones -------

KILLED_RUN = textwrap.dedent("""
    import sys, time
    from ofaconv.core.writer import OutputFolder
    folder = OutputFolder(sys.argv[1]).__enter__()
    folder.write_bytes("model.safetensors", b"0" * 100000)
    print(folder.path, flush=True)
    time.sleep(600)
""")


def test_a_killed_runs_temp_is_removed_by_the_next_run(tmp_path, no_card):
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        temp = Path(run.stdout.readline().strip())
        assert temp.parent == tmp_path and temp.name.startswith(f".out.ofaconv-{run.pid}-") and temp.name.endswith(".tmp")
        assert stat.S_IMODE(temp.stat().st_mode) == 0o777 & ~_umask()  # defect 6: not mkdtemp's 0700
        with pytest.raises(OutputBusyError):  # alive: its temp and its lock are left alone
            write_output(out)
        assert temp.is_dir()
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert temp.is_dir()  # a killed run cleans nothing up
    write_output(out)
    assert not temp.exists() and (out / REPORT_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp, no lock file left


def test_stale_siblings_of_dead_processes_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    stale = tmp_path / f".out.ofaconv-{dead.pid}-0123abcd.tmp"
    trash = tmp_path / f".out.ofaconv-{dead.pid}-4567abcd.old"
    live = tmp_path / f".out.ofaconv-{os.getpid()}-89abcdef.tmp"
    other = tmp_path / f".other.ofaconv-{dead.pid}-0123abcd.tmp"  # another output's
    foreign = tmp_path / ".out.12345.tmp"  # not named by ofaconv
    for path in (stale, trash, live, other, foreign):
        path.mkdir()
        (path / "f").write_text("x")
    assert sorted(remove_stale_siblings(out)) == sorted([stale, trash])
    assert live.is_dir() and other.is_dir() and foreign.is_dir()


# -- defect 6: modes follow the umask ---------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_modes_follow_the_umask(tmp_path, mask, no_card):
    old = os.umask(mask)
    try:
        out = tmp_path / "out"
        with OutputFolder(out) as folder:
            folder.write_text("a.txt", "a")
            folder.write_tensors("sub/w.safetensors", {"w": torch.ones(2)})
            folder.add_entries(write_shards(folder.path, [("x", (2,), torch.float32, lambda: torch.zeros(2))]).files)
            with folder.recording():
                (folder.path / "lib.json").write_text("{}")
            folder.commit(REPORT)
    finally:
        os.umask(old)
    for path in [out, *out.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == want, path


# -- defect 7: one run per output -------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from ofaconv.core import registry
    from ofaconv.core.writer import OutputFolder
    registry.card_writer = lambda: None
    with OutputFolder(sys.argv[1]) as folder:
        print("holding", flush=True)
        sys.stdin.readline()
        folder.write_text("first.txt", "first run")
        folder.commit({"schema": "ofaconv/report@1", "kind": "conversion", "model_family": "ofa",
                       "checks": [], "passed": True})
    print("committed", flush=True)
""")


def test_a_second_run_into_the_same_output_fails_at_once(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(OutputBusyError):  # what a command checks first, before loading anything
            check_output(out)
        assert cli(["convert", str(checkpoint), str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "another ofaconv run is writing" in err and str(out) in err
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "committed"
    finally:
        holder.kill()
        holder.wait()
    assert (out / "first.txt").read_text() == "first run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_output_is_checked_again_at_commit(tmp_path, no_card):
    out = tmp_path / "out"
    with pytest.raises(OfaconvError, match="exists"):
        with OutputFolder(out) as folder:
            folder.write_text("a.txt", "a")
            out.mkdir()  # someone else's folder appears while the run writes
            (out / "theirs.txt").write_text("theirs")
            folder.commit(REPORT)
    assert tree(out) == {"theirs.txt": b"theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- defect 4: the manifest is the folder -----------------------------------------------------------

def test_manifest_lists_every_file_hashed_as_written(tmp_path, monkeypatch):
    calls = []

    def fake_card(folder, **kwargs):
        calls.append((Path(folder), kwargs, json.loads((Path(folder) / REPORT_NAME).read_text())))
        (Path(folder) / "README.md").write_text("# card\n")

    monkeypatch.setattr(registry, "card_writer", lambda: fake_card)
    out = tmp_path / "out"
    with OutputFolder(out) as folder:
        folder.write_bytes("remote_code.py", b"x = 1\n")
        folder.write_json("nested/config.json", {"a": 1})
        folder.write_tensors("text_tower/projection.safetensors", {"weight": torch.eye(3)})
        result = write_shards(folder.path / "vision", [("w", (3,), torch.float32, lambda: torch.ones(3))])
        folder.add_entries(result.files, under="vision")
        with folder.recording():
            (folder.path / "tokenizer.json").write_text("{}")
        temp = folder.path
        report = folder.commit(REPORT, card={"license": "mit"})
    (card_folder, kwargs, provisional), = calls
    assert card_folder == temp and kwargs == {"license": "mit"} and provisional["model_family"] == "ofa"
    on_disk = json.loads((out / REPORT_NAME).read_text())
    assert on_disk == report and REPORT_NAME not in report["files"]
    assert sorted(report["files"]) == [n for n in folder_files(out) if n != REPORT_NAME] == sorted(
        ["README.md", "remote_code.py", "nested/config.json", "text_tower/projection.safetensors",
         "vision/model.safetensors", "tokenizer.json"])
    for name, entry in report["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, name
    assert validate_report(out) == []
    (out / "dropped_in.txt").write_text("x")
    assert validate_report(out)


def test_a_file_written_without_being_recorded_fails_the_commit(tmp_path, no_card):
    with pytest.raises(RuntimeError, match="stray.txt"):
        with OutputFolder(tmp_path / "out") as folder:
            (folder.path / "stray.txt").write_text("x")
            folder.commit(REPORT)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_leaves_nothing(tmp_path, no_card):
    with pytest.raises(KeyError):
        with OutputFolder(tmp_path / "out") as folder:
            folder.write_text("a.txt", "a")
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_conversion_lists_every_file_it_wrote(checkpoint, tmp_path):
    from ofaconv.ofa.convert import convert_checkpoint

    out = tmp_path / "out"
    report = convert_checkpoint(checkpoint, out).report
    assert report["model_family"] == "ofa"
    names = set(report["files"])
    assert names == set(folder_files(out)) - {REPORT_NAME}
    assert {"README.md", "config.json", "generation_config.json", "modeling_ofa.py", "tokenizer.json",
            "processor_config.json", "model.safetensors"} <= names
    for name, entry in report["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, name
    mask = _umask()
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE((out / n).stat().st_mode) for n in names} == {0o666 & ~mask}
    # --force replaces it with the same bytes
    assert convert_checkpoint(checkpoint, out, force=True).report["files"] == report["files"]
