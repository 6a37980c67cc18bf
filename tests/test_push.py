"""``ofaconv push`` against a loopback stand-in of the Hub, driven by the real huggingface_hub client.

The conftest blocks every non-loopback socket and sets HF_HUB_OFFLINE=1; the ``hub`` fixture turns
offline mode off for its test only, so the client can reach 127.0.0.1 and nothing else.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ofaconv.cli as cli
from fakehub import REJECTED_TOKEN, VALID_TOKEN, FakeHub, User, make_converted_folder, rehash
from ofaconv.core.report import validate_report

ROUTES = ["create", "validate_yaml", "preupload", "commit"]


@pytest.fixture
def no_saved_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)


@pytest.fixture
def hub(tmp_path, monkeypatch, no_saved_token):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub(tmp_path / "hub") as server:
        yield server
    assert server.unexpected == [], "the client called endpoints the fake Hub does not implement"


@pytest.fixture
def folder(tmp_path):
    return make_converted_folder(tmp_path / "out")


def push(capsys, *argv):
    code = cli.main(["push", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_received(received: dict[str, bytes], folder: Path) -> None:
    """The repo holds the folder's files byte for byte (the card rebuilt for it) and a report whose
    manifest lists exactly what the repo holds."""
    import hashlib

    local = local_files(folder)
    for name, data in local.items():
        if name not in ("conversion_report.json", "README.md"):
            assert received[name] == data, name
    report = json.loads(received["conversion_report.json"])
    original = json.loads(local["conversion_report.json"])
    assert {k: v for k, v in report.items() if k != "files"} == {k: v for k, v in original.items() if k != "files"}
    held = {name: data for name, data in received.items() if name not in (".gitattributes", "conversion_report.json")}
    assert report["files"] == {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                               for name, data in held.items()}


# -- the report gate ---------------------------------------------------------------------------


def test_report_accepts_verified_folder(folder):
    assert validate_report(folder) == []


def test_report_accepts_sharded_folder(tmp_path):
    assert validate_report(make_converted_folder(tmp_path / "out", shards=3)) == []


def _edit_report(folder, **changes):
    report = json.loads((folder / "conversion_report.json").read_text())
    report.update(changes)
    (folder / "conversion_report.json").write_text(json.dumps(report))
    return report


@pytest.mark.parametrize("damage, reason", [
    (lambda f: (f / "conversion_report.json").unlink(), "conversion_report.json: missing"),
    (lambda f: (f / "conversion_report.json").write_text("{"), "conversion_report.json: not valid JSON"),
    (lambda f: _edit_report(f, schema="ofaconv/report@0"), "schema is 'ofaconv/report@0'"),
    (lambda f: _edit_report(f, kind="merge"), "kind is 'merge'"),
    (lambda f: _edit_report(f, checks=[], passed=True), "no checks recorded"),
    (lambda f: _edit_report(f, checks=[{"name": "logits", "passed": False, "metric": "max_abs_diff",
                                        "value": 0.5, "gate": 1e-5}], passed=False),
     "check 'logits' (max_abs_diff 0.5, gate 1e-05) failed"),
    (lambda f: _edit_report(f, passed=False), "'passed' is False although every check passed"),
    (lambda f: _edit_report(f, files={}), "the manifest ('files') is empty"),
    (lambda f: (f / "extra.bin").write_bytes(b"x"), "extra.bin: present but not written by the conversion"),
    (lambda f: (f / "notes.txt").write_text("x"), "notes.txt: present but not written by the conversion"),
    (lambda f: (f / "config.json").write_text("{}"), "config.json: size 2 differs"),
    (lambda f: (f / "sub").mkdir() or (f / "sub" / "x.json").write_text("{}"), "sub/x.json: present but not"),
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors: listed in conversion_report.json but missing"),
    (lambda f: (f / "model.safetensors").write_bytes(b"short"), "model.safetensors: size 5 differs"),
])
def test_report_rejects(folder, damage, reason):
    damage(folder)
    reasons = validate_report(folder)
    assert any(reason in r for r in reasons), reasons


def test_report_never_reads_outside_the_folder(folder, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(VALID_TOKEN)
    report = json.loads((folder / "conversion_report.json").read_text())
    entry = {"sha256": hashlib.sha256(secret.read_bytes()).hexdigest(), "size": secret.stat().st_size}
    _edit_report(folder, files={**report["files"], "../secret": entry, str(secret): entry})
    reasons = validate_report(folder)
    assert f"{secret}: listed in conversion_report.json but missing from the folder" in reasons
    assert "../secret: listed in conversion_report.json but missing from the folder" in reasons


@pytest.mark.parametrize("where", ["file", "directory"])
def test_open_in_folder_follows_no_link(folder, tmp_path, where):
    from ofaconv.core.errors import OfaconvError
    from ofaconv.hub.push import open_in_folder

    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "token").write_text(VALID_TOKEN)
    if where == "file":
        os.symlink(outside / "sub" / "token", folder / "token")
        name = "token"
    else:
        os.symlink(outside / "sub", folder / "sub")
        name = "sub/token"
    with pytest.raises(OfaconvError, match="cannot open without following links"):
        open_in_folder(folder, name)
    with open_in_folder(folder, "config.json") as f:
        assert f.read() == (folder / "config.json").read_bytes()


@pytest.mark.hub
@pytest.mark.parametrize("link", ["file", "directory"])
def test_push_refuses_links_and_uploads_nothing(hub, folder, tmp_path, capsys, link):
    secret = tmp_path / "secret"
    if link == "file":
        secret.write_text(VALID_TOKEN)
        os.symlink(secret, folder / "token")
        name = "token"
    else:
        (secret / ".cache" / "huggingface").mkdir(parents=True)
        (secret / ".cache" / "huggingface" / "token").write_text(VALID_TOKEN)
        os.symlink(secret, folder / "home")
        name = "home"
    for extra in ([], ["--dry-run"], ["--allow-unverified"]):
        code, out, err = push(capsys, folder, "alice/ofa", "--endpoint", hub.url, "--token", VALID_TOKEN, *extra)
        assert code == 2 and out == "" and err.count("\n") == 1
        assert err.startswith(f"ofaconv: error: refusing to push {folder}: {name}: a symbolic link"), err
    assert hub.log == [] and "alice/ofa" not in hub.repos


def test_report_rejects_same_size_different_bytes(folder):
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    (reason,) = validate_report(folder)
    assert reason.startswith("model.safetensors: sha256 ") and "differs" in reason


def test_report_uses_given_digests(folder):
    size = (folder / "model.safetensors").stat().st_size
    (reason,) = validate_report(folder, digests={"model.safetensors": ("0" * 64, size)})
    assert "sha256 000000000000… differs" in reason


# -- dry run (no network at all: offline mode stays on) ----------------------------------------


def test_dry_run(folder, capsys):
    code, out, err = push(capsys, folder, "YeungNLP/ofa-cn-base-muge", "--dry-run", "--private")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"dry run: {folder} -> YeungNLP/ofa-cn-base-muge") and "private" in lines[0]
    size = (folder / "model.safetensors").stat().st_size
    assert any(line.split()[:3] == ["model.safetensors", str(size), "B"] for line in lines)
    assert any(line.strip().startswith("README.md") and "card built for YeungNLP/ofa-cn-base-muge" in line
               for line in lines)
    assert "report: conversion_report.json passed; every file matches its manifest" in lines
    assert "  language: zh" in lines and "  pipeline_tag: image-text-to-text" in lines and "  - ofaconv" in lines
    assert lines[-1] == "nothing was uploaded (dry run)"


def test_dry_run_refuses_unverified(folder, capsys):
    _edit_report(folder, checks=[])
    code, out, err = push(capsys, folder, "alice/m", "--dry-run")
    assert code == 2 and out == ""
    assert err.startswith(f"ofaconv: error: refusing to push {folder}: conversion_report.json: no checks recorded")
    assert err.rstrip().endswith("(pass --allow-unverified to push anyway)") and err.count("\n") == 1


# -- uploads -----------------------------------------------------------------------------------


@pytest.mark.hub
def test_push_uploads_byte_identical_files_in_one_commit(hub, folder, capsys):
    code, out, err = push(capsys, folder, "alice/ofa-cn", "--endpoint", hub.url, "--token", VALID_TOKEN)
    assert code == 0, err
    assert hub.routes_hit() == ROUTES
    assert all(r.token == VALID_TOKEN for r in hub.log if r.route != "validate_yaml")

    received = hub.files("alice/ofa-cn")
    expected = local_files(folder)
    assert set(received) == set(expected) | {"README.md", ".gitattributes"}
    assert_received(received, folder)
    card = received["README.md"].decode()
    assert card.startswith("---\n") and 'repo = "alice/ofa-cn"' in card  # the card was built for the repo

    history = hub.history("alice/ofa-cn")
    assert [c.summary for c in history] == [
        "Upload ofa-cn-base converted from ofa_cn_base.pt with ofaconv 0.1.0", "initial commit"]
    assert "Checks: 2/2 passed" in history[0].description
    repo = hub.repos["alice/ofa-cn"]
    assert repo.created_with == {"name": "ofa-cn", "organization": "alice"} and not repo.private
    assert out.splitlines() == [
        f"pushed {len(expected) + 1} of {len(expected) + 1} files ("
        + out.split("(", 1)[1].split(")", 1)[0] + ") to alice/ofa-cn in one commit",
        f"commit: {hub.url}/alice/ofa-cn/commit/{history[0].oid}",
    ]


@pytest.mark.hub
def test_push_sharded_folder(hub, tmp_path, capsys):
    folder = make_converted_folder(tmp_path / "sharded", shards=3)
    code, _, err = push(capsys, folder, "alice/sharded", "--endpoint", hub.url, "--token", VALID_TOKEN)
    assert code == 0, err
    assert_received(hub.files("alice/sharded"), folder)
    assert len(hub.history("alice/sharded")) == 2


@pytest.mark.hub
def test_push_private_with_message(hub, folder, capsys):
    code, _, err = push(capsys, folder, "alice-lab/ofa", "--endpoint", hub.url, "--token", VALID_TOKEN,
                        "--private", "--commit-message", "First upload")
    assert code == 0, err
    repo = hub.repos["alice-lab/ofa"]
    assert repo.private and repo.created_with == {"name": "ofa", "organization": "alice-lab", "visibility": "private"}
    assert hub.history("alice-lab/ofa")[0].summary == "First upload"


@pytest.mark.hub
def test_push_create_pr(hub, folder, capsys):
    hub.add_repo("alice/ofa", owner="alice", files={"README.md": b"# placeholder\n"})
    main_before = hub.repos["alice/ofa"].refs["main"]
    code, out, err = push(capsys, folder, "alice/ofa", "--endpoint", hub.url, "--token", VALID_TOKEN, "--create-pr")
    assert code == 0, err
    repo = hub.repos["alice/ofa"]
    assert repo.refs["main"] == main_before  # main untouched
    assert repo.pull_requests() == ["refs/pr/1"]
    assert hub.files("alice/ofa", "refs/pr/1")["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert hub.history("alice/ofa", "refs/pr/1")[1].oid == main_before  # one commit on top of main
    assert all(r.query == {"create_pr": ["1"]} for r in hub.log if r.route in ("preupload", "commit"))
    assert f"pull request: {hub.url}/alice/ofa/discussions/1" in out.splitlines()


@pytest.mark.hub
def test_push_to_existing_branch(hub, folder, capsys):
    repo = hub.add_repo("alice/ofa", owner="alice")
    repo.refs["dev"] = repo.refs["main"]
    code, _, err = push(capsys, folder, "alice/ofa", "--endpoint", hub.url, "--token", VALID_TOKEN, "--revision", "dev")
    assert code == 0, err
    assert "model.safetensors" in hub.files("alice/ofa", "dev") and "model.safetensors" not in hub.files("alice/ofa")
    assert [r.path for r in hub.log if r.route == "commit"] == ["/api/models/alice/ofa/commit/dev"]


@pytest.mark.hub
def test_push_again_changes_nothing(hub, folder, capsys):
    assert push(capsys, folder, "alice/ofa", "--endpoint", hub.url, "--token", VALID_TOKEN)[0] == 0
    code, out, err = push(capsys, folder, "alice/ofa", "--endpoint", hub.url, "--token", VALID_TOKEN, "--private")
    assert code == 0, err
    assert len(hub.history("alice/ofa")) == 2
    assert out.startswith("nothing to push: alice/ofa already holds these")
    assert "already exists; --private does not change its visibility" in err


@pytest.mark.hub
def test_push_keeps_a_card_without_the_marker(hub, folder, capsys):
    # A card ofaconv did not generate but the manifest lists is uploaded as it is.
    card = "---\nlicense: mit\ntags:\n- ofa\n---\n# Hand-written card\n"
    (folder / "README.md").write_text(card)
    rehash(folder)
    code, out, err = push(capsys, folder, "alice/ofa", "--endpoint", hub.url, "--token", VALID_TOKEN)
    assert code == 0, err
    assert hub.files("alice/ofa")["README.md"] == card.encode()
    assert_received(hub.files("alice/ofa"), folder)


@pytest.mark.hub
def test_push_token_from_environment_and_endpoint_from_hf_endpoint(hub, folder, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    code, _, err = push(capsys, folder, "alice/ofa")
    assert code == 0, err
    assert all(r.token == VALID_TOKEN for r in hub.log if r.route != "validate_yaml")


@pytest.mark.hub
def test_push_allow_unverified(hub, folder, capsys):
    _edit_report(folder, checks=[])
    code, out, err = push(capsys, folder, "alice/ofa", "--endpoint", hub.url, "--token", VALID_TOKEN,
                          "--allow-unverified")
    assert code == 0
    assert err.startswith("ofaconv: warning: pushing unverified weights: conversion_report.json: no checks recorded")
    assert "model.safetensors" in hub.files("alice/ofa")


# -- refusals and errors: one line, nothing uploaded, never the token ------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unverified(folder):
    (folder / "model.safetensors").write_bytes(b"tampered")


def _edited_remote_code(folder):
    with open(folder / "configuration_ofa.py", "a") as f:
        f.write("import os  # runs on every user's machine\n")


def _link_to_token(folder):
    token = folder.parent / "token"
    token.write_text(VALID_TOKEN)
    os.symlink(token, folder / "token")


ERRORS = {
    "unverified": (["--token", VALID_TOKEN], _unverified, "refusing to push {folder}: model.safetensors: size 8 differs", []),
    "edited_remote_code": (["--token", VALID_TOKEN, "--allow-unverified"], _edited_remote_code,
                           "refusing to push {folder}: configuration_ofa.py: size ", []),
    "extra_file": (["--token", VALID_TOKEN], lambda f: (f / "notes.txt").write_text("x"),
                   "refusing to push {folder}: notes.txt: present but not written by the conversion", []),
    "link_to_token": (["--token", VALID_TOKEN, "--allow-unverified"], _link_to_token,
                      "refusing to push {folder}: token: a symbolic link", []),
    "create_pr_and_revision": (["--token", VALID_TOKEN, "--create-pr", "--revision", "dev"], None,
                               "--create-pr opens a pull request against main and cannot be combined with --revision", []),
    "no_token": ([], None, "no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token", []),
    "rejected_token": (["--token", REJECTED_TOKEN], None, "the Hub at {url} rejected the token (401)", ["create"]),
    "org_not_owned": (["--token", VALID_TOKEN, "--repo", "bigorg/ofa"], None,
                      "no write access to bigorg/ofa: the namespace 'bigorg' belongs to someone else or your token "
                      "cannot write to it (You don't have the rights to create a model under the namespace \"bigorg\"",
                      ["create", "validate_yaml", "preupload"]),
    "repo_of_someone_else": (["--token", VALID_TOKEN, "--repo", "bob/ofa"], None,
                             "no write access to bob/ofa: the namespace 'bob' belongs to someone else",
                             ["create", "validate_yaml", "preupload"]),
    "missing_branch": (["--token", VALID_TOKEN, "--revision", "nope"], None,
                       "revision 'nope' does not exist in alice/ofa: create it first with "
                       "`hf repos branch create alice/ofa nope`", ["create", "validate_yaml", "preupload"]),
    "offline_env": (["--token", VALID_TOKEN, "--offline"], None,
                    "HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push to {url}", []),
    # HF_HUB_OFFLINE=1 when huggingface_hub was imported, unset since: the client stays offline.
    "offline_client": (["--token", VALID_TOKEN, "--offline-client"], None,
                       "HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push to {url}", []),
    "unreachable": (["--token", VALID_TOKEN, "--unreachable"], None, "cannot reach the Hub at {url}: ", []),
    "bad_card_metadata": (["--token", VALID_TOKEN, "--bad-card"], None,
                          "the Hub at {url} refused the upload to alice/ofa: Invalid metadata in README.md. "
                          '- "license" must be a string', ["create", "validate_yaml"]),
}


@pytest.mark.hub
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_push_errors(case, tmp_path, folder, capsys, monkeypatch, no_saved_token):
    from huggingface_hub import constants

    argv, damage, message, routes = ERRORS[case]
    argv = list(argv)
    repo_id = "alice/ofa"
    if "--repo" in argv:
        repo_id = argv.pop(argv.index("--repo") + 1)
        argv.remove("--repo")
    users = {VALID_TOKEN: User("alice", ("alice-lab",)), "hf_bob_token": User("bob")}
    with FakeHub(tmp_path / "hub", users=users, leak_token=True) as server:
        server.add_repo("bob/ofa", owner="bob")
        url = server.url
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        if "--offline" in argv:
            argv.remove("--offline")
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        if "--offline-client" in argv:  # the client's own switch, read when it was imported
            argv.remove("--offline-client")
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        if "--unreachable" in argv:
            argv.remove("--unreachable")
            url = f"http://127.0.0.1:{_closed_port()}"
        if "--bad-card" in argv:
            argv.remove("--bad-card")
            (folder / "README.md").write_text("---\nlicense: [mit, gpl]\n---\n# card\n")
            rehash(folder)
        if damage:
            damage(folder)
        before = {k: len(r.commits) for k, r in server.repos.items()}  # a new repo has 1
        code, out, err = push(capsys, folder, repo_id, "--endpoint", url, *argv)
        assert code != 0 and out == ""
        assert err.startswith("ofaconv: error: " + message.format(folder=folder, url=url)), err
        assert err.count("\n") == 1  # one line
        assert VALID_TOKEN not in err + out and REJECTED_TOKEN not in err + out
        assert server.routes_hit() == routes
        assert all(len(r.commits) == before.get(k, 1) for k, r in server.repos.items())  # nothing committed
        assert server.unexpected == []


@pytest.mark.hub
def test_leaked_token_is_scrubbed(tmp_path, folder, capsys, monkeypatch, no_saved_token):
    # The fake Hub echoes the caller's token in its error messages; the user must not see it.
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub(tmp_path / "hub", leak_token=True) as server:
        monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
        code, out, err = push(capsys, folder, "bigorg/ofa", "--endpoint", server.url)
    assert code == 2 and "(token hf_***)" in err and VALID_TOKEN not in out + err


def test_client_errors_map_to_one_line():
    import httpx2 as httpx
    from huggingface_hub.errors import OfflineModeIsEnabled

    from ofaconv.hub.push import _hub_error

    offline = _hub_error(OfflineModeIsEnabled("Cannot reach x"), repo_id="a/b", endpoint="http://h")
    assert str(offline) == "HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push to http://h"
    timeout = _hub_error(httpx.ReadTimeout("timed out"), repo_id="a/b", endpoint="http://h")
    assert str(timeout) == "cannot reach the Hub at http://h: timed out"


def test_invalid_repo_ids(folder, capsys):
    code, _, err = push(capsys, folder, "ofa-cn", "--dry-run")
    assert code == 2 and err == "ofaconv: error: repo id 'ofa-cn' needs a namespace: NAMESPACE/ofa-cn\n"
    code, _, err = push(capsys, folder, "a/b/c", "--dry-run")
    assert code == 2 and err.startswith("ofaconv: error: invalid repo id 'a/b/c'") and err.count("\n") == 1


def test_not_a_model_folder(tmp_path, capsys):
    code, _, err = push(capsys, tmp_path / "nope", "alice/ofa", "--dry-run")
    assert code == 2 and err == f"ofaconv: error: {tmp_path / 'nope'}: not a directory\n"
    (tmp_path / "empty").mkdir()
    code, _, err = push(capsys, tmp_path / "empty", "alice/ofa", "--dry-run")
    assert code == 2 and err == (f"ofaconv: error: refusing to push {tmp_path / 'empty'}: "
                                 f"{tmp_path / 'empty' / 'conversion_report.json'}: missing: the folder has no "
                                 "conversion report; only a folder written by ofaconv is published\n")


# -- end to end: convert --verify -> push -> load in a clean virtualenv -----------------------------


def _converter_ready() -> str | None:
    try:
        import ofaconv.ofa.convert  # noqa: F401
        import ofaconv.ofa.modeling.modeling_ofa  # noqa: F401
    except ImportError as exc:
        return f"needs the converter (ofaconv.convert) and the OFA model: {exc}"
    return None


CLEAN_VENV_CHECK = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForSeq2SeqLM
    folder, reference = sys.argv[1], sys.argv[2]
    ref = torch.load(reference, weights_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(**ref["inputs"]).logits
    diff = (logits - ref["logits"]).abs().max().item()
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "max_abs_diff": diff}))
""")


@pytest.mark.slow
@pytest.mark.hub
def test_convert_verify_push_load_in_clean_venv(hub, tmp_path, capsys, official_micro, official_io_path):
    """The folder the Hub received loads with plain transformers + trust_remote_code in a virtualenv
    without ofaconv, and reproduces the official fairseq logits."""
    reason = _converter_ready()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    convert = subprocess.run([sys.executable, "-m", "ofaconv", "convert", str(official_micro), str(out), "--verify"],
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert convert.returncode == 0, convert.stdout + convert.stderr
    code, stdout, err = push(capsys, out, "alice/ofa-micro", "--endpoint", hub.url, "--token", VALID_TOKEN)
    assert code == 0, err
    received = hub.materialize("alice/ofa-micro", tmp_path / "received")

    run = subprocess.run([str(_clean_venv(tmp_path)), "-c", CLEAN_VENV_CHECK, str(received),
                          str(official_io_path)], capture_output=True, text=True, cwd=tmp_path,
                         env=_clean_env(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["class"].startswith("ofaconv"), result  # the remote code, not the installed package
    assert result["max_abs_diff"] <= 1e-5, result


@pytest.mark.slow
@pytest.mark.hub
def test_card_snippet_runs_on_pushed_synthetic_checkpoint(hub, tmp_path, capsys):
    """``convert synth:ofa-cn-base --verify`` -> push -> the card's trust_remote_code snippet, as
    the Hub received it, captions an image in a virtualenv without ofaconv."""
    reason = _converter_ready()
    if reason:
        pytest.skip(reason)
    import re

    from PIL import Image

    out = tmp_path / "out"
    convert = subprocess.run([sys.executable, "-m", "ofaconv", "convert", "synth:ofa-cn-base", str(out), "--verify"],
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert convert.returncode == 0, convert.stdout + convert.stderr
    code, _, err = push(capsys, out, "alice/ofa-cn-micro", "--endpoint", hub.url, "--token", VALID_TOKEN)
    assert code == 0, err
    received = hub.materialize("alice/ofa-cn-micro", tmp_path / "received")
    snippet = re.findall(r"```python\n(.*?)```", (received / "README.md").read_text(encoding="utf-8"), re.S)[0]
    assert 'repo = "alice/ofa-cn-micro"' in snippet
    snippet = snippet.replace('"alice/ofa-cn-micro"', repr(str(received)))
    # Random weights never emit </s>: cap the length so 8 beams x 128 steps do not dominate CI.
    assert snippet.count("model.generate(**inputs)") == 1
    snippet = snippet.replace("model.generate(**inputs)", "model.generate(**inputs, max_new_tokens=8)")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "image.jpg")

    run = subprocess.run([str(_clean_venv(tmp_path)), "-c", snippet], capture_output=True, text=True,
                         cwd=tmp_path, env=_clean_env(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip(), "the snippet printed no caption"


def _clean_venv(tmp_path: Path) -> Path:
    """A virtualenv that sees torch/transformers (a plain path entry, whose own .pth files, among
    them ofaconv's editable install, are not processed) but not ofaconv; returns its python."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import importlib.util; print(importlib.util.find_spec('ofaconv'))"],
                           capture_output=True, text=True, cwd=tmp_path, env=_clean_env(tmp_path))
    assert probe.stdout.strip() == "None", "ofaconv is importable: not a clean environment"
    return python


def _clean_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    return env
