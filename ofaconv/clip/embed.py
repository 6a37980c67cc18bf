"""``ofaconv clip embed MODEL IMAGES... --out DIR``: image embeddings of a catalog, for search.

Inputs as ``ofaconv caption`` takes them (files, directories, globs, ``--list`` files, ``--tsv``
MUGE / Chinese-CLIP base64 TSVs). The run is a catalog run (``ofaconv.core.catalog``): images are
decoded in DataLoader workers, embedded in chunks that a rerun resumes, one process per device
under ``torchrun``. ``DIR`` gets one shard per chunk (``embeddings-NNNNNNNN.npy``, or
``.safetensors`` with ``--format safetensors``: float32, L2-normalised, ``[rows, projection_dim]``),
``ids.jsonl`` (one JSON string per row, shards in order), ``failed.jsonl`` (``{"image", "error"}``
per unreadable input) and ``embeddings.json`` (the manifest: shards and their rows, the image
tower's fingerprint, which ``ofaconv clip search --embeddings DIR`` checks). No shard holds more
than ``--chunk-size`` rows, and no process holds more than one chunk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from ofaconv.core.catalog import add_input_arguments, add_run_arguments, check_run_arguments
from ofaconv.core.errors import DataError, OfaconvError

__all__ = ["embed", "add_parser"]

CPU_BATCH, GPU_BATCH = 32, 256  # --batch-size default; halved on an out-of-memory error
CHUNK_SIZE = 4096  # rows per chunk = per shard (8 MiB at 512 dimensions)


class _Pixels:
    """Pixels of one image for the vision tower; runs in the DataLoader's worker processes."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image):
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


def embed(model, images: Sequence[str] = (), *, out, tsv: Sequence[str] = (), lists: Sequence[str] = (),
          format: str = "npy", batch_size: Optional[int] = None, device: str = "cpu", workers: Optional[int] = None,
          chunk_size: int = CHUNK_SIZE, restart: bool = False, progress: bool = False, arch: Optional[str] = None,
          vocab: Optional[str] = None) -> dict:
    """Embed ``images`` (files, directories, globs), the entries of ``lists`` and the rows of the
    ``tsv`` files with the CLIP ``model`` into the folder ``out``; what ``ofaconv clip embed`` runs.

    Returns the manifest (``embeddings.json``) plus ``first_failure`` (``[image, reason]`` or None):
    an unreadable image is listed in ``failed.jsonl``, not raised. Resumable: a rerun after a crash
    embeds only the chunks that were not done. ``batch_size`` None: 32 on a CPU, 256 on a GPU.
    """
    from ofaconv.core.catalog import (ArraySink, Inputs, check_embeddings_out, model_fingerprint,
                                      read_embeddings_manifest, run_catalog)

    from .towers import ClipTowers

    inputs = Inputs(images, lists, tsv)
    if not inputs:
        raise OfaconvError("no images given (pass files, directories, globs, --list FILE or --tsv FILE)")
    if format not in ("npy", "safetensors"):
        raise OfaconvError(f"--format {format!r}: choose npy or safetensors")
    inputs.check()
    batch_size = check_run_arguments(device=device, batch_size=batch_size, chunk_size=chunk_size, workers=workers,
                                     batch=(CPU_BATCH, GPU_BATCH))
    if not Path(model).exists():
        raise OfaconvError("no such model folder or checkpoint", path=model)
    out = Path(out)
    check_embeddings_out(out, [*inputs.paths(), str(model)])
    sink = ArraySink(out, fmt=format, manifest={"model": str(model)})

    def load(on: str):
        import torch

        towers = ClipTowers.from_pretrained(model, device=on, arch=arch, vocab=vocab)
        sink.manifest["fingerprint"] = towers.image_fingerprint(include_projection=True)

        def infer(pixels):
            return towers.encode_pixels(torch.stack(pixels)).float().cpu().numpy()

        return _Pixels(towers.image_processor), infer

    identity = {"command": "clip embed", "model": model_fingerprint(model),
                "settings": {"format": format, "arch": arch}}
    summary = run_catalog(inputs, sink, identity=identity, load=load, chunk_size=chunk_size, batch_size=batch_size,
                          workers=workers, device=device, restart=restart, progress=progress, desc="embedding")
    manifest = read_embeddings_manifest(out) if Path(out, "embeddings.json").exists() else {}  # rank 0 wrote it
    return {**manifest, "first_failure": summary["first_failure"], "world_size": summary["world_size"]}


def _run(args) -> int:
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = embed(args.model, args.images, out=args.out, tsv=args.tsv, lists=args.list, format=args.format,
                   batch_size=args.batch_size, device=args.device, workers=args.workers, chunk_size=args.chunk_size,
                   restart=args.restart, progress=not args.no_progress, arch=args.arch, vocab=args.vocab)
    if result.get("failed"):
        if int(os.environ.get("RANK", "0")) != 0:  # rank 0 says it, once
            return 2
        from ofaconv.core.batch import failure_summary

        line = failure_summary([tuple(result["first_failure"])], result["inputs"], "images", count=result["failed"])
        raise DataError(f"{line}; the others were embedded into {args.out} (every failure is in failed.jsonl)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed a catalog of images into .npy/safetensors shards (resumable, torchrun)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="CLIP package folder (or a legacy BertCLIP folder / Chinese-CLIP .pt)")
    add_input_arguments(p, tsv_help="MUGE / Chinese-CLIP TSV of image_id<TAB>base64 lines (repeatable)")
    p.add_argument("--out", required=True, help="output folder (shards, ids.jsonl, failed.jsonl, embeddings.json)")
    p.add_argument("--format", choices=["npy", "safetensors"], default="npy", help="shard format (default npy)")
    add_run_arguments(p, batch=(CPU_BATCH, GPU_BATCH), chunk_size=CHUNK_SIZE, batch_help="images per forward",
                      chunk_help="images per resumable chunk and rows per shard")
    p.add_argument("--arch")
    p.add_argument("--vocab")
    p.set_defaults(func=_run)

