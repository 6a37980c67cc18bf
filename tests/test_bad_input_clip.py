"""Every ``ofaconv clip`` subcommand on bad input: the right non-zero exit, no traceback, exactly one
``ofaconv: error:`` line naming the input (path or path:line), and nothing left where output would
go (no folder, no hidden temp sibling; an existing folder unchanged).

The harness (tests/badinput.py) runs most cases through ``ofaconv.cli.main`` in this process
(start-up is seconds per subprocess); the ones where a crash or abort is the risk run ``python -m
ofaconv`` in a subprocess. Batch cases where some items fail ("partial") still write their result
and exit 2 with a one-line summary naming the first failed item.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from badfiles import write_bad_checkpoint
from badinput import Case, b64_png, check, png
from ofaconv.cli import main
from ofaconv.clip import synth

_png, _b64 = png, b64_png


class Inputs:
    """Bad (and a few good) inputs for every subcommand, written once under ``root``."""

    def __init__(self, root: Path, package: Path, legacy: Path):
        self.root, self.pkg, self.legacy = root, package, legacy
        self.out = root / "out"  # never created by a passing case
        self.missing = root / "missing"
        self.good = _png(root / "good.png")
        self.good2 = _png(root / "good2.png", "blue")
        self.broken = root / "broken.png"
        self.broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        self.user_dir = root / "user_dir"  # a folder ofaconv did not write
        self.user_dir.mkdir()
        (self.user_dir / "notes.txt").write_text("mine")
        # -- checkpoints
        self.empty_pt = root / "empty" / "clip_cn_vit-b-16.pt"
        self.empty_pt.parent.mkdir()
        self.empty_pt.write_bytes(b"")
        self.random_pt = root / "random" / "clip_cn_vit-b-16.pt"
        self.random_pt.parent.mkdir()
        write_bad_checkpoint(self.random_pt, "random_bytes")
        self.evil_pt = root / "evil" / "clip_cn_vit-b-16.pt"
        self.evil_pt.parent.mkdir()
        self.marker = write_bad_checkpoint(self.evil_pt, "malicious_pickle").marker
        self.bad_config = self._legacy_copy("bad_config")
        (self.bad_config / "config.json").write_text("{not json")
        self.nan_legacy = self._legacy_copy("nan")
        state = torch.load(self.nan_legacy / "pytorch_model.bin", weights_only=True)
        state["text_projection.weight"][0, 0] = float("nan")
        torch.save(state, self.nan_legacy / "pytorch_model.bin")
        self.short_table = self._legacy_copy("short_table")
        cfg = json.loads((self.short_table / "config.json").read_text())
        cfg["text_config"]["max_position_embeddings"] = 16
        (self.short_table / "config.json").write_text(json.dumps(cfg))
        state = torch.load(self.short_table / "pytorch_model.bin", weights_only=True)
        state["text_model.embeddings.position_embeddings.weight"] = state["text_model.embeddings.position_embeddings.weight"][:16].clone()
        state["text_model.embeddings.position_ids"] = state["text_model.embeddings.position_ids"][:, :16].clone()
        torch.save(state, self.short_table / "pytorch_model.bin")
        self.clip_folder = synth.write_openai_clip(root / "openai_clip")
        self.bert = synth.write_bert(root / "bert")
        # -- recipes and training data
        self.recipe_bad_yaml = root / "bad_yaml.yaml"
        self.recipe_bad_yaml.write_text("model: [unclosed\n")
        self.recipe_unknown = self._recipe("unknown", {"csv": "pairs.csv"}, extra="lit: {lock_images: true}\n")
        (root / "pairs.csv").write_text("text,filename\n红色,good.png\n", encoding="utf-8")
        (root / "latin1.csv").write_bytes("text,filename\nok,good.png\ncaf\xe9,good.png\n".encode("latin-1"))
        self.recipe_latin1 = self._recipe("latin1", {"csv": "latin1.csv"})
        (root / "wrong_header.csv").write_text("caption,file\na,good.png\n")
        self.recipe_header = self._recipe("header", {"csv": "wrong_header.csv"})
        # -- Chinese-CLIP eval files
        self.tsv = root / "test_imgs.tsv"
        self.tsv.write_text(f"1\t{_b64('red')}\n2\t{_b64('blue')}\n")
        self.tsv_no_tab = root / "notab_imgs.tsv"
        self.tsv_no_tab.write_text("just text, no tab\n")
        self.texts_latin1 = root / "latin1_texts.jsonl"
        self.texts_latin1.write_bytes('{"text_id": 1, "text": "caf\xe9", "image_ids": [1]}\n'.encode("latin-1"))
        self.texts_partial = root / "partial_texts.jsonl"
        self.texts_partial.write_text('{"text_id": 1, "text": "红色", "image_ids": [1]}\n{broken\n'
                                      '{"text_id": 3, "text": "蓝色", "image_ids": [2]}\n', encoding="utf-8")
        self.texts_unknown = root / "unknown_texts.jsonl"
        self.texts_unknown.write_text('{"text_id": 1, "text": "红色", "image_ids": [99]}\n')
        # -- search
        self.photos = root / "photos"
        self.photos.mkdir()
        _png(self.photos / "a.png")
        self.photos_bad = root / "photos_bad"
        self.photos_bad.mkdir()
        _png(self.photos_bad / "a.png")
        (self.photos_bad / "b.png").write_bytes(b"junk")
        self.index_other = root / "index_other"  # an index of other images
        assert main(["clip", "search", str(package), "--index", str(self.index_other), "--images",
                     str(self.photos_bad)]) == 2
        self.index_corrupt = root / "index_corrupt"
        self.index_corrupt.mkdir()
        (self.index_corrupt / "index.json").write_text("{oops")
        # -- embed (catalog runs)
        self.image_list = root / "images.txt"
        self.image_list.write_text(f"{self.good}\n")
        self.list_latin1 = root / "latin1_list.txt"
        self.list_latin1.write_bytes(f"{self.good}\ncaf\xe9.png\n".encode("latin-1"))
        self.emb_run = root / ".emb_other.ofaconv-run"  # an unfinished run of another command
        self.emb_run.mkdir()
        (self.emb_run / "run.json").write_text(json.dumps({"schema": "ofaconv/catalog-run@1", "command": "caption"}))
        # -- download
        self.csv_file_url = root / "file_urls.csv"
        self.csv_file_url.write_text(f"text,url,filename\na,{self.good.as_uri()},a.png\n")
        self.csv_no_url = root / "no_url.csv"
        self.csv_no_url.write_text("text,filename\na,a.png\n")
        self.csv_latin1 = root / "latin1_urls.csv"
        self.csv_latin1.write_bytes("text,url,filename\ncaf\xe9,http://127.0.0.1:9/a.png,a.png\n".encode("latin-1"))

    def _legacy_copy(self, name: str) -> Path:
        return synth.write_legacy_bertclip(self.root / name)

    def _recipe(self, name: str, train: dict, extra: str = "") -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(f"model: {self.pkg}\noutput_dir: out\ndata:\n  train: {json.dumps(train)}\n{extra}"
                        "training: {use_cpu: true, num_train_epochs: 1, per_device_train_batch_size: 2, "
                        "report_to: []}\n")
        return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, bertclip_verified_folder):
    return Inputs(tmp_path_factory.mktemp("bad_clip"), bertclip_verified_folder,
                  bertclip_verified_folder.parent / "bertclip")


def _sim(i, *extra):
    return ["clip", "similarity", str(i.pkg), *extra]


CASES = [
    # -- convert
    Case("convert-missing-source", lambda i: ["clip", "convert", str(i.missing / "x.pt"), str(i.out)],
         lambda i: str(i.missing / "x.pt"), lambda i: i.out),
    Case("convert-empty-pt", lambda i: ["clip", "convert", str(i.empty_pt), str(i.out)], lambda i: str(i.empty_pt),
         lambda i: i.out),
    Case("convert-random-bytes", lambda i: ["clip", "convert", str(i.random_pt), str(i.out)],
         lambda i: str(i.random_pt), lambda i: i.out),
    Case("convert-malicious-pickle", lambda i: ["clip", "convert", str(i.evil_pt), str(i.out)],
         lambda i: str(i.evil_pt), lambda i: i.out, subprocess=True),
    Case("convert-config-not-json", lambda i: ["clip", "convert", str(i.bad_config), str(i.out)],
         lambda i: str(i.bad_config / "config.json"), lambda i: i.out),
    Case("convert-nan-weight", lambda i: ["clip", "convert", str(i.nan_legacy), str(i.out)],
         lambda i: "text_projection.weight", lambda i: i.out),
    Case("convert-max-length-above-position-table",
         lambda i: ["clip", "convert", str(i.short_table), str(i.out), "--max-length", "40"],
         lambda i: f"{i.short_table / 'config.json'}: key 'text_config.max_position_embeddings'", lambda i: i.out),
    Case("convert-max-length-1", lambda i: ["clip", "convert", str(i.legacy), str(i.out), "--max-length", "1"],
         lambda i: str(i.legacy / "config.json"), lambda i: i.out),
    Case("convert-into-a-user-folder", lambda i: ["clip", "convert", str(i.legacy), str(i.user_dir), "--force"],
         lambda i: str(i.user_dir), lambda i: i.user_dir),
    # -- init
    Case("init-missing-vision", lambda i: ["clip", "init", "--vision", str(i.missing), "--text", str(i.bert), str(i.out)],
         lambda i: str(i.missing), lambda i: i.out),
    Case("init-text-is-not-bert", lambda i: ["clip", "init", "--vision", str(i.clip_folder), "--text",
                                             str(i.clip_folder), str(i.out)],
         lambda i: str(i.clip_folder / "config.json"), lambda i: i.out),
    Case("init-vision-config-not-json", lambda i: ["clip", "init", "--vision", str(i.bad_config), "--text",
                                                   str(i.bert), str(i.out)],
         lambda i: str(i.bad_config / "config.json"), lambda i: i.out),
    # -- train
    Case("train-missing-recipe", lambda i: ["clip", "train", str(i.missing / "r.yaml")],
         lambda i: str(i.missing / "r.yaml")),
    Case("train-recipe-not-yaml", lambda i: ["clip", "train", str(i.recipe_bad_yaml)], lambda i: str(i.recipe_bad_yaml)),
    Case("train-recipe-unknown-key", lambda i: ["clip", "train", str(i.recipe_unknown)],
         lambda i: str(i.recipe_unknown), lambda i: i.root / "out"),
    Case("train-data-not-utf8", lambda i: ["clip", "train", str(i.recipe_latin1)], lambda i: f"{i.root / 'latin1.csv'}:3",
         lambda i: i.root / "out"),
    Case("train-data-wrong-header", lambda i: ["clip", "train", str(i.recipe_header)],
         lambda i: str(i.root / "wrong_header.csv"), lambda i: i.root / "out"),
    # -- similarity
    Case("similarity-missing-model", lambda i: ["clip", "similarity", str(i.missing), "--mode", "text-text",
                                                "--texts", "a", "b"], lambda i: str(i.missing)),
    Case("similarity-only-broken-images", lambda i: _sim(i, "--mode", "image-image", "--images", str(i.broken),
                                                         str(i.good)),
         lambda i: str(i.broken)),
    Case("similarity-pattern-matches-nothing", lambda i: _sim(i, "--mode", "image-text", "--images",
                                                              str(i.root / "nothing*.png"), "--texts", "a"),
         lambda i: str(i.root / "nothing*.png")),
    Case("similarity-one-broken-image", lambda i: _sim(i, "--mode", "image-text", "--images", str(i.good),
                                                       str(i.broken), "--texts", "红色", "蓝色"),
         lambda i: str(i.broken), partial=True),
    # -- search
    Case("search-missing-images", lambda i: ["clip", "search", str(i.pkg), "--index", str(i.out), "--images",
                                             str(i.missing)], lambda i: str(i.missing), lambda i: i.out),
    Case("search-into-a-user-folder", lambda i: ["clip", "search", str(i.pkg), "--index", str(i.user_dir),
                                                 "--images", str(i.photos), "--force"],
         lambda i: str(i.user_dir), lambda i: i.user_dir),
    Case("search-over-another-index", lambda i: ["clip", "search", str(i.pkg), "--index", str(i.index_other),
                                                 "--images", str(i.photos)],
         lambda i: str(i.index_other / "index.json"), lambda i: i.index_other),
    Case("search-corrupt-index", lambda i: ["clip", "search", str(i.pkg), "--index", str(i.index_corrupt),
                                            "--query", "红色"], lambda i: str(i.index_corrupt / "index.json"),
         lambda i: i.index_corrupt),
    Case("search-query-without-index", lambda i: ["clip", "search", str(i.pkg), "--index", str(i.out),
                                                  "--query", "红色"], lambda i: str(i.out), lambda i: i.out),
    Case("search-a-broken-image", lambda i: ["clip", "search", str(i.pkg), "--index", str(i.root / "idx"), "--images",
                                             str(i.photos_bad)],
         lambda i: str(i.photos_bad / "b.png"), partial=True),
    # -- export-bert
    Case("search-embeddings-not-an-embeddings-folder",
         lambda i: ["clip", "search", str(i.pkg), "--index", str(i.out), "--embeddings", str(i.user_dir)],
         lambda i: str(i.user_dir), lambda i: i.out),
    Case("search-both-images-and-embeddings",
         lambda i: ["clip", "search", str(i.pkg), "--index", str(i.out), "--embeddings", str(i.user_dir), "--images",
                    str(i.photos)], lambda i: "--embeddings", lambda i: i.out),
    # -- embed
    Case("embed-missing-model", lambda i: ["clip", "embed", str(i.missing), str(i.good), "--out", str(i.out)],
         lambda i: str(i.missing), lambda i: i.out),
    Case("embed-into-a-user-folder", lambda i: ["clip", "embed", str(i.pkg), str(i.good), "--out", str(i.user_dir)],
         lambda i: str(i.user_dir), lambda i: i.user_dir),
    Case("embed-out-is-an-input", lambda i: ["clip", "embed", str(i.pkg), str(i.photos), "--out", str(i.photos)],
         lambda i: str(i.photos), lambda i: i.photos),
    Case("embed-missing-list", lambda i: ["clip", "embed", str(i.pkg), "--list", str(i.missing / "l.txt"), "--out",
                                          str(i.out)], lambda i: str(i.missing / "l.txt"), lambda i: i.out),
    Case("embed-list-not-utf8", lambda i: ["clip", "embed", str(i.pkg), "--list", str(i.list_latin1), "--out",
                                           str(i.out)], lambda i: f"{i.list_latin1}:2", lambda i: i.out),
    Case("embed-missing-tsv", lambda i: ["clip", "embed", str(i.pkg), "--tsv", str(i.missing / "t.tsv"), "--out",
                                         str(i.out)], lambda i: str(i.missing / "t.tsv"), lambda i: i.out),
    Case("embed-zero-batch-size", lambda i: ["clip", "embed", str(i.pkg), "--list", str(i.image_list), "--out",
                                             str(i.out), "--batch-size", "0"], lambda i: "--batch-size",
         lambda i: i.out),
    Case("embed-no-images", lambda i: ["clip", "embed", str(i.pkg), "--out", str(i.out)], lambda i: "--list FILE",
         lambda i: i.out),
    Case("embed-over-another-commands-run", lambda i: ["clip", "embed", str(i.pkg), str(i.good), "--out",
                                                       str(i.root / "emb_other")],
         lambda i: (str(i.emb_run), "--restart"), lambda i: i.emb_run),
    Case("embed-a-broken-image", lambda i: ["clip", "embed", str(i.pkg), str(i.photos_bad), "--out",
                                            str(i.root / "emb_partial"), "--no-progress"],
         lambda i: str(i.photos_bad / "b.png"), partial=True),
    Case("export-bert-into-a-user-folder", lambda i: ["clip", "export-bert", str(i.pkg), str(i.user_dir), "--force"],
         lambda i: str(i.user_dir), lambda i: i.user_dir),
    Case("export-bert-from-a-bert-folder", lambda i: ["clip", "export-bert", str(i.bert), str(i.out)],
         lambda i: str(i.bert), lambda i: i.out),
    Case("export-bert-missing-model", lambda i: ["clip", "export-bert", str(i.missing), str(i.out)],
         lambda i: str(i.missing), lambda i: i.out),
    # -- eval
    Case("eval-texts-not-utf8", lambda i: ["clip", "eval", str(i.pkg), "--texts", str(i.texts_latin1), "--images",
                                           str(i.tsv), "--output", str(i.out)],
         lambda i: f"{i.texts_latin1}:1", lambda i: i.out),
    Case("eval-a-malformed-line", lambda i: ["clip", "eval", str(i.pkg), "--texts", str(i.texts_partial), "--images",
                                             str(i.tsv)], lambda i: f"{i.texts_partial}:2", partial=True),
    Case("eval-images-not-a-tsv", lambda i: ["clip", "eval", str(i.pkg), "--texts", str(i.texts_partial),
                                             "--images", str(i.tsv_no_tab), "--output", str(i.out)],
         lambda i: str(i.tsv_no_tab), lambda i: i.out),
    Case("eval-unknown-image-id", lambda i: ["clip", "eval", str(i.pkg), "--texts", str(i.texts_unknown),
                                             "--images", str(i.tsv), "--output", str(i.out)],
         lambda i: f"{i.texts_unknown}:1", lambda i: i.out),
    Case("eval-missing-texts", lambda i: ["clip", "eval", str(i.pkg), "--texts", str(i.missing / "t.jsonl"),
                                          "--images", str(i.tsv)], lambda i: str(i.missing / "t.jsonl")),
    Case("eval-output-is-an-input", lambda i: ["clip", "eval", str(i.pkg), "--texts", str(i.texts_partial),
                                               "--images", str(i.tsv), "--output", str(i.texts_partial)],
         lambda i: str(i.texts_partial), lambda i: i.texts_partial),
    Case("eval-output-folder-missing", lambda i: ["clip", "eval", str(i.pkg), "--texts", str(i.texts_partial),
                                                  "--images", str(i.tsv), "--output", str(i.missing / "r.json")],
         lambda i: str(i.missing), lambda i: i.missing),
    # -- download
    Case("download-missing-csv", lambda i: ["clip", "download", str(i.missing / "u.csv"), str(i.out)],
         lambda i: str(i.missing / "u.csv"), lambda i: i.out),
    Case("download-csv-without-url", lambda i: ["clip", "download", str(i.csv_no_url), str(i.out)],
         lambda i: str(i.csv_no_url), lambda i: i.out),
    Case("download-csv-not-utf8", lambda i: ["clip", "download", str(i.csv_latin1), str(i.out)],
         lambda i: f"{i.csv_latin1}:2", lambda i: i.out),
    Case("download-image-root-is-a-file", lambda i: ["clip", "download", str(i.csv_file_url), str(i.good)],
         lambda i: str(i.good), lambda i: i.good),
    Case("download-out-csv-is-the-input", lambda i: ["clip", "download", str(i.csv_file_url), str(i.out),
                                                     "--out-csv", str(i.csv_file_url)],
         lambda i: str(i.csv_file_url), lambda i: i.csv_file_url),
    Case("download-file-url", lambda i: ["clip", "download", str(i.csv_file_url), str(i.root / "dl"), "--retries", "0"],
         lambda i: f"{i.csv_file_url}:2", partial=True, subprocess=True),
    # -- synth
    Case("synth-into-a-user-folder", lambda i: ["clip", "synth", "legacy-bertclip", str(i.user_dir)],
         lambda i: str(i.user_dir), lambda i: i.user_dir),
    Case("synth-over-a-file", lambda i: ["clip", "synth", "cnclip-pt", str(i.good)],
         lambda i: str(i.good), lambda i: i.good),
    Case("synth-under-a-file", lambda i: ["clip", "synth", "bert", str(i.good / "bert")],
         lambda i: str(i.good), lambda i: i.good),
    Case("synth-unknown-arch", lambda i: ["clip", "synth", "cnclip-pt", str(i.out), "--arch", "ViT-Z-99"],
         lambda i: "ViT-Z-99", lambda i: i.out),
    Case("synth-full-size-bertclip", lambda i: ["clip", "synth", "legacy-bertclip", str(i.out), "--size", "full"],
         lambda i: "--size full", lambda i: i.out),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, inputs, capfd, monkeypatch):
    check(case, inputs, capfd, monkeypatch)


def test_the_table_covers_every_clip_subcommand(inputs):
    import argparse

    from ofaconv.clip.cli import add_parser

    def subcommands(parser) -> dict:
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert set(subcommands(subcommands(parser)["clip"])) == {c.argv(inputs)[1] for c in CASES}
    assert len(CASES) >= 25
