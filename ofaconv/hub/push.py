"""``ofaconv push FOLDER REPO_ID``: publish a verified model folder to the Hub in one commit.

Invariants:
- exactly the files of the manifest in ``conversion_report.json`` are uploaded, each read through a
  descriptor opened without following any link, and only when the folder holds those files and
  nothing else, byte for byte, and no link at all (no flag overrides this: a folder that is not
  what ofaconv wrote is never published); the model card ofaconv wrote is rebuilt for the repo;
- the report's checks must all have passed (``--allow-unverified`` overrides that, loudly);
- one ``create_commit`` carries every file, so a repo never holds weights without their config,
  card and report;
- the token never appears in output or in error messages;
- every failure is one line naming what to do about it.

A subfolder a conversion wrote without a report of its own (a CLIP package's ``vision_tower/``)
is published against its part of the parent's manifest and the parent's checks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ofaconv import __version__
from ofaconv.core.errors import OfaconvError
from ofaconv.core.report import (
    REPORT_NAME,
    check_problems,
    covering_report,
    folder_files,
    human_size,
    manifest_part,
    manifest_problems,
    schema_problems,
)
from .card import CARD_NAME, card_for_repo, card_metadata

_TRUE = {"1", "on", "yes", "true"}


class PushError(OfaconvError):
    """The Hub (or the way to it) refused the upload."""


@dataclass
class PlannedFile:
    path_in_repo: str
    size: int
    source: object  # a file of the folder, opened without following links, or the card's bytes
    note: str = ""


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    report: dict
    files: list[PlannedFile]
    card_metadata: dict
    problems: list[str]  # why the checks do not vouch for these files (only with --allow-unverified)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class PushResult:
    repo_id: str
    commit_url: str
    pr_url: str | None
    created: bool  # the repo did not exist before
    uploaded: list[str]  # paths whose content changed in this commit (empty: nothing to push)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a converted folder to the Hugging Face Hub in one commit",
        description=(
            "Upload a converted or finetuned folder to the Hugging Face Hub in a single commit, with "
            "a model card built from its conversion report. Uploads exactly the files the manifest in "
            f"{REPORT_NAME} lists; refuses a folder whose report is missing or failed, whose files "
            "differ from the manifest (edited, missing or extra) or that holds a symbolic link."
        ),
    )
    parser.add_argument("folder", type=Path, help="converted model folder")
    parser.add_argument("repo_id", help="target repo, NAMESPACE/NAME; created if it does not exist")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--revision", help="branch to commit to (default: main)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    parser.add_argument("--commit-message", help="commit summary (default: names the source and ofaconv version)")
    parser.add_argument("--token", help="Hugging Face token with write access (default: HF_TOKEN, then `hf auth login`)")
    parser.add_argument("--dry-run", action="store_true", help="print the files, sizes and card metadata; upload nothing")
    parser.add_argument("--allow-unverified", action="store_true", help="push even if the report records no checks or a failed one (never files that differ from its manifest, nor links)")
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)  # tests: a loopback Hub
    parser.set_defaults(func=run)


def run(args) -> int:
    push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        token=args.token,
        endpoint=args.endpoint,
        allow_unverified=args.allow_unverified,
        dry_run=args.dry_run,
    )
    return 0


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    allow_unverified: bool = False,
    dry_run: bool = False,
    out=None,
) -> PushResult | None:
    """Upload ``folder`` to ``repo_id`` as one commit; ``None`` for a dry run. Progress goes to ``out``."""
    out = out or sys.stdout
    if token is None and not dry_run:
        from huggingface_hub import get_token

        token = get_token()
    try:
        return _push(
            Path(folder), repo_id, private=private, revision=revision, create_pr=create_pr,
            commit_message=commit_message, token=token, endpoint=endpoint,
            allow_unverified=allow_unverified, dry_run=dry_run, out=out,
        )
    except OfaconvError as exc:
        # Server messages are quoted in errors; a server may echo what it was sent.
        if token and token in str(exc):
            raise type(exc)(str(exc).replace(token, "hf_***")) from None
        raise


def plan_push(folder: Path, repo_id: str, files: contextlib.ExitStack, *, allow_unverified: bool = False) -> PushPlan:
    """What would be uploaded: the manifest's files of ``folder``, opened (on ``files``) without
    following links and checked against the manifest, the card rebuilt for ``repo_id``."""
    if not folder.is_dir():
        raise OfaconvError("not a directory", path=folder)
    try:
        report, prefix = covering_report(folder)
    except OfaconvError as exc:
        raise OfaconvError(f"refusing to push {folder}: {exc}; only a folder written by ofaconv is published") from None
    problems = schema_problems(report)
    listed = manifest_part(report, prefix) if not problems else {}
    operations = {}
    for name in sorted(set(listed) & set(folder_files(folder))):
        operations[name] = _add(name, files.enter_context(open_in_folder(folder, name)))
    digests = {name: (op.upload_info.sha256.hex(), op.upload_info.size) for name, op in operations.items()}
    problems = problems or manifest_problems(folder, listed, digests=digests)
    if problems:
        raise OfaconvError(f"refusing to push {folder}: " + "; ".join(problems)
                           + " (--allow-unverified does not override this)")
    problems = check_problems(report)
    if problems and not allow_unverified:
        raise OfaconvError(
            f"refusing to push {folder}: " + "; ".join(problems) + " (pass --allow-unverified to push anyway)"
        )
    card = card_for_repo(folder, repo_id)
    planned = [PlannedFile(name, op.upload_info.size, op) for name, op in operations.items()
               if not (name == CARD_NAME and card is not None)]
    if card is not None:
        data = str(card).encode("utf-8")
        planned.append(PlannedFile(CARD_NAME, len(data), _add(CARD_NAME, data), note=f"card built for {repo_id}"))
        listed = {**listed, CARD_NAME: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}
        metadata = card.data.to_dict()
    else:
        metadata = card_metadata(folder)
    # The repo's report lists what the repo holds (the card as rebuilt, a subfolder's files at its
    # root), so a downloaded copy passes `ofaconv verify` like the folder did.
    data = (json.dumps({**report, "files": listed}, indent=2, sort_keys=True) + "\n").encode("utf-8")
    note = "manifest of the files in this commit" if prefix or card is not None else ""
    planned.append(PlannedFile(REPORT_NAME, len(data), _add(REPORT_NAME, data), note=note))
    return PushPlan(folder, repo_id, report, sorted(planned, key=lambda f: f.path_in_repo), metadata, problems)


def _add(path_in_repo: str, source):
    from huggingface_hub import CommitOperationAdd

    return CommitOperationAdd(path_in_repo, source)


def open_in_folder(folder: Path, name: str):
    """``folder/name`` opened for reading without following a link at any step below ``folder``
    (each directory and the file itself are opened with O_NOFOLLOW), and only if it is a regular file."""
    nofollow = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    parts = name.split("/")
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for part in parts[:-1]:
            inner = os.open(part, nofollow | getattr(os, "O_DIRECTORY", 0), dir_fd=fd)
            os.close(fd)
            fd = inner
        inner = os.open(parts[-1], nofollow, dir_fd=fd)
    except OSError as exc:
        raise OfaconvError(f"cannot open without following links ({exc.strerror}); replace links with the "
                           "files they point to", path=folder / name) from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(inner).st_mode):
        os.close(inner)
        raise OfaconvError("not a regular file", path=folder / name)
    return os.fdopen(inner, "rb")


def _push(folder, repo_id, *, private, revision, create_pr, commit_message, token, endpoint,
          allow_unverified, dry_run, out) -> PushResult | None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if create_pr and revision:
        raise OfaconvError("--create-pr opens a pull request against main and cannot be combined with --revision")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise OfaconvError(f"invalid repo id {repo_id!r}: {str(exc).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise OfaconvError(f"repo id {repo_id!r} needs a namespace: NAMESPACE/{repo_id}")

    with contextlib.ExitStack() as files:
        plan = plan_push(folder, repo_id, files, allow_unverified=allow_unverified)
        return _upload(plan, private=private, revision=revision, create_pr=create_pr, commit_message=commit_message,
                       token=token, endpoint=endpoint, dry_run=dry_run, out=out)


def _upload(plan: PushPlan, *, private, revision, create_pr, commit_message, token, endpoint, dry_run,
            out) -> PushResult | None:
    repo_id, folder = plan.repo_id, plan.folder
    operations = [f.source for f in plan.files]
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    if dry_run:
        _print_plan(plan, endpoint, private=private, revision=revision, create_pr=create_pr, out=out)
        return None
    if plan.problems:
        print("ofaconv: warning: pushing unverified weights: " + "; ".join(plan.problems), file=sys.stderr)

    from huggingface_hub import HfApi, constants

    endpoint = endpoint or constants.ENDPOINT
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or constants.is_offline_mode():
        raise PushError(f"HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push to {endpoint}")
    if not token:
        raise PushError(
            f"no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token (a token with write access to {repo_id})"
        )
    api = HfApi(endpoint=endpoint, token=token, library_name="ofaconv", library_version=__version__)
    created, refusal = _create_repo(api, repo_id, private=private, endpoint=endpoint)
    if private and not created and not refusal:
        print(f"ofaconv: note: {repo_id} already exists; --private does not change its visibility", file=sys.stderr)
    try:
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or _default_message(folder, plan.report),
            commit_description=_description(plan.report),
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as exc:
        raise _hub_error(exc, repo_id=repo_id, endpoint=endpoint, revision=revision, refusal=refusal) from None
    changed = [op for op in operations if not _unchanged(op)]
    if changed:
        size = sum(op.upload_info.size for op in changed)
        print(f"pushed {len(changed)} of {len(plan.files)} files ({human_size(size)}) to {repo_id} in one commit", file=out)
    else:
        print(f"nothing to push: {repo_id} already holds these {len(plan.files)} files", file=out)
    print(f"commit: {info.commit_url}", file=out)
    if info.pr_url:
        print(f"pull request: {info.pr_url}", file=out)
    return PushResult(repo_id, info.commit_url, info.pr_url, created, [op.path_in_repo for op in changed])


def _unchanged(op) -> bool:
    """Whether the client skipped ``op`` because the Hub already has that content (it compares
    the oid preupload returned with the local one; both are private attributes, so a client
    without them counts every file as changed)."""
    remote = getattr(op, "_remote_oid", None)
    return remote is not None and remote == getattr(op, "_local_oid", None)


def _create_repo(api, repo_id: str, *, private: bool, endpoint: str) -> tuple[bool, str | None]:
    """Create ``repo_id``: ``(created, refusal)``, the server's message when it refused (403).

    A refusal is left for the commit to judge: a token may lack the right to create repos in a
    namespace and still write to a repo that exists there.
    """
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=False)
        return True, None
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        if status == 409:  # exists
            return False, None
        if status == 403:
            return False, _one_line(exc.server_message or "") or "403 Forbidden"
        raise _hub_error(exc, repo_id=repo_id, endpoint=endpoint) from None
    except Exception as exc:
        raise _hub_error(exc, repo_id=repo_id, endpoint=endpoint) from None


def _hub_error(
    exc: Exception, *, repo_id: str, endpoint: str, revision: str | None = None, refusal: str | None = None
) -> OfaconvError:
    """One line for a failure of the Hub client."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError

    namespace = repo_id.split("/")[0]
    if isinstance(exc, OfflineModeIsEnabled):
        return PushError(f"HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push to {endpoint}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code
        server = _one_line(exc.server_message or "")
        detail = f" ({refusal or server})" if refusal or server else ""
        if status == 401:
            return PushError(
                f"the Hub at {endpoint} rejected the token (401): check it with `hf auth whoami` or create a new one with write access"
            )
        if isinstance(exc, RevisionNotFoundError):
            return PushError(
                f"revision {revision!r} does not exist in {repo_id}: create it first with "
                f"`hf repos branch create {repo_id} {revision}`"
            )
        if status in (403, 404):
            return PushError(
                f"no write access to {repo_id}: the namespace '{namespace}' belongs to someone else "
                f"or your token cannot write to it{detail}"
            )
        return PushError(f"the Hub at {endpoint} refused the upload to {repo_id} (HTTP {status}){detail}")
    if isinstance(exc, _transport_errors()):
        return PushError(f"cannot reach the Hub at {endpoint}: {_one_line(str(exc)) or type(exc).__name__}")
    if isinstance(exc, ValueError):  # e.g. README.md metadata rejected by the Hub's validator
        return PushError(f"the Hub at {endpoint} refused the upload to {repo_id}: {_one_line(str(exc))}")
    return PushError(f"upload to {repo_id} failed: {type(exc).__name__}: {_one_line(str(exc))}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x speaks httpx, 2.x httpx2; look only at what it already imported.
    classes = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None:
            classes.append(module.TransportError)
    return tuple(classes)


def _default_message(folder: Path, report: dict) -> str:
    name = report.get("variant") or folder.resolve().name
    source = (report.get("source") or {}).get("file")
    kind = report.get("kind")
    if kind == "conversion" and source:
        return f"Upload {name} converted from {source} with ofaconv {__version__}"
    if kind == "finetune":
        return f"Upload {name} finetuned with ofaconv {__version__}"
    return f"Upload {name} ({kind}) with ofaconv {__version__}"


def _description(report: dict) -> str:
    source = report.get("source") or {}
    checks = [c for c in report.get("checks") or [] if isinstance(c, dict)]
    passed = sum(c.get("passed") is True for c in checks)
    lines = []
    if source.get("file"):
        digest = source.get("sha256") or (source.get("fingerprint") or {}).get("sha256", "?")
        kind = "sha256" if source.get("sha256") else "fingerprint"
        lines.append(f"Source: {source['file']} ({kind} {digest})")
    lines.append(f"Checks: {passed}/{len(checks)} passed, see {REPORT_NAME}.")
    return "\n".join(lines)


def _print_plan(plan: PushPlan, endpoint, *, private, revision, create_pr, out) -> None:
    where = endpoint or "the default endpoint (https://huggingface.co unless HF_ENDPOINT is set)"
    target = "a pull request against main" if create_pr else f"branch {revision or 'main'}"
    print(f"dry run: {plan.folder} -> {plan.repo_id} at {where}, {target}"
          f"{', private if created' if private else ''}", file=out)
    width = max(len(f.path_in_repo) for f in plan.files)
    for f in plan.files:
        note = f"  ({f.note})" if f.note else ""
        print(f"  {f.path_in_repo:<{width}}  {human_size(f.size):>10}{note}", file=out)
    print(f"  {len(plan.files)} files, {human_size(plan.total_size)}", file=out)
    if plan.problems:
        print("report: NOT verified (--allow-unverified): " + "; ".join(plan.problems), file=out)
    else:
        print(f"report: {REPORT_NAME} passed; every file matches its manifest", file=out)
    print("card metadata:", file=out)
    text = yaml.safe_dump(plan.card_metadata, sort_keys=False, allow_unicode=True).rstrip()
    for line in text.splitlines():
        print(f"  {line}", file=out)
    print("nothing was uploaded (dry run)", file=out)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "hf_***")
