"""``ofaconv caption FOLDER IMAGES... --out captions.jsonl``: caption images with a converted model.

Images come as files, directories (their image files, sorted), glob patterns, list files (``--list``:
one path, directory or glob per line) or MUGE-style TSV files (``--tsv``: ``image_id<TAB>base64``
per line, urlsafe or standard base64). Each input gives one JSONL record, in input order: ``{"image",
"caption", "score"}`` (``score``: fairseq's length-normalised log-probability of the caption) or
``{"image", "error"}`` for an input that cannot be read; the run goes on, and ends with one
``ofaconv: error: N of M images failed (first: ...)`` line and exit code 2 if any input failed.

The run is a catalog run (``ofaconv.core.catalog``): images are decoded in DataLoader workers,
captioned in chunks that a rerun of the same command resumes after a crash, and under ``torchrun``
each process captions its share. The output appears (renamed over ``--out``) only when every chunk
is done; an existing ``--out`` is replaced only when it is an earlier caption output (its first line
a caption record), never a file or device ofaconv did not write.

Generation is the model's fairseq-faithful search with the folder's ``generation_config.json``
(English caption: beam 5, max_len_b 16; MUGE: beam 8, max_len_b 128), overridable here.
"""

from __future__ import annotations

import binascii
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from ofaconv.core.catalog import add_input_arguments, add_run_arguments, check_jsonl_output, check_run_arguments
from ofaconv.core.catalog import torch_device  # noqa: F401 - --device, checked the same way by every command
from ofaconv.core.errors import DataError, OfaconvError
from ofaconv.core.images import ImageDecodeError, ImageInput, decode_base64, open_image, tsv_rows

DTYPES = ("fp32", "fp16", "bf16")
CPU_BATCH, GPU_BATCH = 8, 64  # --batch-size default: the CPU's cores are busy at 8; a GPU wants more
CHUNK_SIZE = 256  # images per resumable chunk (and per round of the processes)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def read_tsv(path: str) -> Iterator[ImageInput]:
    """Items of a MUGE-style image TSV, one per non-blank line (``image_id<TAB>base64``; extra columns ignored)."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read TSV ({exc.strerror or exc})", path=path) from None
    with handle:
        for row in tsv_rows(path):
            if not row.ok:
                yield ImageInput(f"{path}:{row.lineno}", error="malformed TSV line (expected image_id<TAB>base64)")
                continue
            handle.seek(row.start)
            try:
                data = decode_base64(handle.read(row.length))
            except (binascii.Error, ValueError) as exc:
                yield ImageInput(row.image_id, error=f"{path}:{row.lineno}: invalid base64 ({exc})")
                continue
            yield ImageInput(row.image_id, data=data)


# ---------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OfaconvError("missing; convert the checkpoint again (ofaconv convert writes it)", path=path) from None
    except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8 / JSON, nested too deeply
        detail = getattr(exc, "strerror", None) or ("nested too deeply" if isinstance(exc, RecursionError) else exc)
        raise OfaconvError(f"unreadable JSON ({detail}); restore the file or convert again", path=path) from None
    if not isinstance(data, dict):
        raise OfaconvError(f"expected a JSON object, found {type(data).__name__}", path=path)
    return data


def check_ofa_folder(folder, command: str) -> Path:
    """``folder`` is a converted (or finetuned) OFA folder whose images OFA can encode; otherwise one
    line naming what it is and, for another family's folder, the command that takes it."""
    from ofaconv.core import registry

    from .checkpoint import check_image_size
    from .family import FAMILY

    folder = Path(folder)
    if not folder.is_dir():
        raise OfaconvError("no such model folder" if not folder.exists() else "not a folder; give a converted "
                           "OFA model folder", path=folder)
    family = registry.family_of_folder(folder)
    if family.name != FAMILY.name:
        commands = " / ".join(f"ofaconv {c}" for c in family.commands)
        raise OfaconvError(f"a {family.name} model folder ({family.description}); `ofaconv {command}` needs a "
                           f"converted OFA folder (this one is for {commands})", path=folder / "config.json",
                           key="model_type")
    bucket = _json_object(folder / "config.json").get("image_bucket_size", 42)
    processor_config = folder / "preprocessor_config.json"
    size = _json_object(processor_config).get("size")
    sides = list(size.values()) if isinstance(size, dict) else [size]
    for side in sides or [None]:
        check_image_size(side, image_bucket_size=bucket if isinstance(bucket, int) and bucket > 0 else 42,
                         path=processor_config, key="size")
    return folder


def load_captioner(folder, device: str = "cpu", dtype: str = "fp32"):
    """Model (eval, on ``device`` in ``dtype``) and processor of a converted folder."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoProcessor

    if dtype not in DTYPES:
        raise OfaconvError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    device = torch_device(device)
    folder = check_ofa_folder(folder, "caption")
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise OfaconvError(f"no usable OFA processor/tokenizer ({str(exc).splitlines()[0]})", path=folder) from None
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=getattr(torch, {"fp32": "float32", "fp16": "float16",
                                                                                    "bf16": "bfloat16"}[dtype]))
    except (OSError, ValueError) as exc:
        raise OfaconvError(f"cannot load the model ({str(exc).splitlines()[0]}); convert the checkpoint again",
                           path=folder) from None
    return model.to(device).eval(), processor


def _preprocess(processor, item: ImageInput):
    """Pixel tensor [3, S, S] of one item, or an error message."""
    if item.error is not None:
        return None, item.error
    try:
        image = open_image(item.path if item.path is not None else item.data, item.name)
    except ImageDecodeError as exc:
        return None, exc.reason
    return processor.image_processor(image, return_tensors="pt")["patch_images"][0], None


def caption_batch(model, processor, pixels: list, prompt: Optional[str] = None,
                  **generate_kwargs) -> list[tuple[str, float]]:
    """Captions and scores for a batch of preprocessed images."""
    import torch

    from .tokenization import decode_caption

    text = prompt if prompt is not None else processor.prompt
    if text is None:
        raise OfaconvError("the processor has no prompt; pass --prompt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokens = processor.tokenizer([text] * len(pixels), return_tensors="pt", padding=True)
    out = model.generate(
        input_ids=tokens["input_ids"].to(device),
        attention_mask=tokens["attention_mask"].to(device),
        patch_images=torch.stack(pixels).to(device=device, dtype=dtype),
        patch_masks=torch.ones(len(pixels), dtype=torch.bool, device=device),
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    captions = [decode_caption(processor.tokenizer, row, processor.family) for row in out.sequences.tolist()]
    return list(zip(captions, out.sequences_scores.float().tolist()))


def caption_items(model, processor, items: Iterable[ImageInput], *, batch_size: int = 8, prompt: Optional[str] = None,
                  progress=None, **generate_kwargs) -> Iterator[dict]:
    """JSONL records for ``items`` in input order; unreadable inputs become error records."""
    pending: list[tuple[ImageInput, Optional[object], Optional[str]]] = []

    def flush():
        ready = [(item, pixels) for item, pixels, error in pending if error is None]
        results = iter(caption_batch(model, processor, [p for _, p in ready], prompt, **generate_kwargs)) if ready else None
        records = []
        for item, pixels, error in pending:
            if error is not None:
                records.append({"image": item.name, "error": error})
            else:
                caption, score = next(results)
                records.append({"image": item.name, "caption": caption, "score": round(score, 6)})
        if progress is not None:
            progress.update(len(pending))
        pending.clear()
        return records

    for item in items:
        pixels, error = _preprocess(processor, item)
        pending.append((item, pixels, error))
        if sum(1 for _, _, e in pending if e is None) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


class _Pixels:
    """Pixels of one image for the model ([3, S, S]); runs in the DataLoader's worker processes."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image):
        return self.image_processor(image, return_tensors="pt")["patch_images"][0]


def caption(folder, images: Sequence[str] = (), *, out=None, tsv: Sequence[str] = (), lists: Sequence[str] = (),
            prompt: Optional[str] = None, beams: Optional[int] = None, max_len: Optional[int] = None,
            min_len: Optional[int] = None, text_only: bool = False, batch_size: Optional[int] = None,
            device: str = "cpu", dtype: str = "fp32", workers: Optional[int] = None, chunk_size: int = CHUNK_SIZE,
            restart: bool = False, progress: bool = False):
    """Caption ``images`` (files, directories, globs), the entries of ``lists`` and the rows of the
    ``tsv`` files with the converted OFA ``folder``; what ``ofaconv caption`` runs.

    Returns the records, in input order (``{"image", "caption", "score"}`` or ``{"image",
    "error"}``: an unreadable image is a record, not an exception), as a
    :class:`ofaconv.core.catalog.Records` (a sequence; ``.failed``, ``.first_failure``). With ``out``
    (a path) they are also written there, resumably, and read back from it on iteration; ``"-"``
    streams them to stdout. Under ``torchrun`` every process captions its share and rank 0 gets the
    records. ``batch_size`` None: 8 on a CPU, 64 on a GPU.
    """
    from ofaconv.core.catalog import Inputs, RecordSink, Records, model_fingerprint, run_catalog

    inputs = Inputs(images, lists, tsv)
    if not inputs:
        raise OfaconvError("no images given (pass files, directories, globs, --list FILE or --tsv FILE)")
    generate_kwargs = _generate_kwargs(beams, max_len, min_len, text_only)
    if dtype not in DTYPES:
        raise OfaconvError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    inputs.check()
    batch_size = check_run_arguments(device=device, batch_size=batch_size, chunk_size=chunk_size, workers=workers,
                                     batch=(CPU_BATCH, GPU_BATCH))
    check_ofa_folder(folder, "caption")
    target = None if out is None else check_jsonl_output(out, inputs.paths(), folder, command="caption",
                                                         ours=lambda r: "image" in r and ("caption" in r or "error" in r))

    def load(on: str):
        model, processor = load_captioner(folder, on, dtype)
        if generate_kwargs.get("max_len_b", 0) + 1 > model.config.max_position_embeddings:
            raise OfaconvError(f"--max-len must be below {model.config.max_position_embeddings}")

        def infer(pixels):
            import torch

            with torch.inference_mode():
                return caption_batch(model, processor, pixels, prompt, **generate_kwargs)

        return _Pixels(processor.image_processor), infer

    def record(entry, result, error):
        if error is not None:
            return {"image": entry.name, "error": error}
        text, score = result
        return {"image": entry.name, "caption": text, "score": round(score, 6)}

    sink = RecordSink("-" if out == "-" else target, record)
    identity = {"command": "caption", "model": model_fingerprint(folder),
                "settings": {"prompt": prompt, "dtype": dtype, **generate_kwargs}}
    summary = run_catalog(inputs, sink, identity=identity, load=load, chunk_size=chunk_size, batch_size=batch_size,
                          workers=workers, device=device, restart=restart, progress=progress, desc="captioning")
    if target is not None:
        return Records(summary, path=target)
    return Records(summary, records=sink.records)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser(
        "caption",
        help="caption images with a converted OFA model (JSONL output)",
        description="Caption image files, directories, globs, list files or MUGE-style base64 TSVs with a "
        "converted OFA folder. One JSONL record per input; unreadable images give an error record, a summary "
        "line and exit code 2. Resumable (rerun the same command after a crash); runs one process per device "
        "under torchrun / accelerate launch.",
    )
    p.add_argument("folder", help="converted model folder")
    add_input_arguments(p)
    p.add_argument("--out", required=True, help="output JSONL file ('-' for stdout, not resumable)")
    p.add_argument("--prompt", help="encoder prompt (default: the folder's, i.e. fairseq's caption prompt)")
    p.add_argument("--beams", type=int, help="beam size (default: generation_config.json)")
    p.add_argument("--max-len", type=int, help="at most this many caption tokens (fairseq max_len_b)")
    p.add_argument("--min-len", type=int, help="at least this many caption tokens (fairseq min_len)")
    p.add_argument("--text-only", action="store_true", help="never emit <code_*>/<bin_*> tokens")
    add_run_arguments(p, batch=(CPU_BATCH, GPU_BATCH), chunk_size=CHUNK_SIZE, batch_help="images per generate call")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model dtype (default fp32)")
    p.set_defaults(func=_run)


def _generate_kwargs(beams, max_len, min_len, text_only) -> dict:
    kwargs = {}
    if beams is not None:
        if beams < 1:
            raise OfaconvError("--beams must be at least 1")
        kwargs["num_beams"] = beams
    if max_len is not None:
        if max_len < 1:
            raise OfaconvError("--max-len must be at least 1")
        kwargs["max_len_b"] = max_len
        kwargs["max_len_a"] = 0
    if min_len is not None:
        kwargs["min_len"] = min_len
    if text_only:
        kwargs["text_only"] = True
    return kwargs


def _run(args) -> int:
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = caption(args.folder, args.images, out=args.out, tsv=args.tsv, lists=args.list, prompt=args.prompt,
                     beams=args.beams, max_len=args.max_len, min_len=args.min_len, text_only=args.text_only,
                     batch_size=args.batch_size, device=args.device, dtype=args.dtype, workers=args.workers,
                     chunk_size=args.chunk_size, restart=args.restart, progress=not args.no_progress)
    if result.failed:
        if int(os.environ.get("RANK", "0")) != 0:  # rank 0 says it, once
            return 2
        from ofaconv.core.catalog import failure_line

        where = f"written to {args.out}" if args.out != "-" else "written"
        raise DataError(f"{failure_line(result.summary)}; the other captions and an error record per failed image "
                        f"were {where}")
    return 0
