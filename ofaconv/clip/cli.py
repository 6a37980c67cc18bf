"""``ofaconv clip ...``: convert, init, train, similarity, search, embed, export-bert, eval, download, synth."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["add_parser"]


def _print(obj, as_json: bool = True) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _at_least(low, **flags) -> None:
    """One-line refusal of a numeric option below ``low`` (``--batch-size 0`` and the like)."""
    from ofaconv.core.errors import OfaconvError

    for name, value in flags.items():
        if value is not None and value < low:
            flag = f"-{name}" if len(name) == 1 else f"--{name.replace('_', '-')}"
            raise OfaconvError(f"{flag} must be at least {low}, got {value}")


def _convert(args) -> int:
    from .convert import convert

    report = convert(args.src, args.out, verify=args.verify, arch=args.arch, vocab=args.vocab,
                     max_length=args.max_length, force=args.force)
    if args.json:
        _print(report)
        return 0
    print(f"wrote {args.out} ({report['package']}, from {report['source_format']})")
    for check in report["checks"]:
        print(f"  {check['name']:34s} max|diff| {check['value']:.3e}  (gate {check['gate']:.1e})  ok")
    return 0


def _init(args) -> int:
    from .assemble import init_bertclip

    _print(init_bertclip(args.vision, args.text, args.out, max_length=args.max_length, seed=args.seed,
                         force=args.force))
    return 0


def _train(args) -> int:
    from .train import load_recipe, train

    recipe = load_recipe(args.recipe, args.override)
    _print(train(recipe, resume=args.resume))
    return 0


def _towers(args):
    from .towers import ClipTowers

    return ClipTowers.from_pretrained(args.model, arch=getattr(args, "arch", None), vocab=getattr(args, "vocab", None))


def _similarity(args) -> int:
    from ofaconv.core.errors import DataError, OfaconvError
    from ofaconv.core.images import expand_images
    from ofaconv.core.batch import failure_summary
    from .similarity import similarity

    kinds = args.mode.split("-")
    sets = {"image": list(expand_images(args.images)), "text": args.texts}
    if kinds[0] == kinds[1]:
        extra = args.candidates or None
        queries = sets[kinds[0]]
        candidates = list(expand_images(extra)) if extra and kinds[0] == "image" else extra
    else:
        queries, candidates = sets[kinds[0]], sets[kinds[1]]
    if not queries:
        raise OfaconvError(f"mode {args.mode} needs --{kinds[0]}s")
    towers = _towers(args)
    result = similarity(towers, args.mode, queries, candidates)
    if args.json:
        _print(result.to_dict())
    else:
        note = " (self excluded)" if result.self_excluded else ""
        print(f"# {args.mode}: softmax over candidates of exp({result.logit_scale:.4f}) * cosine{note}; probabilities "
              "are relative to this candidate set")
        for where, reason in result.failed:
            print(f"# skipped {where}: {reason}")
        for i, q in enumerate(result.queries):
            print(q)
            for j, prob, cos in result.ranked(i)[: args.top]:
                print(f"  {prob:8.4f}  cos {cos:+.4f}  {result.candidates[j]}")
    if result.failed:
        raise DataError(f"{failure_summary(result.failed, result.n_images, 'images')}; the others were compared")
    return 0


def _search(args) -> int:
    from ofaconv.core.errors import DataError, OfaconvError
    from ofaconv.core.batch import failure_summary
    from .search import _faiss, build_index, build_index_from_embeddings, query_index

    if not args.images and not args.embeddings and not args.query:
        raise OfaconvError("nothing to do: pass --images or --embeddings to (re)build the index and/or --query")
    if args.images and args.embeddings:
        raise OfaconvError("pass --images (embedded here) or --embeddings (from `ofaconv clip embed`), not both")
    _at_least(1, k=args.k, batch_size=args.batch_size)
    if args.embeddings:
        _faiss()  # before the model loads
    towers = _towers(args)
    out = {}
    if args.images:
        out["index"] = build_index(towers, args.images, args.index, batch_size=args.batch_size, force=args.force)
    if args.embeddings:
        out["index"] = build_index_from_embeddings(
            args.embeddings, args.index, fingerprint=towers.image_fingerprint(include_projection=True),
            kind=args.index_type, flat_below=args.flat_below, nlist=args.nlist, nprobe=args.nprobe,
            ef_search=args.ef_search, recall_queries=args.recall_queries, force=args.force)
    if args.query:
        out["queries"] = query_index(towers, args.index, args.query, k=args.k, nprobe=args.nprobe,
                                     ef_search=args.ef_search)
    _print(out)
    failed = out.get("index", {}).get("failed")
    if failed:
        raise DataError(f"{failure_summary([(f['image'], f['error']) for f in failed], out['index']['total'], 'images')}"
                        "; not indexed, the others are (see 'failed')")
    return 0


def _export_bert(args) -> int:
    from .export import export_bert

    _print(export_bert(args.model, args.out, with_projection=not args.no_projection, force=args.force,
                       arch=args.arch, vocab=args.vocab))
    return 0


def _eval(args) -> int:
    from ofaconv.core.errors import DataError
    from ofaconv.core.batch import failure_summary
    from .evaluate import evaluate_retrieval

    _at_least(1, batch_size=args.batch_size)
    _at_least(2, context_length=args.context_length)
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.resolve().is_dir():
        raise DataError("no such folder for --output", path=output.parent)
    if output is not None and output.resolve() in (Path(args.texts).resolve(), Path(args.images).resolve()):
        raise DataError("--output names an input file; choose another file", path=output)
    towers = _towers(args)
    directions = ("text_to_image",) if args.text_to_image_only else ("text_to_image", "image_to_text")
    result = evaluate_retrieval(towers, Path(args.texts), Path(args.images), context_length=args.context_length,
                                batch_size=args.batch_size, directions=directions)
    result["model"] = str(args.model)
    if output is not None:
        from ofaconv.core.writer import write_atomic

        write_atomic(output, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    _print(result)
    if result["failed"]:
        failed = [(f["item"], f["error"]) for f in result["failed"]]
        raise DataError(f"{failure_summary(failed, result['items'])}, skipped; the recall above is over the "
                        "rest, not comparable with the protocol's numbers (see 'failed')")
    return 0


def _download(args) -> int:
    from ofaconv.core.errors import DataError
    from ofaconv.core.batch import failure_summary
    from .download import download_images

    _at_least(1, workers=args.workers)
    _at_least(0, retries=args.retries, max_pixels=args.max_pixels)
    if not (args.timeout > 0 and args.deadline > 0):
        raise DataError("--timeout and --deadline must be positive numbers of seconds")
    result = download_images(args.csv, args.image_root, workers=args.workers, timeout=args.timeout,
                             retries=args.retries, deadline=args.deadline, max_pixels=args.max_pixels,
                             failures=args.failures, out_csv=args.out_csv)
    _print(result)
    first = result["first_failure"]
    if first:
        first = (f"{args.csv}:{first['line']}", f"{first['url']}: {first['error']}")
        raise DataError(f"{failure_summary([first], result['total'], 'images', count=result['failed'])}; every "
                        f"failure is listed in {result['failures']}")
    return 0


def _synth(args) -> int:
    from ofaconv.core.errors import DataError
    from . import synth
    from .architectures import clip_tables

    out = Path(args.out)
    micro = args.size == "micro"
    if args.kind == "cnclip-pt":
        arches = clip_tables()["cnclip_architectures"]
        arch = args.arch or "ViT-B-16"
        if arch not in arches:
            raise DataError(f"unknown Chinese-CLIP architecture {arch!r}; choose one of {', '.join(arches)}")
        target = out / arches[arch]["file_name"] if out.is_dir() or not out.suffix else out
        write = {target.name: lambda p: synth.write_cnclip_pt(p, arch, micro=micro, seed=args.seed)}
        if micro:  # the micro towers' vocab, beside the checkpoint
            write["vocab.txt"] = synth.write_vocab
    else:
        if args.size == "full":
            raise DataError(f"--size full is for cnclip-pt; {args.kind} comes in micro or base")
        writer = {"legacy-bertclip": synth.write_legacy_bertclip, "openai-clip": synth.write_openai_clip,
                  "bert": synth.write_bert}[args.kind]
        target = out
        write = {out.name: lambda p: writer(p, size=args.size, seed=args.seed)}
    _new_paths(target.parent, write)
    print(target)
    return 0


def _new_paths(parent: Path, write: dict) -> None:
    """Run each ``write[name](path)`` in a temp folder in ``parent``, then move the results to
    ``parent/name``: synth never writes over a file or into a non-empty folder (a file identical to
    the new one, such as a shared vocab, is kept), and a failed run leaves nothing."""
    import filecmp
    import shutil
    import tempfile

    from ofaconv.core.errors import DataError

    if parent.exists() and not parent.is_dir():
        raise DataError("is not a folder", path=parent)
    for name in write:
        if (parent / name).is_dir() and any((parent / name).iterdir()):
            raise DataError("is a folder that is not empty; synth writes only new files and folders", path=parent / name)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{next(iter(write))}.ofaconv-", suffix=".tmp", dir=parent))
    try:
        for name, fn in write.items():
            fn(tmp / name)
        kept = set()
        for name in write:
            dest, new = parent / name, tmp / name
            if dest.exists() and not dest.is_dir():
                if not (new.is_file() and filecmp.cmp(dest, new, shallow=False)):
                    raise DataError("exists with other content; synth writes only new files", path=dest)
                kept.add(name)
        for name in write:
            if name not in kept:
                os.replace(tmp / name, parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_parser(subparsers) -> None:
    clip = subparsers.add_parser("clip", help="CLIP towers: BertCLIP / Chinese-CLIP import, LiT training, search, eval",
                                 description=__doc__)
    sub = clip.add_subparsers(dest="clip_command", metavar="CLIP_COMMAND")
    clip.set_defaults(func=lambda args: (clip.print_help(), 2)[1])

    p = sub.add_parser("convert", help="legacy BertCLIP folder or Chinese-CLIP .pt -> CLIP package (+ towers)")
    p.add_argument("src", help="BertCLIP folder, Chinese-CLIP .pt, or a VTDE / ChineseCLIPModel folder")
    p.add_argument("out")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="parity against a reference forward of the source weights (default on)")
    p.add_argument("--arch", help="Chinese-CLIP architecture (RN50 is refused), when the file name does not say")
    p.add_argument("--vocab", help="vocab.txt for Chinese-CLIP (default: ofaconv's BERT-Chinese vocab)")
    p.add_argument("--max-length", type=int, help="text length (default: BertCLIP 100, Chinese-CLIP 52)")
    p.add_argument("--force", action="store_true", help="replace an earlier ofaconv output folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_convert)

    p = sub.add_parser("init", help="new BertCLIP from a CLIP checkpoint (vision) and a BERT checkpoint (text)")
    p.add_argument("--vision", required=True, help="OpenAI-style CLIPModel folder")
    p.add_argument("--text", required=True, help="BERT folder (BertModel or BertForMaskedLM)")
    p.add_argument("out")
    p.add_argument("--max-length", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an earlier ofaconv output folder")
    p.set_defaults(func=_init)

    p = sub.add_parser("train", help="LiT-tune a CLIP package from a YAML recipe (torchrun/accelerate ok)")
    p.add_argument("recipe")
    p.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="set a recipe key (dotted, value parsed as YAML), e.g. training.fp16=false; repeatable")
    p.add_argument("--resume", nargs="?", const=True, default=None, help="resume from the last (or given) checkpoint")
    p.set_defaults(func=_train)

    def model_args(q):
        q.add_argument("model", help="CLIP package folder (or a legacy BertCLIP folder / Chinese-CLIP .pt)")
        q.add_argument("--arch")
        q.add_argument("--vocab")

    p = sub.add_parser("similarity", help="image-text / text-text / image-image similarity over given sets")
    model_args(p)
    p.add_argument("--mode", required=True, choices=["image-text", "text-image", "text-text", "image-image"])
    p.add_argument("--images", nargs="*", default=[], help="image files, folders or glob patterns")
    p.add_argument("--texts", nargs="*", default=[])
    p.add_argument("--candidates", nargs="*", help="same-set modes: compare against this set instead of itself")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_similarity)

    p = sub.add_parser("search", help="index a folder / TSV of images once, answer text queries with top-k")
    model_args(p)
    p.add_argument("--index", required=True, help="index folder")
    p.add_argument("--images", help="image folder or Chinese-CLIP *_imgs.tsv to (incrementally) index")
    p.add_argument("--query", action="append", default=[])
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--embeddings", help="an `ofaconv clip embed` folder to index with faiss (pip install "
                   "'ofaconv[faiss]')")
    p.add_argument("--index-type", choices=["auto", "flat", "ivf", "hnsw"], default="auto",
                   help="--embeddings: flat (exact) below --flat-below vectors, IVF above (default auto)")
    p.add_argument("--flat-below", type=int, default=200_000, help="--embeddings: auto's exact-search limit")
    p.add_argument("--nlist", type=int, help="IVF lists (default 4*sqrt(N))")
    p.add_argument("--nprobe", type=int, help="IVF lists searched per query (default nlist/32, at least 16)")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (default 128)")
    p.add_argument("--recall-queries", type=int, default=100,
                   help="vectors used as queries for the build's recall@10 against exact search (default 100)")
    p.add_argument("--force", action="store_true",
                   help="replace an index ofaconv built from other images or with another model")
    p.set_defaults(func=_search)

    from .embed import add_parser as add_embed

    add_embed(sub)

    p = sub.add_parser("export-bert", help="write the text tower as a BertModel folder (+ sentence-transformers)")
    model_args(p)
    p.add_argument("out")
    p.add_argument("--no-projection", action="store_true", help="leave out the CLIP text projection")
    p.add_argument("--force", action="store_true", help="replace an earlier ofaconv output folder")
    p.set_defaults(func=_export_bert)

    p = sub.add_parser("eval", help="retrieval R@1/5/10 + mean recall, Chinese-CLIP protocol")
    model_args(p)
    p.add_argument("--texts", required=True, help="{split}_texts.jsonl")
    p.add_argument("--images", required=True, help="{split}_imgs.tsv")
    p.add_argument("--context-length", type=int, default=52)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-to-image-only", action="store_true", help="MUGE reports text->image only")
    p.add_argument("--output", help="also write the JSON result here")
    p.set_defaults(func=_eval)

    p = sub.add_parser("download", help="download a text,url,filename CSV's images (timeouts, retries, resume)")
    p.add_argument("csv")
    p.add_argument("image_root")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per socket operation")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds per file, all attempts included")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images with more pixels than this (default: PIL.Image.MAX_IMAGE_PIXELS, "
                        "89478485, the limit ofaconv's image readers apply; 0: no limit)")
    p.add_argument("--failures", help="failure manifest (default IMAGE_ROOT/download_failures.jsonl)")
    p.add_argument("--out-csv", help="write the rows whose image is present and valid")
    p.set_defaults(func=_download)

    p = sub.add_parser("synth", help="synthetic checkpoints in the real formats (tests, benchmarks)")
    p.add_argument("kind", choices=["legacy-bertclip", "cnclip-pt", "openai-clip", "bert"])
    p.add_argument("out")
    p.add_argument("--arch", help="Chinese-CLIP architecture for cnclip-pt")
    p.add_argument("--size", choices=["micro", "base", "full"], default="micro")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="ofaconv")
    add_parser(parser.add_subparsers())
    a = parser.parse_args()
    sys.exit(a.func(a))
