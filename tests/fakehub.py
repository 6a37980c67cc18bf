"""A loopback stand-in of the Hugging Face Hub HTTP API, for driving the real ``huggingface_hub``
client through an upload without leaving the machine.

It implements the endpoints the client calls for ``create_repo`` + ``create_commit`` when every
file is uploaded inline (Xet disabled, preupload answering ``"regular"``), found by logging every
request the client made (``FakeHub.log``):

    POST /api/repos/create                       create a repo (403 outside the token's namespaces)
    GET  /api/models/{ns}/{name}[/revision/{r}]  repo info (create_repo(exist_ok) after a 403)
    POST /api/validate-yaml                      README.md metadata check, before any upload
    POST /api/models/{ns}/{name}/preupload/{r}   upload mode per file: always "regular"
    POST /api/models/{ns}/{name}/commit/{r}      NDJSON commit; ?create_pr=1 opens refs/pr/N

Everything else answers 404 and lands in ``FakeHub.unexpected``. Tokens: ``VALID_TOKEN`` is user
``alice``, member of ``alice-lab``; ``REJECTED_TOKEN`` (and any other) gets the Hub's 401. A new
repo starts with the Hub's initial commit holding ``.gitattributes``. File contents live in a temp
dir, addressed by sha256.

``make_converted_folder`` builds a small folder shaped like ``ofaconv convert --verify`` output.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

VALID_TOKEN = "hf_fakehubVALIDtoken0123456789abcdef"
REJECTED_TOKEN = "hf_fakehubREJECTEDtoken0123456789abc"
INITIAL_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


@dataclass
class User:
    name: str
    orgs: tuple[str, ...] = ()

    def can_write(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    tree: dict[str, str]  # path -> sha256 of the blob


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    created_with: dict = field(default_factory=dict)  # the create request's JSON body

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def pull_requests(self) -> list[str]:
        return sorted((r for r in self.refs if r.startswith("refs/pr/")), key=lambda r: int(r.rsplit("/", 1)[1]))


@dataclass
class LoggedRequest:
    method: str
    path: str
    query: dict
    status: int
    token: str | None
    route: str | None  # the implemented route that answered, None for 404-unimplemented


class HubError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, header_message: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.header_message = status, message, code, header_message


_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", "create", re.compile(r"/api/repos/create")),
    ("GET", "repo_info", re.compile(_REPO + r"(?:/revision/(?P<rev>.+))?")),
    ("POST", "validate_yaml", re.compile(r"/api/validate-yaml")),
    ("POST", "preupload", re.compile(_REPO + r"/preupload/(?P<rev>.+)")),
    ("POST", "commit", re.compile(_REPO + r"/commit/(?P<rev>.+)")),
]


class FakeHub:
    def __init__(self, root: str | Path, *, users: dict[str, User] | None = None, leak_token: bool = False):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.users = users if users is not None else {VALID_TOKEN: User("alice", ("alice-lab",))}
        self.leak_token = leak_token  # echo the caller's token in error messages, to test scrubbing
        self.repos: dict[str, Repo] = {}
        self.log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakehub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- inspection -----------------------------------------------------------------------------

    @property
    def unexpected(self) -> list[LoggedRequest]:
        return [r for r in self.log if r.route is None]

    def routes_hit(self) -> list[str]:
        return [r.route or f"UNEXPECTED {r.method} {r.path}" for r in self.log]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        tree = repo.commits[repo.refs[revision]].tree
        return {path: (self.root / "blobs" / sha).read_bytes() for path, sha in tree.items()}

    def history(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        repo = self.repos[repo_id]
        out, oid = [], repo.refs[revision]
        while oid is not None:
            out.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return out

    def materialize(self, repo_id: str, dest: str | Path, revision: str = "main") -> Path:
        """Write the files of ``revision`` into ``dest`` (as a download would) and return it."""
        dest = Path(dest)
        for path, data in self.files(repo_id, revision).items():
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            (dest / path).write_bytes(data)
        return dest

    # -- setup ----------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, *, owner: str, private: bool = False, files: dict[str, bytes] | None = None):
        """A repo that already exists, e.g. one belonging to another user."""
        with self._lock:
            repo = self._new_repo(repo_id, owner, private, {})
            if files:
                self._apply(repo, "main", None, "seed", "", {p: self._store(d) for p, d in files.items()}, ())
        return repo

    # -- request handling (called from the server threads) ---------------------------------------

    def handle(self, method: str, path: str, query: dict, token: str | None, body: bytes):
        """Answer one request: ``(route name or None, status, JSON payload, extra headers)``."""
        for route_method, name, pattern in _ROUTES:
            match = pattern.fullmatch(path)
            if match and route_method == method:
                break
        else:
            return None, 404, {"error": f"fakehub: {method} {path} is not implemented"}, {}
        try:
            with self._lock:
                return (name, *getattr(self, f"_route_{name}")(token, query, body, **match.groupdict()))
        except HubError as exc:
            if self.leak_token and token:
                exc.message += f" (token {token})"
            headers = {"X-Error-Code": exc.code, "X-Error-Message": exc.header_message}
            return name, exc.status, {"error": exc.message}, {k: v for k, v in headers.items() if v}

    def _user(self, token: str | None, *, required: bool = True) -> User | None:
        if token is None:
            if required:
                raise HubError(401, "Invalid username or password.")
            return None
        user = self.users.get(token)
        if user is None:
            message = "Invalid credentials in Authorization header"
            raise HubError(401, message, header_message=message)
        return user

    def _readable(self, repo_id: str, user: User | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not (user and user.can_write(repo.namespace))):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _writable(self, repo_id: str, user: User) -> Repo:
        repo = self._readable(repo_id, user)
        if not user.can_write(repo.namespace):
            raise HubError(403, f"You don't have write access to {repo_id} (owned by {repo.owner})")
        return repo

    def _route_create(self, token, query, body):
        user = self._user(token)
        payload = json.loads(body)
        namespace = payload.get("organization") or user.name
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "fakehub only hosts model repos")
        if not user.can_write(namespace):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo")
        visibility = payload.get("visibility", "public")
        self._new_repo(repo_id, namespace, visibility == "private", payload)
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def _route_repo_info(self, token, query, body, repo, rev=None):
        user = self._user(token, required=False)
        found = self._readable(repo, user)
        ref = unquote(rev) if rev else "main"
        if ref not in found.refs:
            raise HubError(404, f"Invalid rev id: {ref}", code="RevisionNotFound")
        sha = found.refs[ref]
        siblings = [{"rfilename": p} for p in sorted(found.commits[sha].tree)]
        return 200, {"id": repo, "private": found.private, "sha": sha, "siblings": siblings}, {}

    def _route_validate_yaml(self, token, query, body):
        self._user(token, required=False)
        content = json.loads(body)["content"]
        match = re.match(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(\r?\n|$)", content)
        errors = []
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            errors.append({"message": f"YAML is invalid: {exc}"})
        else:
            if not isinstance(meta, dict):
                errors.append({"message": "metadata must be a mapping"})
            else:
                for key in ("license", "pipeline_tag", "library_name"):
                    if key in meta and not isinstance(meta[key], str):
                        errors.append({"message": f'"{key}" must be a string'})
                if "tags" in meta and not all(isinstance(t, str) for t in meta["tags"] or []):
                    errors.append({"message": '"tags" must be a list of strings'})
        if errors:
            return 400, {"errors": errors, "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _route_preupload(self, token, query, body, repo, rev):
        found = self._writable(repo, self._user(token))
        ref = self._base_ref(found, unquote(rev))
        tree = found.commits[found.refs[ref]].tree
        files = []
        for entry in json.loads(body)["files"]:
            sha = tree.get(entry["path"])
            oid = _git_blob_oid((self.root / "blobs" / sha).read_bytes()) if sha else None
            files.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return 200, {"files": files, "commitOid": found.refs[ref]}, {}

    def _route_commit(self, token, query, body, repo, rev):
        found = self._writable(repo, self._user(token))
        ref = self._base_ref(found, unquote(rev))
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != found.refs[ref]:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        added, deleted = {}, []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"invalid path {path!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding for {path}")
                added[path] = self._store(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                deleted.append(path)
            else:  # lfsFile etc.: never asked for, since preupload answers "regular"
                raise HubError(400, f"fakehub does not accept {key!r} operations")
        create_pr = query.get("create_pr") == ["1"]
        target = f"refs/pr/{len(found.pull_requests()) + 1}" if create_pr else ref
        commit = self._apply(found, target, found.refs[ref], header.get("summary", ""),
                             header.get("description", ""), added, deleted)
        answer = {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.url}/{repo}/commit/{commit.oid}"}
        if create_pr:
            answer["pullRequestUrl"] = f"{self.url}/{repo}/discussions/{target.rsplit('/', 1)[1]}"
        return 200, answer, {}

    # -- storage --------------------------------------------------------------------------------

    def _new_repo(self, repo_id: str, owner: str, private: bool, payload: dict) -> Repo:
        repo = self.repos[repo_id] = Repo(repo_id, owner, private, created_with=payload)
        self._apply(repo, "main", None, "initial commit", "", {".gitattributes": self._store(INITIAL_GITATTRIBUTES)}, ())
        return repo

    def _base_ref(self, repo: Repo, ref: str) -> str:
        if ref not in repo.refs:
            raise HubError(404, f"Invalid rev id: {ref}", code="RevisionNotFound")
        return ref

    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / sha).write_bytes(data)
        return sha

    def _apply(self, repo, ref, parent, summary, description, added, deleted) -> Commit:
        tree = dict(repo.commits[parent].tree) if parent else {}
        for path in deleted:
            tree.pop(path, None)
        tree.update(added)
        oid = hashlib.sha1(json.dumps([parent, summary, sorted(tree.items())]).encode()).hexdigest()
        commit = repo.commits[oid] = Commit(oid, parent, summary, description, tree)
        repo.refs[ref] = oid
        return commit


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # the hub keeps its own log
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        body = self._read_body()
        try:
            route, status, payload, headers = self.hub.handle(method, url.path, query, token, body)
        except Exception as exc:  # a bug in the fake: make it loud on the client side
            route, status, payload, headers = "crash", 500, {"error": f"fakehub crashed: {exc!r}"}, {}
        with self.hub._lock:
            self.hub.log.append(LoggedRequest(method, url.path, query, status, token, route))
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", "fakehub")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


def make_converted_folder(
    path: str | Path,
    *,
    family: str | None = "cn",
    variant: str | None = "ofa-cn-base",
    checks: list[dict] | None = None,
    shards: int = 1,
    processor: bool = True,
) -> Path:
    """A small folder shaped like ``ofaconv convert --verify`` output: config, weights, report,
    processor and generation config (a few KiB, so everything stays on the "regular" upload path);
    the report's manifest lists every file."""
    import torch
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    vocab = {"cn": 30325, "en": 59457}.get(family, 1000)
    config = {"model_type": "ofa", "architectures": ["OFAForConditionalGeneration"], "vocab_size": vocab,
              "d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "resnet_type": "resnet18",
              "patch_image_size": 128, "auto_map": {"AutoConfig": "configuration_ofa.OFAConfig"}}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "generation_config.json").write_text(json.dumps({"num_beams": 5, "max_new_tokens": 16}))
    (root / "configuration_ofa.py").write_text("# remote code stand-in\n")
    if processor:
        (root / "processor_config.json").write_text(json.dumps({"processor_class": "OFAProcessor"}))
    gen = torch.Generator().manual_seed(0)
    if shards == 1:
        save_file({"model.embed": torch.randn(16, 8, generator=gen)}, str(root / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({f"layer{i}.weight": torch.randn(8, 8, generator=gen)}, str(root / name))
            weight_map[f"layer{i}.weight"] = name
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    if checks is None:
        checks = [
            {"name": "encoder_states", "passed": True, "metric": "max_abs_diff", "value": 0.0, "gate": 1e-5,
             "detail": "2 samples"},
            {"name": "logits", "passed": True, "metric": "max_abs_diff", "value": 2.4e-7, "gate": 1e-5,
             "detail": "teacher-forced, 7 steps"},
        ]
    report = {
        "schema": "ofaconv/report@1",
        "kind": "conversion",
        "ofaconv_version": "0.1.0",
        "source": {"file": "ofa_cn_base.pt", "sha256": "5f" * 32, "size": 123456789, "layout": "cfg"},
        "variant": variant,
        "family": family,
        "flags": {"disable_entangle": True, "patch_image_size": 128},
        "keymap": {"file": "ofa_fairseq.yaml", "sha256": "0d" * 32},
        "model_family": "ofa",
        "dtype": "float32",
        "files": manifest(root),
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
        "versions": {"torch": "2.14.1", "transformers": "5.23.0", "python": "3.11.7"},
    }
    (root / "conversion_report.json").write_text(json.dumps(report, indent=2))
    return root


def manifest(folder: str | Path) -> dict[str, dict]:
    """``{path: {"sha256", "size"}}`` of every file in ``folder`` but its report, as a conversion records it."""
    from ofaconv.core.report import REPORT_NAME, file_entry, folder_files

    root = Path(folder)
    return {name: file_entry(root / name) for name in folder_files(root) if name != REPORT_NAME}


def rehash(folder: str | Path) -> dict:
    """Record the folder's current files as its manifest (a test's stand-in for writing them with ofaconv)."""
    path = Path(folder) / "conversion_report.json"
    report = json.loads(path.read_text())
    report["files"] = manifest(folder)
    path.write_text(json.dumps(report, indent=2))
    return report
