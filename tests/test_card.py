"""Model card of a converted folder: metadata, provenance, parity table, usage snippets."""

import ast
import json
import re

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load

from fakehub import make_converted_folder
from ofaconv.core.errors import OfaconvError
from ofaconv.hub.card import CARD_MARKER, build_model_card, card_for_repo, write_model_card


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("family, language", [("cn", "zh"), ("en", "en")])
def test_metadata(tmp_path, family, language):
    folder = make_converted_folder(tmp_path / "out", family=family)
    path = write_model_card(folder)
    meta = metadata_load(path)
    assert meta["language"] == language
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert {"ofa", "ofaconv"} <= set(meta["tags"])
    assert "base_model" not in meta  # a pure conversion names no base model unless told


def test_metadata_options(tmp_path):
    folder = make_converted_folder(tmp_path / "out")
    card = build_model_card(folder, license="mit", base_model="OFA-Sys/ofa-base", extra_tags=("muge", "ofa"))
    assert card.data.license == "mit"
    assert card.data.base_model == "OFA-Sys/ofa-base"
    assert card.data.tags.count("ofa") == 1 and "muge" in card.data.tags
    reloaded = ModelCard(str(card))  # the YAML block round-trips through the card parser
    assert reloaded.data.to_dict() == card.data.to_dict()


def test_family_from_vocabulary_when_report_has_none(tmp_path):
    folder = make_converted_folder(tmp_path / "out", family="cn")
    report = json.loads((folder / "conversion_report.json").read_text())
    report["family"] = None
    (folder / "conversion_report.json").write_text(json.dumps(report))
    assert build_model_card(folder).data.language == "zh"  # vocab_size 30325 is OFA-CN's


def test_source_and_parity_table(tmp_path):
    folder = make_converted_folder(tmp_path / "out")
    text = build_model_card(folder).text
    report = json.loads((folder / "conversion_report.json").read_text())
    assert "`ofa_cn_base.pt`" in text and report["source"]["sha256"] in text
    assert "`ofa-cn-base`" in text and "| `disable_entangle` | `true` |" in text
    assert "<summary>Checkpoint flags (2)</summary>" in text
    assert report["files"]["model.safetensors"]["sha256"] in text
    assert "All 2 checks passed" in text
    assert "| encoder_states | max_abs_diff | 0 | 1e-05 | passed | 2 samples |" in text
    assert "| logits | max_abs_diff | 2.4e-07 | 1e-05 | passed | teacher-forced, 7 steps |" in text


def test_failed_check_is_shown(tmp_path):
    checks = [{"name": "logits", "passed": False, "metric": "max_abs_diff", "value": 0.25, "gate": 1e-5}]
    text = build_model_card(make_converted_folder(tmp_path / "out", checks=checks)).text
    assert "1 of 1 checks failed" in text and "'logits' (max_abs_diff 0.25, gate 1e-05)" in text
    assert "| logits | max_abs_diff | 0.25 | 1e-05 | **failed** |  |" in text


def test_folder_without_report_says_unverified(tmp_path):
    folder = make_converted_folder(tmp_path / "out")
    (folder / "conversion_report.json").unlink()
    text = build_model_card(folder).text
    assert "Not verified" in text and "were not checked" in text


def test_usage_snippets(tmp_path):
    folder = make_converted_folder(tmp_path / "out")
    text = build_model_card(folder, repo_id="YeungNLP/ofa-cn-base-muge").text
    remote, native = _code_blocks(text)
    for block in (remote, native):
        ast.parse(block)  # both snippets are valid Python
        assert "YeungNLP/ofa-cn-base-muge" in block
    assert "AutoModelForSeq2SeqLM.from_pretrained(repo, trust_remote_code=True)" in remote
    assert "AutoProcessor.from_pretrained(repo, trust_remote_code=True)" in remote
    assert "model.generate(**inputs)" in remote  # settings come from generation_config.json
    assert "图片描述了什么内容?" in remote  # the CN prompt the processor uses by default
    assert native.startswith("import ofaconv")
    assert "trust_remote_code" not in native and "AutoProcessor.from_pretrained(" in native
    assert "# ofa-cn-base-muge" in text


def test_usage_without_repo_id_or_processor(tmp_path):
    folder = make_converted_folder(tmp_path / "out", family="en", processor=False)
    (folder / "generation_config.json").unlink()
    remote, native = _code_blocks(build_model_card(folder).text)
    assert 'from_pretrained("path/to/converted-folder", trust_remote_code=True)' in remote
    assert "AutoProcessor" not in remote + native and "patch_images" in remote


def test_usage_generation_args_from_family_without_generation_config(tmp_path):
    folder = make_converted_folder(tmp_path / "out", family="en")
    (folder / "generation_config.json").unlink()
    remote, _ = _code_blocks(build_model_card(folder).text)
    assert "model.generate(**inputs, num_beams=5, max_new_tokens=16, no_repeat_ngram_size=3)" in remote


def test_title_does_not_come_from_a_temporary_folder(tmp_path):
    # The converter writes the card inside ".out.xyz.tmp" before renaming it into place.
    folder = make_converted_folder(tmp_path / ".out.abc123.tmp", variant=None)
    report = json.loads((folder / "conversion_report.json").read_text())
    report["flags"]["_defaulted"] = ["bpe"]
    (folder / "conversion_report.json").write_text(json.dumps(report))
    text = build_model_card(folder).text
    assert "# ofa_cn_base\n" in text and ".tmp" not in text and "_defaulted" not in text


def test_write_replaces_atomically(tmp_path):
    folder = make_converted_folder(tmp_path / "out")
    (folder / "README.md").write_text("old")
    write_model_card(folder)
    assert (folder / "README.md").read_text(encoding="utf-8").startswith("---\n")
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("config, message", [
    (None, "config.json: missing"),
    ("{not json", "config.json: not valid JSON"),
    ('{"model_type": "bart"}', "config.json: key 'model_type': model_type is 'bart', expected 'ofa'"),
])
def test_bad_config(tmp_path, config, message):
    folder = make_converted_folder(tmp_path / "out")
    if config is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(config)
    with pytest.raises(OfaconvError, match=re.escape(message)):
        build_model_card(folder)


def test_card_for_repo(tmp_path):
    folder = make_converted_folder(tmp_path / "out")
    # no README: built for the repo
    assert "acme/ofa" in str(card_for_repo(folder, "acme/ofa"))
    # a card ofaconv wrote: rebuilt for the repo, keeping what the user chose
    write_model_card(folder, license="mit", base_model="OFA-Sys/ofa-base", extra_tags=["muge"])
    card = card_for_repo(folder, "acme/ofa")
    assert CARD_MARKER in card.text and 'repo = "acme/ofa"' in card.text
    assert (card.data.license, card.data.base_model) == ("mit", "OFA-Sys/ofa-base")
    assert card.data.tags == ["ofa", "ofaconv", "image-captioning", "muge"]
    # a card without the marker belongs to the user: left alone
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# my own card\n")
    assert card_for_repo(folder, "acme/ofa") is None


# -- any family: the card comes from the family's hooks; hub imports no family ---------------------


def test_hub_imports_no_family():
    import pathlib

    import ofaconv.hub

    for path in pathlib.Path(ofaconv.hub.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("ofaconv.ofa", "ofaconv.clip")), f"{path.name} imports {name}"
                assert not (isinstance(node, ast.ImportFrom) and node.level > 1), f"{path.name}: relative import"


CLIP_CARDS = [
    ("", "zero-shot-image-classification", "transformers"),
    ("vision_tower", "image-feature-extraction", "transformers"),
    ("text_tower", "feature-extraction", "sentence-transformers"),
]


@pytest.mark.parametrize("family", ["bertclip", "cnclip"])
@pytest.mark.parametrize("sub, pipeline, library", CLIP_CARDS, ids=["root", "vision_tower", "text_tower"])
def test_clip_card(request, family, sub, pipeline, library):
    folder = request.getfixturevalue(f"{family}_verified_folder")
    card = build_model_card(folder / sub if sub else folder, repo_id="alice/clip-part")
    assert card.data.pipeline_tag == pipeline and card.data.library_name == library
    assert card.data.language == "zh" and {"clip", "ofaconv"} <= set(card.data.tags)
    report = json.loads((folder / "conversion_report.json").read_text())
    assert f"All {len(report['checks'])} checks passed" in card.text and report["source"]["sha256"] in card.text
    listed = {name[len(sub) + 1:] if sub else name: entry for name, entry in report["files"].items()
              if not sub or name.startswith(sub + "/")}
    for name, entry in listed.items():  # the files table lists this folder's part of the manifest
        assert f"| `{name}` |" in card.text and entry["sha256"] in card.text
    if sub:
        assert "| `config.json` |" in card.text and "| `README.md` |" not in card.text
    else:
        written = metadata_load(folder / "README.md")  # the card convert wrote, in the manifest
        assert written["pipeline_tag"] == pipeline and "README.md" in report["files"]


@pytest.mark.parametrize("family", ["bertclip", "cnclip"])
@pytest.mark.parametrize("sub", ["", "vision_tower", "text_tower"], ids=["root", "vision_tower", "text_tower"])
def test_clip_card_snippet_runs(request, tmp_path, monkeypatch, family, sub):
    from PIL import Image

    folder = request.getfixturevalue(f"{family}_verified_folder")
    folder = folder / sub if sub else folder
    (snippet,) = _code_blocks(build_model_card(folder, repo_id="alice/clip-part").text)
    assert snippet.count('"alice/clip-part"') >= 1
    Image.new("RGB", (40, 30), (20, 200, 30)).save(tmp_path / "image.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet.replace('"alice/clip-part"', repr(str(folder))), "card-snippet", "exec"), {})


def test_card_of_an_unknown_model_type(tmp_path):
    folder = make_converted_folder(tmp_path / "out")
    report = json.loads((folder / "conversion_report.json").read_text())
    del report["model_family"]
    (folder / "conversion_report.json").write_text(json.dumps(report))
    (folder / "config.json").write_text('{"model_type": "bart"}')
    with pytest.raises(OfaconvError, match=r"config.json: model_type 'bart' belongs to no ofaconv family"):
        build_model_card(folder)
