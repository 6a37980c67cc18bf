"""``ofaconv caption FOLDER IMAGES... --out captions.jsonl``: caption images with a converted model.

Images come as files, directories (their image files, sorted), glob patterns, or MUGE-style TSV
files (``--tsv``: ``image_id<TAB>base64`` per line, urlsafe or standard base64). Each input gives
one JSONL record, in input order: ``{"image", "caption", "score"}`` (``score``: fairseq's
length-normalised log-probability of the caption) or ``{"image", "error"}`` for an input that
cannot be read; the run goes on, and the exit code is 1 if any input failed, 0 otherwise.

Generation is the model's fairseq-faithful search with the folder's ``generation_config.json``
(English caption: beam 5, max_len_b 16; MUGE: beam 8, max_len_b 128), overridable here.
"""

from __future__ import annotations

import binascii
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from ofaconv.core.errors import DataError, OfaconvError
from ofaconv.core.images import ImageDecodeError, ImageInput, decode_base64, expand_images, open_image, tsv_rows

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def count_tsv_lines(path: str) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------


def load_captioner(folder, device: str = "cpu", dtype: str = "fp32"):
    """Model (eval, on ``device`` in ``dtype``) and processor of a converted folder."""
    from transformers import AutoModelForSeq2SeqLM, AutoProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise OfaconvError("not a model folder (no config.json)", path=folder)
    if dtype not in DTYPES:
        raise OfaconvError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise OfaconvError(f"invalid device {device!r}: {exc}") from None
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise OfaconvError(f"no usable OFA processor/tokenizer ({str(exc).splitlines()[0]})", path=folder) from None
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=DTYPES[dtype])
    return model.to(torch_device).eval(), processor


def _preprocess(processor, item: ImageInput):
    """Pixel tensor [3, S, S] of one item, or an error message."""
    if item.error is not None:
        return None, item.error
    try:
        image = open_image(item.path if item.path is not None else item.data, item.name)
    except ImageDecodeError as exc:
        return None, exc.reason
    return processor.image_processor(image, return_tensors="pt")["patch_images"][0], None


def caption_batch(model, processor, pixels: list[torch.Tensor], prompt: Optional[str] = None,
                  **generate_kwargs) -> list[tuple[str, float]]:
    """Captions and scores for a batch of preprocessed images."""
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
    pending: list[tuple[ImageInput, Optional[torch.Tensor], Optional[str]]] = []

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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser(
        "caption",
        help="caption images with a converted OFA model (JSONL output)",
        description="Caption image files, directories, globs or MUGE-style base64 TSVs with a converted "
        "OFA folder. One JSONL record per input; unreadable images give an error record and exit code 1.",
    )
    p.add_argument("folder", help="converted model folder")
    p.add_argument("images", nargs="*", help="image files, directories or glob patterns")
    p.add_argument("--tsv", action="append", default=[], metavar="FILE",
                   help="MUGE-style TSV of image_id<TAB>base64 lines (repeatable)")
    p.add_argument("--out", required=True, help="output JSONL file ('-' for stdout)")
    p.add_argument("--prompt", help="encoder prompt (default: the folder's, i.e. fairseq's caption prompt)")
    p.add_argument("--beams", type=int, help="beam size (default: generation_config.json)")
    p.add_argument("--max-len", type=int, help="at most this many caption tokens (fairseq max_len_b)")
    p.add_argument("--min-len", type=int, help="at least this many caption tokens (fairseq min_len)")
    p.add_argument("--text-only", action="store_true", help="never emit <code_*>/<bin_*> tokens")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model dtype (default fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
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
        kwargs["max_len_b"] = args.max_len
        kwargs["max_len_a"] = 0
    if args.min_len is not None:
        kwargs["min_len"] = args.min_len
    if args.text_only:
        kwargs["text_only"] = True
    return kwargs


def _run(args) -> int:
    if not args.images and not args.tsv:
        raise OfaconvError("no images given (pass files, directories, globs or --tsv FILE)")
    if args.batch_size < 1:
        raise OfaconvError("--batch-size must be at least 1")
    generate_kwargs = _generate_kwargs(args)
    for tsv in args.tsv:
        if not os.path.isfile(tsv):
            raise OfaconvError("no such TSV file", path=tsv)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, processor = load_captioner(args.folder, args.device, args.dtype)
    if generate_kwargs.get("max_len_b", 0) + 1 > model.config.max_position_embeddings:
        raise OfaconvError(f"--max-len must be below {model.config.max_position_embeddings}")

    image_items = list(expand_images(args.images))
    total = len(image_items) + sum(count_tsv_lines(t) for t in args.tsv)

    def items():
        yield from image_items
        for tsv in args.tsv:
            yield from read_tsv(tsv)

    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, unit="img", desc="captioning", file=sys.stderr, dynamic_ncols=True)

    failed = 0
    to_stdout = args.out == "-"
    out_path = Path(args.out)
    if not to_stdout and not out_path.parent.resolve().is_dir():
        raise OfaconvError("output directory does not exist", path=out_path.parent)
    handle, tmp = (sys.stdout, None)
    if not to_stdout:
        fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent.resolve())
        handle = os.fdopen(fd, "w", encoding="utf-8")
    try:
        with torch.inference_mode():
            for record in caption_items(model, processor, items(), batch_size=args.batch_size, prompt=args.prompt,
                                        progress=progress, **generate_kwargs):
                failed += "error" in record
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
        if tmp is not None:
            handle.close()
            os.replace(tmp, out_path)
            tmp = None
    finally:
        if progress is not None:
            progress.close()
        if tmp is not None:
            handle.close()
            os.unlink(tmp)
    if failed:
        print(f"ofaconv: {failed} of {total} images could not be captioned (see the error records)", file=sys.stderr)
    return 1 if failed else 0
