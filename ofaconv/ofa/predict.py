"""``ofaconv predict FOLDER IMAGES... --task TASK [--text T | --texts FILE] --out out.jsonl``: run one OFA
task (``mappings/ofa/tasks.yaml``: caption, vqa, grounding, matching, ocr) on images with a
converted folder.

The task defaults to the folder's (config.json ``task``, caption when absent); another task is run
with a note on stderr (the checkpoint was not finetuned for it). Tasks that take a text get it from
``--text`` (the same for every image) or ``--texts FILE`` (one line per image, in input order).
One JSONL record per image, in input order: ``{"image", "task", "query"?, <the task's field>,
"score"?}`` — ``caption``, ``answer`` (VQA), ``box`` ([x0, y0, x1, y1] in the image's pixels,
grounding), ``scores`` and ``label`` (matching), ``text`` (OCR) — or ``{"image", "task", "error"}``
for an image that cannot be read; the run goes on and ends with one ``N of M images failed`` line
and exit 2. The output is written to a hidden sibling and renamed over ``--out`` at the end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ofaconv.core.errors import DataError, OfaconvError


def _folder_config(folder) -> dict:
    from .caption import _json_object

    return _json_object(Path(folder) / "config.json")


def read_texts(path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return [line.rstrip("\r\n") for line in handle]
    except FileNotFoundError:
        raise OfaconvError("no such texts file", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OfaconvError(f"cannot read the texts ({getattr(exc, 'strerror', None) or exc}); give a UTF-8 text "
                           "file with one text per line", path=path) from None


def resolve_task(folder_config: dict, task: Optional[str]) -> tuple[str, Optional[str]]:
    """(the task to run, a note when the folder was finetuned for another one)."""
    from .tasks import folder_task, task_spec

    own = folder_task(folder_config)
    if task is None:
        return own, None
    task_spec(task)
    if task != own:
        return task, (f"the folder was finetuned for {own!r}; running {task!r} with the task's default prompt "
                      "(results depend on what the checkpoint learnt)")
    return task, None


def _texts_for(task_needs_text: bool, n_images: int, text, texts, task: str) -> list[Optional[str]]:
    if not task_needs_text:
        if text is not None or texts is not None:
            raise OfaconvError(f"the {task} task takes no text; drop --text/--texts")
        return [None] * n_images
    if text is None and texts is None:
        raise OfaconvError(f"the {task} task needs a text per image: pass --text TEXT or --texts FILE")
    if text is not None and texts is not None:
        raise OfaconvError("pass --text or --texts, not both")
    if text is not None:
        if not text.strip():
            raise OfaconvError("--text is empty")
        return [text] * n_images
    return texts


def predict_items(runner, items: Iterable, texts: Iterable[Optional[str]], progress=None) -> Iterator[dict]:
    """JSONL records for ``items`` (ImageInput) paired with ``texts``, in order."""
    from ofaconv.core.images import ImageDecodeError, open_image

    for item, text in zip(items, texts):
        record = {"image": item.name, "task": runner.task}
        if text is not None:
            record["query"] = text
        if item.error is not None:
            record["error"] = item.error
        else:
            try:
                image = open_image(item.path if item.path is not None else item.data, item.name)
            except ImageDecodeError as exc:
                record["error"] = exc.reason
            else:
                out = runner.run(runner.prepare(image, text))
                out.pop("tokens", None)
                out.pop("logprobs", None)
                if "score" in out:
                    out["score"] = round(out["score"], 6)
                if "scores" in out:
                    out["scores"] = {k: round(v, 6) for k, v in out["scores"].items()}
                record.update(out)
        if progress is not None:
            progress.update(1)
        yield record


def load_runner(folder, task: Optional[str] = None, *, answers=None, device: str = "cpu", dtype: str = "fp32",
                generate_kwargs: Optional[dict] = None):
    """(TaskRunner, note) for a converted folder; ``task`` defaults to the folder's."""
    from .caption import check_ofa_folder, load_captioner
    from .tasks import TaskRunner

    check_ofa_folder(folder, "predict")
    config = _folder_config(folder)
    task, note = resolve_task(config, task)
    model, processor = load_captioner(folder, device, dtype)
    return TaskRunner(model, processor, task, config, answers=answers, generate_kwargs=generate_kwargs), note


def predict(folder, images, *, task: Optional[str] = None, text: Optional[str] = None,
            texts: Optional[list[str]] = None, answers: Optional[list[str]] = None, device: str = "cpu",
            dtype: str = "fp32", **generate_kwargs) -> list[dict]:
    """``ofaconv predict`` as a function: one record per image (files, directories or globs), in order.

    ``text`` is used for every image, ``texts`` pairs one text with each image; ``answers``
    overrides the task's answer list (VQA: constrain generation to it; matching: the labels
    scored); ``generate_kwargs`` (``num_beams``, ``max_len_b``, ...) override the folder's
    generation settings. A note is logged when ``task`` is not the folder's own.
    """
    from ofaconv.core.images import expand_images

    if isinstance(images, (str, os.PathLike)):
        images = [images]
    items = list(expand_images([os.fspath(i) for i in images]))
    runner, note = load_runner(folder, task, answers=answers, device=device, dtype=dtype,
                               generate_kwargs=generate_kwargs)
    if note:
        from transformers.utils import logging

        logging.get_logger("ofaconv.predict").warning(note)
    pairs = _texts_for(runner.needs_text, len(items), text, texts, runner.task)
    if len(pairs) != len(items):
        raise OfaconvError(f"got {len(pairs)} texts for {len(items)} images; give one text per image")
    return list(predict_items(runner, items, pairs))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    from .tasks import task_names

    p = sub.add_parser(
        "predict",
        help="run an OFA task (caption, vqa, grounding, matching, ocr) on images (JSONL output)",
        description="Run one OFA task with a converted folder: caption, visual question answering, visual "
        "grounding (boxes in pixels), image-text matching (yes/no/maybe scores) or OCR. The task defaults "
        "to the folder's own (config.json `task`). One JSONL record per image; see docs/tasks.md.",
    )
    p.add_argument("folder", help="converted model folder")
    p.add_argument("images", nargs="*", help="image files, directories or glob patterns")
    p.add_argument("--task", help=f"one of {', '.join(task_names())} (default: the folder's task)")
    p.add_argument("--text", help="the text for every image (VQA question, grounding phrase, matching hypothesis)")
    p.add_argument("--texts", metavar="FILE", help="one text per line, paired with the images in input order")
    p.add_argument("--answers", metavar="FILE",
                   help="answer list (one per line, a JSON list, or ModelScope's ans2label.json): VQA answers "
                   "are constrained to it, matching scores its labels")
    p.add_argument("--out", required=True, help="output JSONL file ('-' for stdout)")
    p.add_argument("--beams", type=int, help="beam size (default: generation_config.json)")
    p.add_argument("--max-len", type=int, help="at most this many generated tokens (fairseq max_len_b)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="model dtype (default fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_run)


def _earlier_output(path: Path) -> bool:
    """Empty, or its first line is a predict record: a file this command wrote."""
    with open(path, "rb") as handle:
        first = handle.readline(1 << 20)
    if not first.strip():
        return True
    try:
        record = json.loads(first)
    except (ValueError, RecursionError):
        return False
    return isinstance(record, dict) and "image" in record and "task" in record


def _predict_output(out: str, inputs: list, folder) -> Optional[Path]:
    """``--out`` as a path ofaconv may write (None: stdout), checked before anything is loaded."""
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
    if path.exists() and not _earlier_output(path):
        raise OfaconvError("exists and is not an earlier `ofaconv predict` output; move it away or choose another "
                           "--out", path=path)
    return path


class _Sink:
    """JSONL lines to stdout, or to a hidden sibling of OUT renamed over it when the run completes
    (an interrupted or failed run leaves nothing behind). A failed write names OUT."""

    def __init__(self, out: Optional[Path]):
        self.out, self.tmp, self.handle = out, None, sys.stdout

    def __enter__(self) -> "_Sink":
        if self.out is not None:
            import tempfile

            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.out.name}.ofaconv-{os.getpid()}-", suffix=".tmp",
                                            dir=self.out.parent)
            self.handle = os.fdopen(fd, "w", encoding="utf-8")
        return self

    def write(self, text: str) -> None:
        try:
            self.handle.write(text)
            self.handle.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.out) if self.out is not None else "<stdout>") from None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp is None:
            return
        try:
            self.handle.close()
            if exc_type is None:
                os.replace(self.tmp, self.out)
                self.tmp = None
        finally:
            if self.tmp is not None and os.path.exists(self.tmp):
                os.unlink(self.tmp)


def _generate_kwargs(args) -> dict:
    kwargs = {}
    if args.beams is not None:
        if args.beams < 1:
            raise OfaconvError("--beams must be at least 1")
        kwargs["num_beams"] = args.beams
    if args.max_len is not None:
        if args.max_len < 1:
            raise OfaconvError("--max-len must be at least 1")
        kwargs.update(max_len_a=0, max_len_b=args.max_len)
    return kwargs


def _run(args) -> int:
    from ofaconv.core.batch import failure_summary
    from ofaconv.core.images import expand_images

    from ofaconv.core.catalog import torch_device

    from .caption import check_ofa_folder
    from .tasks import read_answers, task_spec

    if not args.images:
        raise OfaconvError("no images given (pass files, directories or globs)")
    generate_kwargs = _generate_kwargs(args)
    if args.task is not None:
        task_spec(args.task)
    torch_device(args.device)
    check_ofa_folder(args.folder, "predict")
    task, note = resolve_task(_folder_config(args.folder), args.task)
    spec = task_spec(task)
    answers = read_answers(args.answers) if args.answers is not None else None
    texts = read_texts(args.texts) if args.texts is not None else None
    items = list(expand_images(args.images))
    pairs = _texts_for(spec.get("text") == "required", len(items), args.text, texts, task)
    if len(pairs) != len(items):
        raise OfaconvError(f"holds {len(pairs)} texts for {len(items)} images; give one line per image",
                           path=args.texts)
    if texts is not None:
        empty = next((n for n, t in enumerate(texts, 1) if not t.strip()), None)
        if empty is not None:
            raise OfaconvError("empty text; give one non-empty text per line", path=f"{args.texts}:{empty}")
    out = _predict_output(args.out, [*args.images, args.texts, args.answers], args.folder)
    if note:
        print(f"ofaconv: note: {note}", file=sys.stderr)
    failed = []
    with _Sink(out) as sink:
        if args.no_progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        runner, _ = load_runner(args.folder, task, answers=answers, device=args.device, dtype=args.dtype,
                                generate_kwargs=generate_kwargs)
        progress = None
        if not args.no_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(items), unit="img", desc=task, file=sys.stderr, dynamic_ncols=True)
        try:
            for record in predict_items(runner, items, pairs, progress):
                if "error" in record:
                    failed.append((record["image"], record["error"]))
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        finally:
            if progress is not None:
                progress.close()
    if failed:
        where = f"written to {out}" if out is not None else "written"
        raise DataError(f"{failure_summary(failed[:1], len(items), 'images', count=len(failed))}; the other "
                        f"results and an error record per failed image were {where}")
    return 0
