"""Catalog-scale batch inference: one listing of the inputs, sharded over processes, decoded in
DataLoader workers, written in chunks that a rerun resumes, merged in input order.

The family-independent mechanism behind ``ofaconv caption`` and ``ofaconv clip embed``:

- **Inputs** (:class:`Inputs`): image files, directories, glob patterns, list files (one path per
  line) and MUGE-style base64 TSVs, in that order, each input one :class:`Entry` with a fixed index.
  An entry holds where the image is (a path, or a TSV's byte range), never its bytes, so a listing
  of millions of images is a stream. Optional ``texts`` (a file of one line per entry, or a list)
  pair the n-th text with the entry of index n (:attr:`Entry.text`), whatever rank processes it.
  The listing's fingerprint (every entry with its text, the sizes and modification times of list
  files and TSVs) identifies a run's inputs.
- **Processes** (:class:`Ranks`): under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) one
  process per device; the default group is ``cpu:gloo`` (``cpu:gloo,cuda:nccl`` on GPUs) and only
  Python objects travel (results to rank 0). Without a launcher, one process and no group.
- **Chunks**: entry ``i`` belongs to chunk ``i // chunk_size``. The chunks not yet done are dealt
  round-robin to the ranks; in each round every rank processes one and rank 0 writes them all, so
  rank 0 is the only writer (the output need not be on a shared file system).
- **Resumable state** (:class:`RunFolder`): ``.OUT.ofaconv-run/`` beside the output holds
  ``run.json`` (the inputs' fingerprint, the model's, the settings that decide the output) and one
  committed file set per finished chunk (payload first, then its ``.json`` meta, each written to a
  temp name and renamed). A rerun of the same command skips the committed chunks; one with other
  inputs, model or settings is refused (``--restart`` discards the unfinished run). The output
  appears, whole, only when every chunk is done; then the run folder is removed. One run at a time
  per output: ``.OUT.ofaconv.lock`` (the lock every ofaconv output uses), held by rank 0.
- **Sinks**: :class:`RecordSink` (JSONL, one record per input: a file, stdout or a list) and
  :class:`ArraySink` (vectors: a folder of ``.npy`` or safetensors shards + ``ids.jsonl`` +
  ``failed.jsonl`` + ``embeddings.json``, or in memory). Neither holds more than a chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from .batch import Tally, failure_summary
from .errors import DataError, OfaconvError
from .images import ImageDecodeError, decode_base64, expand_images, open_image, tsv_rows
from .writer import atomic_file, atomic_path, place_folder, write_atomic

__all__ = ["add_input_arguments", "add_run_arguments", "check_run_arguments", "check_jsonl_output", "Entry", "Inputs", "Ranks", "RunFolder", "RecordSink", "ArraySink", "CatalogTally", "Records", "run_catalog",
           "auto_workers", "torch_device", "model_fingerprint", "check_embeddings_out", "RUN_SCHEMA", "EMBEDDINGS_SCHEMA", "read_embeddings_manifest", "iter_embedding_shards"]

RUN_SCHEMA = "ofaconv/catalog-run@1"
EMBEDDINGS_SCHEMA = "ofaconv/clip-embeddings@1"
EMBEDDINGS_MANIFEST = "embeddings.json"
RUN_SUFFIX = "ofaconv-run"
_LINE_LIMIT = 1 << 20  # a list-file line longer than this is not a path
_CHUNK = re.compile(r"chunk-(\d{8})\.(json|jsonl|npy|safetensors)")
# Test hook: SIGKILL this process while it writes the chunk after this many commits of the run.
KILL_AFTER_ENV = "OFACONV_CATALOG_KILL_AFTER"
# Benchmark hook: rank 0 writes {"images", "seconds", "world_size"} of the processing loop here
# (from rank 0's first decoded batch, whose images are not counted, to the last chunk written).
STATS_ENV = "OFACONV_CATALOG_STATS"


# ---------------------------------------------------------------------------------------------
# Command-line flags: the same names and meanings for every catalog command
# ---------------------------------------------------------------------------------------------


def add_input_arguments(p, tsv_help: str = "MUGE-style TSV of image_id<TAB>base64 lines (repeatable)") -> None:
    """IMAGES..., --list and --tsv."""
    p.add_argument("images", nargs="*", help="image files, directories or glob patterns")
    p.add_argument("--list", action="append", default=[], metavar="FILE",
                   help="file of image paths, directories or globs, one per line (repeatable)")
    p.add_argument("--tsv", action="append", default=[], metavar="FILE", help=tsv_help)


def add_run_arguments(p, *, batch: tuple[int, int], chunk_size: int, batch_help: str = "images per model call",
                      chunk_help: str = "images per resumable chunk") -> None:
    """--batch-size, --workers, --chunk-size, --restart, --device and --no-progress (``batch``: the
    CPU and GPU defaults of --batch-size)."""
    p.add_argument("--batch-size", type=int,
                   help=f"{batch_help} (default {batch[0]} on a CPU, {batch[1]} on a GPU; halved on an "
                        "out-of-memory error)")
    p.add_argument("--workers", type=int,
                   help="image-decoding processes per model process (default: the free CPUs, at most 8; 0 decodes "
                        "in the model's process)")
    p.add_argument("--chunk-size", type=int, default=chunk_size, help=f"{chunk_help} (default {chunk_size})")
    p.add_argument("--restart", action="store_true",
                   help="discard an unfinished run recorded beside --out instead of resuming it")
    p.add_argument("--device", default="cpu",
                   help="torch device (default cpu; cuda under torchrun: each process its own GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def check_run_arguments(*, device: str, batch_size: Optional[int], chunk_size: int, workers: Optional[int],
                        batch: tuple[int, int]) -> int:
    """The flags of :func:`add_run_arguments`, checked before anything loads; returns the batch size
    (``batch``: its CPU and GPU defaults)."""
    kind = torch_device(device).type
    batch_size = batch_size if batch_size is not None else (batch[0] if kind == "cpu" else batch[1])
    for flag, value, low in (("--batch-size", batch_size, 1), ("--chunk-size", chunk_size, 1),
                             ("--workers", workers, 0)):
        if value is not None and value < low:
            raise OfaconvError(f"{flag} must be at least {low}, got {value}")
    return batch_size


def check_jsonl_output(out: str, inputs: Sequence[str], folder, *, command: str,
                       ours: Callable[[dict], bool]) -> Optional[Path]:
    """``--out`` of a JSONL command as a path ofaconv may write (None: stdout), checked before anything
    is loaded: not a link or a folder, not inside the model folder, not an input, and, if it exists,
    an earlier output of ``command`` (its first line a record for which ``ours`` holds)."""
    if out == "-":
        return None
    path = Path(out)
    if not path.parent.is_dir():
        raise OfaconvError("the output's folder does not exist; create it first", path=path.parent)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OfaconvError("exists and is not a regular file; give a new file name (or '-' for stdout)", path=path)
    real, model = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if real == model or model in real.parents:
        raise OfaconvError("lies inside the model folder (its manifest lists every file); write it elsewhere",
                           path=path)
    for name in inputs:
        if name and os.path.exists(name) and os.path.realpath(name) == str(real):
            raise OfaconvError("is also an input; choose another --out", path=path)
    if path.exists() and not _earlier_output(path, ours):
        raise OfaconvError(f"exists and is not an earlier `ofaconv {command}` output; move it away or choose "
                           "another --out", path=path)
    return path


def _earlier_output(path: Path, ours: Callable[[dict], bool]) -> bool:
    with open(path, "rb") as handle:
        first = handle.readline(_LINE_LIMIT)
    if not first.strip():
        return True
    try:
        record = json.loads(first)
    except (ValueError, RecursionError):
        return False
    return isinstance(record, dict) and ours(record)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One input: ``name`` (the record's "image"), and an image ``path``, a TSV row (``tsv``,
    byte range of its base64, line number) or the ``error`` that it has none; ``text``: the text
    paired with it (``Inputs(texts=...)``), else None."""

    index: int
    name: str
    path: Optional[str] = None
    tsv: Optional[str] = None
    start: int = 0
    length: int = 0
    lineno: int = 0
    error: Optional[str] = None
    text: Optional[str] = None

    def key(self) -> str:
        paired = "" if self.text is None else f"\0{self.text}"
        return f"{self.name}\0{self.path}\0{self.tsv}\0{self.start}\0{self.length}\0{self.error}{paired}\n"

    def open(self, handles: Optional[dict] = None):
        """The RGB image; ``ImageDecodeError`` with the reason it cannot be read."""
        if self.error is not None:
            raise ImageDecodeError(self.error, path=self.name)
        if self.tsv is None:
            return open_image(self.path, self.name)
        handles = {} if handles is None else handles
        handle = handles.get(self.tsv)
        if handle is None:
            handle = handles[self.tsv] = open(self.tsv, "rb")
        handle.seek(self.start)
        try:
            data = decode_base64(handle.read(self.length))
        except ValueError as exc:  # binascii.Error is a ValueError
            raise ImageDecodeError(f"{self.tsv}:{self.lineno}: invalid base64 ({exc})", path=self.name) from None
        return open_image(data, self.name)


class Inputs:
    """The inputs of a catalog run: ``images`` (files, directories, globs), ``lists`` (files of one
    path, directory or glob per line, relative to the current directory) and ``tsvs``; ``texts``
    (None, a UTF-8 file of one non-empty line per entry, or a sequence of strings) gives each entry,
    in listing order, its :attr:`Entry.text`."""

    def __init__(self, images: Sequence[str] = (), lists: Sequence[str] = (), tsvs: Sequence[str] = (),
                 texts=None):
        self.images = [os.fspath(p) for p in images]
        self.lists = [os.fspath(p) for p in lists]
        self.tsvs = [os.fspath(p) for p in tsvs]
        self.texts_file = os.fspath(texts) if isinstance(texts, (str, os.PathLike)) else None
        self.texts = None if texts is None or self.texts_file is not None else [str(t) for t in texts]

    def __bool__(self) -> bool:
        return bool(self.images or self.lists or self.tsvs)

    def paths(self) -> list[str]:
        return [*self.images, *self.lists, *self.tsvs, *([self.texts_file] if self.texts_file else [])]

    def check(self) -> None:
        """Refuse missing list files, TSVs and texts files before anything is loaded."""
        for what, files in (("list", self.lists), ("TSV", self.tsvs), ("texts", [self.texts_file] if self.texts_file
                                                                        else [])):
            for name in files:
                if not os.path.isfile(name):
                    raise OfaconvError(f"no such {what} file", path=name)

    def entries(self) -> Iterator[Entry]:
        listing = self._listing()
        if self.texts_file is None and self.texts is None:
            yield from listing
            return
        texts = _text_lines(self.texts_file) if self.texts_file is not None else iter(self.texts)
        count = 0
        for entry in listing:
            text = next(texts, None)
            if text is None:
                raise self._unpaired(count, count + 1 + sum(1 for _ in listing))
            if not text.strip() and self.texts_file is None:
                raise DataError(f"text {count + 1} is empty; give one non-empty text per image")
            yield dataclasses.replace(entry, text=text)
            count += 1
        rest = sum(1 for _ in texts)
        if rest:
            raise self._unpaired(count + rest, count)

    def _unpaired(self, texts: int, entries: int) -> DataError:
        if self.texts_file is not None:
            return DataError(f"holds {texts} texts for {entries} images; give one line per image", path=self.texts_file)
        return DataError(f"got {texts} texts for {entries} images; give one text per image")

    def _listing(self) -> Iterator[Entry]:
        index = 0
        for item in expand_images(self.images):
            yield Entry(index, item.name, path=item.path, error=item.error)
            index += 1
        for listing in self.lists:
            for lineno, line in _list_lines(listing):
                for item in expand_images([line]):
                    error = None if item.error is None else f"{listing}:{lineno}: {item.error}"
                    yield Entry(index, item.name, path=item.path, error=error)
                    index += 1
        for tsv in self.tsvs:
            for row in tsv_rows(tsv):
                if row.ok:
                    yield Entry(index, row.image_id, tsv=tsv, start=row.start, length=row.length, lineno=row.lineno)
                else:
                    yield Entry(index, f"{tsv}:{row.lineno}",
                                error="malformed TSV line (expected image_id<TAB>base64)")
                index += 1

    def scan(self) -> tuple[int, str]:
        """(number of entries, fingerprint of the listing)."""
        digest = hashlib.sha256()
        for container in (*self.lists, *self.tsvs):
            st = os.stat(container)
            digest.update(f"{container}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        count = 0
        for entry in self.entries():
            digest.update(entry.key().encode("utf-8", "surrogateescape"))
            count += 1
        return count, digest.hexdigest()


def _text_lines(path: str) -> Iterator[str]:
    """The lines of a texts file, one text per entry: a blank line is refused (skipping it would
    pair every later text with the wrong image)."""
    for lineno, line in _list_lines(path, what="texts file", strip=False):
        if not line.strip():
            raise DataError("empty text; give one non-empty text per line", path=f"{path}:{lineno}")
        yield line


def _list_lines(path: str, what: str = "list file", strip: bool = True) -> Iterator[tuple[int, str]]:
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {what} ({exc.strerror or exc})", path=path) from None
    with handle:
        lineno = 0
        while True:
            raw = handle.readline(_LINE_LIMIT + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > _LINE_LIMIT:
                raise DataError(f"line longer than 1 MiB; a {what} holds one "
                                f"{'image path' if strip else 'text'} per line", path=f"{path}:{lineno}")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"not UTF-8; save the {what.split()[0]} as UTF-8", path=f"{path}:{lineno}") from None
            line = line.strip() if strip else line.rstrip("\r\n")
            if line or not strip:
                yield lineno, line


def torch_device(name: str):
    """``--device`` as a torch device that exists on this machine, else a one-line error."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise OfaconvError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise OfaconvError(f"--device {name}: no {device.type} device is available on this machine; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise OfaconvError(f"--device {name}: this machine has {count} {device.type} device(s), "
                           f"numbered from 0 to {count - 1}")
    return device



def auto_workers(world: int = 1) -> int:
    """Decoding processes per rank: the CPUs this process may use, shared by the ranks of this
    machine, one left for the model's own process; at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    return max(0, min(8, cpus // local - 1))


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


class Ranks:
    """This process's place among the launcher's (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._owned = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> str:
        """``--device cuda`` is this rank's GPU (``cuda:LOCAL_RANK``) when several processes run."""
        return f"{name}:{self.local_rank}" if self.world > 1 and name in ("cuda", "xpu", "npu") else name

    def start(self, device: str) -> None:
        if self.world <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
            if device.startswith("cuda"):
                import torch

                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
            self._owned = True

    def close(self) -> None:
        if self._owned:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self._owned = False

    def gather(self, obj) -> Optional[list]:
        if self.world <= 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        if self.world <= 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        if self.world <= 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, fn: Callable, *, main_only: bool = False):
        """Run ``fn`` (on rank 0 only with ``main_only``); an ``OfaconvError`` on any rank is raised
        on every rank. Returns rank 0's result with ``main_only``, else this rank's."""
        result, failure = None, None
        if self.main or not main_only:
            try:
                result = fn()
            except OfaconvError as exc:
                if self.world <= 1:
                    raise
                failure = (type(exc), str(exc), exc.exit_code)
        if self.world > 1:
            failures = [f for f in self.all_gather(failure) if f is not None]
            if failures:
                kind, message, code = failures[0]
                error = OfaconvError(message)
                error.exit_code = code
                raise error
            if main_only:
                result = self.broadcast(result)
        return result


# ---------------------------------------------------------------------------------------------
# The run folder: what a rerun resumes
# ---------------------------------------------------------------------------------------------


def run_folder_path(out: Path) -> Path:
    return out.parent / f".{out.name}.{RUN_SUFFIX}"


class RunFolder:
    """``.OUT.ofaconv-run/`` and the output's lock, on rank 0. See the module docstring."""

    def __init__(self, out, identity: dict, *, restart: bool = False):
        self.out = Path(os.path.abspath(out))
        self.path = run_folder_path(self.out)
        self.identity = identity
        self.restart = restart
        self.fresh = False
        self.committed = 0
        self._lock_fd = None

    # -- opening ------------------------------------------------------------------------------
    def open(self) -> set[int]:
        """Lock the output, create or resume the run; the chunks already committed."""
        from .writer import _lock, _lock_path

        try:  # an output folder that cannot be written is an OS error naming OUT, as a failed write is
            os.close(os.open(_lock_path(self.out), os.O_RDWR | os.O_CREAT, 0o666))
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.out)) from None
        self._lock_fd = _lock(self.out)
        try:
            return self._open()
        except BaseException:
            self.release()
            raise

    def _open(self) -> set[int]:
        path = self.path
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise OfaconvError("is not an unfinished ofaconv run (not a folder); move it away", path=path)
        if path.exists():
            recorded = self._recorded()
            if self.restart:
                self._discard()
            else:
                differs = [k for k in ("command", "inputs", "model", "settings")
                           if recorded.get(k) != self.identity.get(k)]
                if differs:
                    what = " and ".join({"command": "another command", "inputs": "other inputs",
                                         "model": "another model", "settings": "other settings"}[k] for k in differs)
                    changed = _changed_settings(recorded.get("settings"), self.identity.get("settings"))
                    raise OfaconvError(f"an unfinished run with {what}{changed} was interrupted here; rerun it as it "
                                       "was, or pass --restart to discard it, or choose a new --out", path=path)
                return self._done()
        self.path.mkdir()
        self.fresh = True
        write_atomic(self.path / "run.json", json.dumps({"schema": RUN_SCHEMA, **self.identity}, indent=1,
                                                          ensure_ascii=False).encode())
        return set()

    def _recorded(self) -> dict:
        try:
            recorded = json.loads((self.path / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            recorded = None
        if not isinstance(recorded, dict) or recorded.get("schema") != RUN_SCHEMA:
            raise OfaconvError("is not an unfinished ofaconv run (no readable run.json); move it away or choose "
                               "another --out", path=self.path)
        return recorded

    def _foreign(self) -> Optional[str]:
        for entry in os.scandir(self.path):
            name = entry.name
            ours = name == "run.json" or _CHUNK.fullmatch(name) or (name.startswith(".") and name.endswith(".tmp"))
            if not ours or entry.is_symlink() or not entry.is_file():
                return name
        return None

    def _discard(self) -> None:
        foreign = self._foreign()
        if foreign is not None:
            raise OfaconvError(f"holds {foreign}, which an ofaconv run does not write; move it away", path=self.path)
        shutil.rmtree(self.path)

    def _done(self) -> set[int]:
        done = set()
        foreign = self._foreign()
        if foreign is not None:
            raise OfaconvError(f"holds {foreign}, which an ofaconv run does not write; move it away", path=self.path)
        for entry in os.scandir(self.path):
            if entry.name.startswith("."):  # a chunk a killed run was writing
                os.unlink(entry.path)
                continue
            match = _CHUNK.fullmatch(entry.name)
            if match and match.group(2) == "json":
                done.add(int(match.group(1)))
        return done

    # -- chunks -------------------------------------------------------------------------------
    def chunk(self, index: int, suffix: str) -> Path:
        return self.path / f"chunk-{index:08d}.{suffix}"

    def meta(self, index: int) -> dict:
        try:
            return json.loads(self.chunk(index, "json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OfaconvError(f"unreadable chunk record ({exc}); pass --restart to start over",
                               path=self.chunk(index, "json")) from None

    def commit_meta(self, index: int, meta: dict) -> None:
        write_atomic(self.chunk(index, "json"), json.dumps(meta, ensure_ascii=False).encode())
        self.committed += 1

    # -- closing ------------------------------------------------------------------------------
    def finish(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def abandon(self) -> None:
        """A run that stops early keeps what it committed; a fresh one that committed nothing leaves nothing."""
        if self.fresh and self.committed == 0:
            shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            from .writer import _unlock

            fd, self._lock_fd = self._lock_fd, None
            _unlock(self.out, fd)


def _changed_settings(recorded, now) -> str:
    if not isinstance(recorded, dict) or not isinstance(now, dict):
        return ""
    keys = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    return f" ({', '.join(f'{k}: {recorded.get(k)!r} then, {now.get(k)!r} now' for k in keys)})" if keys else ""


def _kill_hook(committed: int) -> bool:
    limit = os.environ.get(KILL_AFTER_ENV)
    return limit is not None and committed >= int(limit)


# ---------------------------------------------------------------------------------------------
# Sinks
# ---------------------------------------------------------------------------------------------


class CatalogTally(Tally):
    FIELDS = ("images", "failed")


class RecordSink:
    """One JSON record per input, in input order. ``out``: a file (resumable, renamed into place
    when complete), ``"-"`` (stdout, streamed, not resumable) or None (kept in :attr:`records`).
    ``record(entry, result, error)`` makes the record; error records have an ``"error"`` key."""

    payload = "jsonl"

    def __init__(self, out, record: Callable):
        self.out = None if out in (None, "-") else Path(os.path.abspath(out))
        self.stdout = out == "-"
        self.record = record
        self.records: list[dict] = []

    @property
    def resumable(self) -> bool:
        return self.out is not None

    def pack(self, rows) -> dict:
        lines, failed = [], []
        for entry, result, error in rows:
            record = self.record(entry, result, error)
            if error is not None:
                failed.append([entry.name, error])
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        return {"text": "".join(lines), "items": len(rows), "failed": failed}

    def stream(self, rows) -> None:
        """Rows as soon as they are ready (one process, no file)."""
        for entry, result, error in rows:
            record = self.record(entry, result, error)
            if self.stdout:
                _stdout_write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                self.records.append(record)

    def commit(self, run: RunFolder, index: int, packed: dict, kill: bool = False) -> dict:
        data = packed["text"].encode("utf-8")
        with atomic_file(run.chunk(index, "jsonl")) as handle:
            if kill:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            handle.write(data)
        return _meta(packed)

    def emit(self, packed: dict) -> None:
        """A chunk gathered from the ranks, in order, when there is no run folder."""
        if self.stdout:
            _stdout_write(packed["text"])
        else:
            self.records.extend(json.loads(line) for line in packed["text"].splitlines())

    def finish(self, run: RunFolder, chunks: int) -> None:
        """Concatenate the chunks, in order, into a hidden sibling of OUT and rename it over OUT."""
        with atomic_file(self.out) as target:
            for index in range(chunks):
                with open(run.chunk(index, "jsonl"), "rb") as source:
                    shutil.copyfileobj(source, target, 1 << 20)


def _stdout_write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        # Python flushes stdout again at exit; what could not be written now cannot be then either.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OSError(exc.errno, exc.strerror, "<stdout>") from None


def _meta(packed: dict) -> dict:
    failed = packed["failed"]
    return {"items": packed["items"], "failed": failed, "rows": packed.get("rows", packed["items"])}


class ArraySink:
    """One vector per readable input: ``out`` a folder (resumable; ``embeddings-NNNNNNNN.npy`` or
    ``.safetensors`` shards, one per chunk, ``ids.jsonl`` aligned with their rows, ``failed.jsonl``,
    and the manifest ``embeddings.json``), or None (kept in memory: :attr:`ids`, :attr:`vectors`)."""

    def __init__(self, out, *, fmt: str = "npy", manifest: Optional[dict] = None):
        if fmt not in ("npy", "safetensors"):
            raise OfaconvError(f"unknown embedding format {fmt!r}; choose npy or safetensors")
        self.out = None if out is None else Path(os.path.abspath(out))
        self.fmt = fmt
        self.manifest = dict(manifest or {})
        self.ids: list[str] = []
        self.failed: list[list[str]] = []
        self._vectors: list = []

    payload = property(lambda self: self.fmt)
    resumable = property(lambda self: self.out is not None)

    @property
    def vectors(self):
        import numpy as np

        return np.concatenate(self._vectors) if self._vectors else np.zeros((0, 0), dtype=np.float32)

    def pack(self, rows) -> dict:
        import numpy as np

        ids, vectors, failed = [], [], []
        for entry, result, error in rows:
            if error is not None:
                failed.append([entry.name, error])
            else:
                ids.append(entry.name)
                vectors.append(np.asarray(result, dtype=np.float32))
        matrix = np.stack(vectors) if vectors else None
        return {"ids": ids, "vectors": matrix, "items": len(rows), "failed": failed, "rows": len(ids)}

    def stream(self, rows) -> None:
        self.emit(self.pack(rows))

    def emit(self, packed: dict) -> None:
        self.ids.extend(packed["ids"])
        self.failed.extend(packed["failed"])
        if packed["vectors"] is not None:
            self._vectors.append(packed["vectors"])

    def commit(self, run: RunFolder, index: int, packed: dict, kill: bool = False) -> dict:
        if packed["vectors"] is not None or kill:
            with atomic_path(run.chunk(index, self.fmt)) as tmp:
                if kill:
                    tmp.write_bytes(b"\x93NUMPY partial")
                    os.kill(os.getpid(), signal.SIGKILL)
                _save_vectors(tmp, packed["vectors"], self.fmt)
        meta = _meta(packed)
        meta["ids"] = packed["ids"]
        meta["dim"] = None if packed["vectors"] is None else int(packed["vectors"].shape[1])
        return meta

    def finish(self, run: RunFolder, chunks: int) -> dict:
        """The output folder, built in a hidden sibling and renamed into place (replacing an earlier
        embeddings folder only); chunk payloads are moved, never copied."""
        from .writer import _sibling, remove_stale_siblings

        remove_stale_siblings(self.out)
        tmp = _sibling(self.out, "tmp")
        tmp.mkdir()
        try:
            shards, count, failed, dim = [], 0, 0, None
            with open(tmp / "ids.jsonl", "w", encoding="utf-8") as ids, \
                    open(tmp / "failed.jsonl", "w", encoding="utf-8") as bad:
                for index in range(chunks):
                    meta = run.meta(index)
                    for name in meta["ids"]:
                        ids.write(json.dumps(name, ensure_ascii=False) + "\n")
                    for name, reason in meta["failed"]:
                        bad.write(json.dumps({"image": name, "error": reason}, ensure_ascii=False) + "\n")
                    failed += len(meta["failed"])
                    if meta["rows"]:
                        name = f"embeddings-{index:08d}.{self.fmt}"
                        os.rename(run.chunk(index, self.fmt), tmp / name)
                        shards.append({"file": name, "rows": meta["rows"]})
                        count += meta["rows"]
                        dim = meta["dim"]
            manifest = {"schema": EMBEDDINGS_SCHEMA, **self.manifest, "format": self.fmt, "dim": dim,
                        "dtype": "float32", "normalized": True, "count": count, "failed": failed,
                        "inputs": sum(run.meta(i)["items"] for i in range(chunks)) if chunks else 0,
                        "ids": "ids.jsonl", "failures": "failed.jsonl", "shards": shards}
            (tmp / EMBEDDINGS_MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
            check_embeddings_out(self.out, [])  # under the lock: OUT as it is now
            place_folder(tmp, self.out)
        except BaseException:
            # The shards go back, so a failed placement can be retried by a rerun.
            for shard in tmp.glob(f"embeddings-*.{self.fmt}"):
                index = int(shard.name.split("-")[1].split(".")[0])
                with contextlib.suppress(OSError):
                    os.rename(shard, run.chunk(index, self.fmt))
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest


def _save_vectors(path: Path, matrix, fmt: str) -> None:
    import numpy as np

    if fmt == "npy":
        with open(path, "wb") as handle:
            np.save(handle, matrix, allow_pickle=False)
    else:
        from safetensors.numpy import save

        path.write_bytes(save({"embeddings": np.ascontiguousarray(matrix)}, metadata={"schema": EMBEDDINGS_SCHEMA}))


def read_embeddings_manifest(folder) -> dict:
    """The manifest of an embeddings folder ``ofaconv clip embed`` wrote; one-line errors otherwise."""
    folder = Path(folder)
    path = folder / EMBEDDINGS_MANIFEST
    if not folder.is_dir():
        raise OfaconvError("no such embeddings folder" if not folder.exists() else "not a folder; give the --out "
                           "folder of `ofaconv clip embed`", path=folder)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OfaconvError("not an embeddings folder (no embeddings.json); write one with `ofaconv clip embed`",
                           path=folder) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise OfaconvError(f"unreadable ({type(exc).__name__}); write the folder again with `ofaconv clip embed`",
                           path=path) from None
    if not isinstance(manifest, dict) or manifest.get("schema") != EMBEDDINGS_SCHEMA \
            or not isinstance(manifest.get("shards"), list):
        raise OfaconvError("not an embeddings manifest ofaconv wrote", path=path)
    return manifest


def iter_embedding_shards(folder, manifest: Optional[dict] = None):
    """(shard file, float32 matrix) of an embeddings folder, one shard at a time (memory-mapped npy)."""
    import numpy as np

    folder = Path(folder)
    manifest = manifest or read_embeddings_manifest(folder)
    for shard in manifest["shards"]:
        name = shard.get("file") if isinstance(shard, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise OfaconvError("a shard entry is not a file name", path=folder / EMBEDDINGS_MANIFEST)
        path = folder / name
        try:
            if manifest.get("format") == "safetensors":
                from safetensors.numpy import load_file

                matrix = load_file(str(path))["embeddings"]
            else:
                matrix = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, KeyError) as exc:
            raise OfaconvError(f"unreadable embeddings shard ({type(exc).__name__}: {exc}); write the folder "
                               "again", path=path) from None
        if matrix.ndim != 2 or matrix.shape[0] != shard.get("rows") or matrix.dtype != np.float32:
            raise OfaconvError(f"shard is {matrix.shape} {matrix.dtype}, the manifest says {shard.get('rows')} "
                               "float32 rows", path=path)
        yield path, matrix


def check_embeddings_out(out: Path, inputs: Iterable[str]) -> None:
    """``--out`` of ``clip embed``: absent, an empty folder or an earlier embeddings folder (which
    it replaces); never a file, a link, an input or a folder ofaconv did not write."""
    out = Path(os.path.abspath(out))
    if not out.parent.is_dir():
        raise OfaconvError("the output's folder does not exist; create it first", path=out.parent)
    real = os.path.realpath(out)
    for name in inputs:
        if os.path.exists(name) and (os.path.realpath(name) == real or real in Path(os.path.realpath(name)).parents
                                     or Path(os.path.realpath(name)) in Path(real).parents):
            raise OfaconvError(f"is or holds an input ({name}); choose another --out", path=out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OfaconvError("exists and is not a folder; give a new folder name", path=out)
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        manifest = read_embeddings_manifest(out)
    except OfaconvError:
        manifest = None
    known = {"ids.jsonl", "failed.jsonl", EMBEDDINGS_MANIFEST}
    if manifest is not None:
        known |= {s.get("file") for s in manifest["shards"] if isinstance(s, dict)}
    foreign = [] if manifest is not None else [EMBEDDINGS_MANIFEST]
    foreign += sorted(e.name for e in os.scandir(out) if e.name not in known or e.is_symlink() or not e.is_file())
    if foreign:
        raise OfaconvError(f"exists and is not an earlier `ofaconv clip embed` output ({foreign[0]}); move it away "
                           "or choose another --out", path=out)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class _Decode:
    """The DataLoader's dataset: an entry in, (entry, pixels or None, error or None) out."""

    def __init__(self, preprocess: Callable, with_entry: bool = False):
        self.preprocess = preprocess
        self.with_entry = with_entry
        self.handles: dict = {}
        self.pid = None

    def __getitem__(self, entry: Entry):
        if self.pid != os.getpid():  # each worker opens TSVs itself
            self.handles, self.pid = {}, os.getpid()
        try:
            image = entry.open(self.handles)
            return entry, self.preprocess(image, entry) if self.with_entry else self.preprocess(image), None
        except ImageDecodeError as exc:
            return entry, None, exc.reason

    def __getitems__(self, entries: list) -> list:
        return [self[e] for e in entries]

    def __getstate__(self):
        return {**self.__dict__, "handles": {}, "pid": None}


def _as_list(batch):
    return batch


class _Batches:
    """The DataLoader's batch sampler: this rank's chunks, in order, in batches that never cross a
    chunk; the entries come from one pass over the listing."""

    def __init__(self, inputs: Inputs, chunks: list[int], chunk_size: int, batch_size: int):
        self.inputs, self.chunks, self.chunk_size, self.batch_size = inputs, chunks, chunk_size, batch_size

    def __iter__(self):
        wanted = iter(self.chunks)
        current = next(wanted, None)
        batch: list[Entry] = []
        for entry in self.inputs.entries():
            if current is None:
                break
            chunk = entry.index // self.chunk_size
            while current is not None and chunk > current:
                if batch:
                    yield batch
                    batch = []
                current = next(wanted, None)
            if current is not None and chunk == current:
                batch.append(entry)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch


def _chunk_sizes(count: int, chunk_size: int) -> list[int]:
    return [min(chunk_size, count - start) for start in range(0, count, chunk_size)]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def run_catalog(inputs: Inputs, sink, *, identity: dict, load: Callable, chunk_size: int, batch_size: int,
                workers: Optional[int] = None, device: str = "cpu", restart: bool = False, progress: bool = False,
                desc: str = "images", ranks: Optional[Ranks] = None, with_entry: bool = False) -> dict:
    """Process every input once, in chunks, on every rank; write through ``sink`` on rank 0.

    ``load(device) -> (preprocess, infer)``: ``preprocess(PIL image) -> tensor`` runs in the
    DataLoader's workers (``preprocess(image, entry)`` with ``with_entry``, for inputs that depend
    on the entry's :attr:`Entry.text`), ``infer(list of tensors) -> list of results`` in this
    process; on an out-of-memory error ``infer`` is retried on halves of the batch. ``identity`` (command, model,
    settings) joins the inputs' fingerprint in ``run.json``. Returns (on every rank) ``{"images",
    "failed", "first_failure", "world_size"}``; ``first_failure`` is ``[name, reason]`` or None.
    """
    if chunk_size < 1 or batch_size < 1:
        raise OfaconvError("--chunk-size and --batch-size must be at least 1")
    ranks = ranks or Ranks()
    device = ranks.device(device)
    ranks.start(device)
    try:
        return _run(inputs, sink, identity, load, chunk_size, batch_size, workers, device, restart, progress, desc,
                    ranks, with_entry)
    finally:
        ranks.close()


def _run(inputs, sink, identity, load, chunk_size, batch_size, workers, device, restart, progress, desc, ranks,
         with_entry=False):
    import torch

    count, fingerprint = ranks.agree(inputs.scan)
    if len(set(ranks.all_gather(fingerprint))) > 1:
        raise OfaconvError("the processes see different inputs; give every machine the same files")
    identity = {**identity, "inputs": {"count": count, "sha256": fingerprint},
                "settings": {**identity.get("settings", {}), "chunk_size": chunk_size}}
    sizes = _chunk_sizes(count, chunk_size)
    run = RunFolder(sink.out, identity, restart=restart) if sink.resumable and ranks.main else None
    try:
        done = set(ranks.agree((lambda: sorted(run.open())) if run is not None else list, main_only=True))
        todo = [c for c in range(len(sizes)) if c not in done]
        preprocess, infer = ranks.agree(lambda: load(device))
        bar = None
        if progress and ranks.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=count, initial=sum(sizes[c] for c in done), unit="img", desc=desc, file=sys.stderr,
                       dynamic_ncols=True)
        workers = auto_workers(ranks.world) if workers is None else workers
        loader = torch.utils.data.DataLoader(
            _Decode(preprocess, with_entry), batch_sampler=_Batches(inputs, todo[ranks.rank::ranks.world], chunk_size, batch_size),
            num_workers=workers, collate_fn=_as_list, pin_memory=device.startswith("cuda"),
            prefetch_factor=4 if workers else None)
        stream = ranks.world == 1 and not sink.resumable
        tally, first = CatalogTally(images=count), None
        step = [batch_size]
        clock = {"start": None, "skipped": 0}  # the processing rate, from the first batch decoded on
        try:
            source = iter(loader)
            for r in range(-(-len(todo) // ranks.world)):
                slot = r * ranks.world + ranks.rank
                index = todo[slot] if slot < len(todo) else None
                rows: list = []
                while index is not None and len(rows) < sizes[index]:
                    decoded = next(source)
                    if clock["start"] is None:
                        clock["start"], clock["skipped"] = time.perf_counter(), len(decoded)
                    batch = _infer_batch(decoded, infer, step)
                    rows.extend(batch)
                    if stream:
                        sink.stream(batch)
                    if bar is not None:
                        bar.update(len(batch))
                packed = None if index is None or stream else sink.pack(rows)
                failed = [[e.name, error] for e, _, error in rows if error is not None]
                gathered = ranks.gather((index, packed, len(rows), failed))
                if not ranks.main:
                    continue
                for other, (chunk, payload, n, bad) in enumerate(gathered):
                    if chunk is None:
                        continue
                    if bar is not None and other != 0:
                        bar.update(n)
                    if run is not None:
                        run.commit_meta(chunk, sink.commit(run, chunk, payload, kill=_kill_hook(run.committed)))
                        continue
                    if payload is not None:
                        sink.emit(payload)
                    for name, reason in bad:
                        first = first or [name, reason]
                        tally.bad("failed", name)
            elapsed = time.perf_counter() - clock["start"] if clock["start"] is not None else 0.0
        finally:
            if bar is not None:
                bar.close()
        result = None
        if ranks.main:
            if os.environ.get(STATS_ENV):
                Path(os.environ[STATS_ENV]).write_text(json.dumps(  # rank 0's first batch is not in the rate
                    {"images": sum(sizes[c] for c in todo) - clock["skipped"], "seconds": elapsed,
                     "world_size": ranks.world}))
            if run is not None:
                tally, first = CatalogTally(images=count), None
                for index in range(len(sizes)):
                    for name, reason in run.meta(index)["failed"]:
                        first = first or [name, reason]
                        tally.bad("failed", name)
                sink.finish(run, len(sizes))
                run.finish()
                run = None
            result = {"images": count, "failed": tally.failed, "first_failure": first, "examples": tally.examples,
                      "world_size": ranks.world}
        return ranks.broadcast(result)
    except BaseException:
        if run is not None:
            run.abandon()
        raise


def _infer_batch(batch, infer, step: list) -> list:
    """(entry, result or None, error or None) per entry; ``step[0]``: the largest sub-batch that
    fits (halved on an out-of-memory error, kept for the batches after)."""
    good = [(i, pixels) for i, (_, pixels, error) in enumerate(batch) if error is None]
    results: list = [None] * len(batch)
    start = 0
    while start < len(good):
        part = good[start:start + step[0]]
        try:
            out = infer([pixels for _, pixels in part])
        except (RuntimeError, MemoryError) as exc:
            if not _is_oom(exc) or step[0] == 1:
                raise
            _empty_cache()
            step[0] = max(1, step[0] // 2)
            continue
        for (i, _), value in zip(part, out):
            results[i] = value
        start += len(part)
    return [(entry, results[i], error) for i, (entry, _, error) in enumerate(batch)]


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def failure_line(summary: dict, noun: str = "images") -> Optional[str]:
    """``N of M images failed (first: ...)`` for a summary with failures, else None."""
    if not summary["failed"]:
        return None
    return failure_summary([tuple(summary["first_failure"])], summary["images"], noun, count=summary["failed"])


def model_fingerprint(path) -> str:
    """What identifies a model for a resumed run, without loading it: the sha256 of its folder's
    ``conversion_report.json`` (which holds every file's sha256), else of each file's name, size
    and modification time (a folder without a report, a checkpoint file)."""
    path = Path(path)
    digest = hashlib.sha256()
    report = path / "conversion_report.json"
    if report.is_file():
        digest.update(report.read_bytes())
        return digest.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        st = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{st.st_size}\0{st.st_mtime_ns}\n"
                      .encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


class Records:
    """The records of a run, in input order: iterating reads them back from the output file (or
    the list kept in memory); ``images``, ``failed``, ``first_failure`` summarise the run."""

    def __init__(self, summary: dict, *, path: Optional[Path] = None, records: Optional[list] = None):
        self.summary = summary
        self.path = path
        self._records = records

    images = property(lambda self: self.summary["images"])
    failed = property(lambda self: self.summary["failed"])
    first_failure = property(lambda self: self.summary["first_failure"])

    def __len__(self) -> int:
        return len(self._records) if self._records is not None else self.images

    def __iter__(self):
        if self._records is not None:
            yield from self._records
        elif self.path is not None:
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    yield json.loads(line)

    def __getitem__(self, index):
        return list(self)[index] if self._records is None else self._records[index]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"Records(images={self.images}, failed={self.failed}, path={self.path})"

