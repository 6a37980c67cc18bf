"""``ofaconv predict FOLDER IMAGES... --task TASK [--text T | --texts FILE] --out out.jsonl``: run one OFA
task (``mappings/ofa/tasks.yaml``: caption, vqa, grounding, matching, ocr) on images with a
converted folder.

The task defaults to the folder's (config.json ``task``, caption when absent); another task is run
with a note on stderr (the checkpoint was not finetuned for it). Tasks that take a text get it from
``--text`` (the same for every image) or ``--texts FILE`` (one line per image, paired with the
images in input order: the catalog gives the n-th input the n-th line, whichever process runs it).
One JSONL record per image, in input order: ``{"image", "task", "query"?, <the task's field>,
"score"?}`` — ``caption``, ``answer`` (VQA), ``box`` ([x0, y0, x1, y1] in the image's pixels,
grounding), ``scores`` and ``label`` (matching), ``text`` (OCR) — or ``{"image", "task", "query"?,
"error"}`` for an image that cannot be read; the run goes on and ends with one ``N of M images
failed`` line and exit 2.

The run is a catalog run (``ofaconv.core.catalog``), exactly as ``ofaconv caption``'s: the same
inputs (files, directories, globs, ``--list``, ``--tsv``), images decoded and prompts tokenized in
DataLoader workers, resumable chunks, one process per device under ``torchrun``, the output renamed
over ``--out`` when whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from ofaconv.core.catalog import add_input_arguments, add_run_arguments, check_jsonl_output, check_run_arguments
from ofaconv.core.errors import DataError, OfaconvError

from .caption import CHUNK_SIZE, CPU_BATCH, DTYPES, GPU_BATCH


def _folder_config(folder) -> dict:
    from .caption import _json_object

    return _json_object(Path(folder) / "config.json")


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


def _check_texts(task: str, needs_text: bool, text: Optional[str], texts) -> None:
    if not needs_text:
        if text is not None or texts is not None:
            raise OfaconvError(f"the {task} task takes no text; drop --text/--texts")
        return
    if text is None and texts is None:
        raise OfaconvError(f"the {task} task needs a text per image: pass --text TEXT or --texts FILE")
    if text is not None and texts is not None:
        raise OfaconvError("pass --text or --texts, not both")
    if text is not None and not text.strip():
        raise OfaconvError("--text is empty")


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


class _Prepare:
    """The catalog's preprocess (DataLoader workers): an image and its entry -> the task's inputs,
    with the entry's own text (``--texts``) or the one ``--text``."""

    def __init__(self, inputs, text: Optional[str]):
        self.inputs, self.text = inputs, text

    def __call__(self, image, entry):
        return self.inputs(image, entry.text if entry.text is not None else self.text)


def _record(task: str, text: Optional[str]) -> Callable:
    def record(entry, result, error) -> dict:
        out = {"image": entry.name, "task": task}
        query = entry.text if entry.text is not None else text
        if query is not None:
            out["query"] = query
        if error is not None:
            out["error"] = error
            return out
        result = dict(result)
        result.pop("tokens", None)
        result.pop("logprobs", None)
        if "score" in result:
            result["score"] = round(result["score"], 6)
        if "scores" in result:
            result["scores"] = {k: round(v, 6) for k, v in result["scores"].items()}
        out.update(result)
        return out

    return record


def predict(folder, images: Sequence[str] = (), *, task: Optional[str] = None, text: Optional[str] = None,
            texts=None, answers: Optional[list[str]] = None, out=None, lists: Sequence[str] = (),
            tsv: Sequence[str] = (), batch_size: Optional[int] = None, device: str = "cpu", dtype: str = "fp32",
            workers: Optional[int] = None, chunk_size: int = CHUNK_SIZE, restart: bool = False,
            progress: bool = False, **generate_kwargs):
    """``ofaconv predict`` as a function: one record per input (``images``: files, directories,
    globs; the entries of ``lists``; the rows of the ``tsv`` files), in input order.

    ``text`` is used for every image; ``texts`` (a list, or a file of one line per image) pairs
    the n-th text with the n-th input. ``answers`` overrides the task's answer list (VQA: constrain
    generation to it; matching: the labels scored); ``generate_kwargs`` (``num_beams``,
    ``max_len_b``, ...) override the folder's generation settings. A note is logged when ``task``
    is not the folder's own. Returns the records as a :class:`ofaconv.core.catalog.Records` (a
    sequence; ``.failed``, ``.first_failure``); with ``out`` they are also written there, resumably,
    as ``ofaconv caption`` writes its output. ``batch_size`` None: 8 on a CPU, 64 on a GPU.
    """

    def log(note: str) -> None:
        from transformers.utils import logging

        logging.get_logger("ofaconv.predict").warning(note)

    if isinstance(images, (str, os.PathLike)):
        images = [images]
    return _predict(folder, images, task=task, text=text, texts=texts, answers=answers, out=out, lists=lists,
                    tsv=tsv, batch_size=batch_size, device=device, dtype=dtype, workers=workers,
                    chunk_size=chunk_size, restart=restart, progress=progress, generate_kwargs=generate_kwargs,
                    on_note=log)


def _predict(folder, images, *, task, text, texts, answers, out, lists, tsv, batch_size, device, dtype, workers,
             chunk_size, restart, progress, generate_kwargs, on_note, answers_file=None):
    from ofaconv.core.catalog import Inputs, RecordSink, Records, model_fingerprint, run_catalog

    from .caption import check_ofa_folder
    from .tasks import task_spec

    inputs = Inputs(images, lists, tsv, texts=texts)
    if not inputs:
        raise OfaconvError("no images given (pass files, directories, globs, --list FILE or --tsv FILE)")
    if task is not None:
        task_spec(task)
    if dtype not in DTYPES:
        raise OfaconvError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    batch_size = check_run_arguments(device=device, batch_size=batch_size, chunk_size=chunk_size, workers=workers,
                                     batch=(CPU_BATCH, GPU_BATCH))
    check_ofa_folder(folder, "predict")
    task, note = resolve_task(_folder_config(folder), task)
    _check_texts(task, task_spec(task).get("text") == "required", text, texts)
    inputs.check()
    target = None if out is None else check_jsonl_output(
        out, [*inputs.paths(), *([answers_file] if answers_file else [])], folder, command="predict",
        ours=lambda r: "image" in r and "task" in r)

    def load(on: str):
        if note and int(os.environ.get("RANK", "0")) == 0:  # once the inputs passed their checks
            on_note(note)
        runner, _ = load_runner(folder, task, answers=answers, device=on, dtype=dtype,
                                generate_kwargs=generate_kwargs)
        return _Prepare(runner.inputs, text), runner.run_batch

    sink = RecordSink("-" if out == "-" else target, _record(task, text))
    listed = None if answers is None else hashlib.sha256(json.dumps(list(answers)).encode()).hexdigest()
    identity = {"command": "predict", "model": model_fingerprint(folder),
                "settings": {"task": task, "text": text, "answers_sha256": listed, "dtype": dtype,
                             **{k: generate_kwargs[k] for k in sorted(generate_kwargs)}}}
    summary = run_catalog(inputs, sink, identity=identity, load=load, chunk_size=chunk_size, batch_size=batch_size,
                          workers=workers, device=device, restart=restart, progress=progress, desc=task,
                          with_entry=True)
    if target is not None:
        return Records(summary, path=target)
    return Records(summary, records=sink.records)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    from .tasks import task_names

    p = sub.add_parser(
        "predict",
        help="run an OFA task (caption, vqa, grounding, matching, ocr) on images (JSONL output)",
        description="Run one OFA task with a converted folder: caption, visual question answering, visual "
        "grounding (boxes in pixels), image-text matching (yes/no/maybe scores) or OCR, on image files, "
        "directories, globs, list files or MUGE-style base64 TSVs. The task defaults to the folder's own "
        "(config.json `task`). One JSONL record per input; unreadable images give an error record, a summary "
        "line and exit code 2. Resumable (rerun the same command after a crash); runs one process per device "
        "under torchrun / accelerate launch. See docs/tasks.md.",
    )
    p.add_argument("folder", help="converted model folder")
    add_input_arguments(p)
    p.add_argument("--task", help=f"one of {', '.join(task_names())} (default: the folder's task)")
    p.add_argument("--text", help="the text for every image (VQA question, grounding phrase, matching hypothesis)")
    p.add_argument("--texts", metavar="FILE",
                   help="one text per line, paired with the inputs in input order (images, then --list "
                   "entries, then --tsv rows)")
    p.add_argument("--answers", metavar="FILE",
                   help="answer list (one per line, a JSON list, or ModelScope's ans2label.json): VQA answers "
                   "are constrained to it, matching scores its labels")
    p.add_argument("--out", required=True, help="output JSONL file ('-' for stdout, not resumable)")
    p.add_argument("--beams", type=int, help="beam size (default: generation_config.json)")
    p.add_argument("--max-len", type=int, help="at most this many generated tokens (fairseq max_len_b)")
    add_run_arguments(p, batch=(CPU_BATCH, GPU_BATCH), chunk_size=CHUNK_SIZE,
                      batch_help="images per model call; prompts of different lengths run in separate calls")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model dtype (default fp32)")
    p.set_defaults(func=_run)


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
    from .tasks import read_answers, task_spec

    if not (args.images or args.list or args.tsv):
        raise OfaconvError("no images given (pass files, directories, globs, --list FILE or --tsv FILE)")
    generate_kwargs = _generate_kwargs(args)
    if args.task is not None:
        task_spec(args.task)
    answers = read_answers(args.answers) if args.answers is not None else None
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = _predict(args.folder, args.images, task=args.task, text=args.text, texts=args.texts, answers=answers,
                      out=args.out, lists=args.list, tsv=args.tsv, batch_size=args.batch_size, device=args.device,
                      dtype=args.dtype, workers=args.workers, chunk_size=args.chunk_size, restart=args.restart,
                      progress=not args.no_progress, generate_kwargs=generate_kwargs, answers_file=args.answers,
                      on_note=lambda note: print(f"ofaconv: note: {note}", file=sys.stderr))
    if result.failed:
        if int(os.environ.get("RANK", "0")) != 0:  # rank 0 says it, once
            return 2
        from ofaconv.core.catalog import failure_line

        where = f"written to {args.out}" if args.out != "-" else "written"
        raise DataError(f"{failure_line(result.summary)}; the other results and an error record per failed image "
                        f"were {where}")
    return 0
