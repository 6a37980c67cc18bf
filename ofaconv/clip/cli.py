"""``ofaconv clip ...``: convert, init, train, similarity, search, export-bert, eval, download, synth."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_parser"]


def _print(obj, as_json: bool = True) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


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
    from ofaconv.core.errors import OfaconvError
    from .similarity import similarity

    towers = _towers(args)
    kinds = args.mode.split("-")
    sets = {"image": args.images, "text": args.texts}
    if kinds[0] == kinds[1]:
        queries, candidates = sets[kinds[0]], (args.candidates or None)
    else:
        queries, candidates = sets[kinds[0]], sets[kinds[1]]
    if not queries:
        raise OfaconvError(f"mode {args.mode} needs --{kinds[0]}s")
    result = similarity(towers, args.mode, queries, candidates)
    if args.json:
        _print(result.to_dict())
        return 0
    note = " (self excluded)" if result.self_excluded else ""
    print(f"# {args.mode}: softmax over candidates of exp({result.logit_scale:.4f}) * cosine{note}; probabilities are "
          "relative to this candidate set")
    for i, q in enumerate(result.queries):
        print(q)
        for j, prob, cos in result.ranked(i)[: args.top]:
            print(f"  {prob:8.4f}  cos {cos:+.4f}  {result.candidates[j]}")
    return 0


def _search(args) -> int:
    from ofaconv.core.errors import OfaconvError
    from .search import build_index, query_index

    towers = _towers(args)
    out = {}
    if args.images:
        out["index"] = build_index(towers, args.images, args.index, batch_size=args.batch_size)
    if args.query:
        out["queries"] = query_index(towers, args.index, args.query, k=args.k)
    if not out:
        raise OfaconvError("nothing to do: pass --images to (re)build the index and/or --query")
    _print(out)
    return 0


def _export_bert(args) -> int:
    from .export import export_bert

    _print(export_bert(args.model, args.out, with_projection=not args.no_projection, force=args.force,
                       arch=args.arch, vocab=args.vocab))
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate_retrieval

    towers = _towers(args)
    directions = ("text_to_image",) if args.text_to_image_only else ("text_to_image", "image_to_text")
    result = evaluate_retrieval(towers, Path(args.texts), Path(args.images), context_length=args.context_length,
                                batch_size=args.batch_size, directions=directions)
    result["model"] = str(args.model)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    _print(result)
    return 0


def _download(args) -> int:
    from .download import download_images

    _print(download_images(args.csv, args.image_root, workers=args.workers, timeout=args.timeout, retries=args.retries,
                           deadline=args.deadline, failures=args.failures, out_csv=args.out_csv))
    return 0


def _synth(args) -> int:
    from . import synth

    out = Path(args.out)
    if args.kind == "legacy-bertclip":
        path = synth.write_legacy_bertclip(out, size=args.size, seed=args.seed)
    elif args.kind == "openai-clip":
        path = synth.write_openai_clip(out, size=args.size, seed=args.seed)
    elif args.kind == "bert":
        path = synth.write_bert(out, size=args.size, seed=args.seed)
    else:
        path = synth.write_cnclip_pt(out, args.arch or "ViT-B-16", micro=args.size == "micro", seed=args.seed)
        synth.write_vocab(path.parent / "vocab.txt") if args.size == "micro" else None
    print(path)
    return 0


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
    p.add_argument("--images", nargs="*", default=[])
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
    p.set_defaults(func=_search)

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
