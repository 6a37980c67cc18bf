"""OFA tokenizers: fairseq ids (test vectors + independent reference tokenizers), layout, sources,
save / AutoTokenizer round trip, caption decoding."""

import json
import shutil
import unicodedata
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import pytest
import regex
import yaml

from ofaconv.ofa import tokenization
from ofaconv.core.errors import OfaconvError
from ofaconv.ofa.modeling.tokenization_ofa import join_cjk_spaces
from ofaconv.ofa.tokenization import (
    build_tokenizer,
    decode_caption,
    decode_captions,
    non_text_token_ids,
    read_vocabulary,
    save_tokenizer,
    text_token_mask,
    vocab_layout,
)

DATA = Path(str(files("ofaconv.data")))

EN_PROMPT_IDS = [0, 99, 473, 5, 2274, 6190, 116, 2]
CN_PROMPT_IDS = [0, 1749, 4279, 2993, 6839, 753, 788, 724, 1083, 2163, 140, 2]

EN_CORPUS = [
    " what does the image describe?",
    "what does the image describe?",
    " a man riding a wave on top of a surfboard.",
    "Two dogs   playing\tin the\nsnow, don't they? I'll see; we're 100% sure they've 3.14 balls!!",
    " Café naïve résumé — “quoted” ‘text’ … ½ ² 🐱🐶 日本語 中文 한국어",
    "  leading spaces and trailing   ",
    "literal angle brackets <s > and tags <div> x</div> <code 5> <bin_x>",
    "e-mail: someone@example.com, url https://example.org/a?b=c&d=e#f",
    "supercalifragilisticexpialidocious " * 3,
    "\u00a0non-breaking\u2009thin\u200bzero-width\u3000ideographic space",
    "12345678901234567890 1,000,000.50 $5 €10 ¥20",
]

CN_CORPUS = [
    "图片描述了什么内容?",
    "图片描述了什么?",
    "一个穿着红色衣服的女孩在公园里放风筝。",
    "红色的iPhone 13手机，很好用！",
    "Apple iPhone 13 Pro Max 256GB 全网通5G手机",
    "ＡＢＣ全角字母１２３和，。！？「」、标点",
    "Café NAÏVE Résumé über straße",
    "emoji 🐱 and ☃ snowman, 𠀀 rare ideograph",
    "[MASK] [CLS] [SEP] [PAD] [UNK] [mask] kept or split",
    "tabs\tnew\nlines\r\n and\u00a0nbsp\u200bzero width\x00null\x07bell",
    "a" * 101 + " x" + " " + "unaffordable",
    "日本語のテキストとカタカナ、한국어 텍스트",
    "don't can't it's 1,000.50 元 3.14",
]


@pytest.fixture(scope="module")
def en():
    return build_tokenizer("en")


@pytest.fixture(scope="module")
def cn():
    return build_tokenizer("cn")


@pytest.fixture(scope="module")
def tokenizers(en, cn):
    return {"en": en, "cn": cn}


# ---------------------------------------------------------------------------------------------
# Independent references: fairseq's BPE + Dictionary, written from the algorithms.


def _bytes_to_unicode():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def _gpt2_tables():
    encoder = json.loads((DATA / "gpt2_encoder.json").read_text(encoding="utf-8"))
    merges = (DATA / "gpt2_merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(line.split(" ")): i for i, line in enumerate(m for m in merges if m)}
    words = [line.rsplit(" ", 1)[0] for line in (DATA / "ofa_en_dict.txt").read_text(encoding="utf-8").split("\n") if line]
    fairseq_id = {w: 4 + k for k, w in enumerate(words)}
    return encoder, ranks, fairseq_id


def _bpe(word: str, ranks) -> list[str]:
    parts = list(word)
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def fairseq_en_ids(text: str) -> list[int]:
    """GPT2BPE.encode -> 'gpt2 ids' -> Dictionary.encode_line, with bos/eos."""
    encoder, ranks, fairseq_id = _gpt2_tables()
    byte_encoder = _bytes_to_unicode()
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids = []
    for piece in pattern.findall(text):
        word = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
        ids.extend(fairseq_id[str(encoder[token])] for token in _bpe(word, ranks))
    return [0, *ids, 2]


@lru_cache(maxsize=1)
def _bert_vocab():
    lines = (DATA / "bert_chinese_vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    return {token: 4 + k for k, token in enumerate(lines)}


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                            (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)])


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or unicodedata.category(ch).startswith("P")


def _basic_tokens(text: str) -> list[str]:
    cleaned = []
    for ch in text:
        cp = ord(ch)
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            cleaned.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk(cp):
            cleaned.append(f" {ch} ")
        else:
            cleaned.append(ch)
    tokens = []
    for word in "".join(cleaned).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        current = ""
        for ch in word:
            if _is_punct(ch):
                tokens += [current, ch] if current else [ch]
                current = ""
            else:
                current += ch
        if current:
            tokens.append(current)
    return tokens


def _wordpiece(word: str, vocab) -> list[str]:
    if len(word) > 100:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = ("##" if start else "") + word[start:end]
            if piece in vocab:
                break
            end -= 1
        if end == start:
            return ["[UNK]"]
        pieces.append(piece)
        start = end
    return pieces


def fairseq_cn_ids(text: str) -> list[int]:
    """BertBPE.encode (BertTokenizer, lower-case; its specials kept whole) -> Dictionary ids."""
    vocab = _bert_vocab()
    chunks = regex.split(r"(\[PAD\]|\[UNK\]|\[CLS\]|\[SEP\]|\[MASK\])", text)
    ids = []
    for chunk in chunks:
        if chunk in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            ids.append(vocab[chunk])
            continue
        for word in _basic_tokens(chunk):
            ids.extend(vocab[piece] for piece in _wordpiece(word, vocab))
    return [0, *ids, 2]


# ---------------------------------------------------------------------------------------------
# Test vectors and layout


def test_english_prompt_vector(en):
    assert en(" what does the image describe?")["input_ids"] == EN_PROMPT_IDS
    assert en("what does the image describe?")["input_ids"][1] == 12196


def test_chinese_prompt_vector(cn):
    assert cn("图片描述了什么内容?")["input_ids"] == CN_PROMPT_IDS


@pytest.mark.parametrize("family", ["en", "cn"])
def test_layout_matches_variants_yaml(family, tokenizers):
    tok = tokenizers[family]
    spec = yaml.safe_load(files("ofaconv.mappings").joinpath("ofa/variants.yaml").read_text(encoding="utf-8"))["families"][family]
    layout = vocab_layout(family)
    assert [layout.text_start, layout.text_end] == spec["text_token_range"]
    assert len(tok) == layout.vocab_size == spec["vocab_size"] == {"en": 59457, "cn": 30325}[family]
    ids = tok.convert_tokens_to_ids
    assert [ids("<s>"), ids("<pad>"), ids("</s>"), ids("<unk>")] == [0, 1, 2, 3]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    assert ids("<mask>") == tok.mask_token_id == {"en": 50264, "cn": 21132}[family]
    assert ids("<code_0>") == layout.code_ids.start == {"en": 50265, "cn": 21133}[family]
    assert ids("<code_8191>") == layout.code_ids.stop - 1
    assert ids("<bin_0>") == layout.bin_ids.start == {"en": 58457, "cn": 29325}[family]
    assert ids("<bin_999>") == layout.vocab_size - 1
    # Codes and bins in text are single tokens (how OFA writes grounding / image-code targets).
    assert tok("<code_5><bin_17>", add_special_tokens=False)["input_ids"] == [layout.code_ids[5], layout.bin_ids[17]]


@pytest.mark.parametrize("family", ["en", "cn"])
def test_text_token_mask(family):
    layout = vocab_layout(family)
    mask = text_token_mask(family)
    assert mask.dtype.is_floating_point is False and mask.shape == (layout.vocab_size,)
    assert mask[: layout.text_end + 1].all() and not mask[layout.text_end + 1 :].any()
    assert non_text_token_ids(family) == list(range(layout.mask_id, layout.vocab_size))
    padded = text_token_mask(family, vocab_size=layout.vocab_size + 7)
    assert padded.shape == (layout.vocab_size + 7,) and int(padded.sum()) == layout.mask_id
    with pytest.raises(OfaconvError):
        text_token_mask(family, vocab_size=10)


@pytest.mark.parametrize("text", EN_CORPUS)
def test_english_matches_fairseq_gpt2bpe(en, text):
    assert en(text)["input_ids"] == fairseq_en_ids(text)


@pytest.mark.parametrize("text", CN_CORPUS)
def test_chinese_matches_fairseq_bertbpe(cn, text):
    assert cn(text)["input_ids"] == fairseq_cn_ids(text)


@pytest.mark.parametrize("family", ["en", "cn"])
def test_special_tokens_in_text_follow_transformers(family, tokenizers):
    """Known, deliberate difference: literal "<s>" / "<mask>" in text are special tokens (as in every
    transformers tokenizer); fairseq's BPE would spell them out. Caption prompts never contain them."""
    tok = tokenizers[family]
    assert tok("<mask>", add_special_tokens=False)["input_ids"] == [tok.mask_token_id]
    reference = fairseq_en_ids if family == "en" else fairseq_cn_ids
    assert tok("x <s> y")["input_ids"] != reference("x <s> y")


def test_chinese_oov_is_fairseq_unk_104(cn):
    ids = cn("☃ 𠀀")["input_ids"]
    assert ids == [0, 104, 104, 2]
    assert cn.unk_token == "[UNK]" and cn.unk_token_id == 104
    assert cn.convert_tokens_to_ids("<unk>") == 3  # fairseq's own <unk> still has its id


def test_mutations_are_caught():
    """The reference comparisons fail for a tokenizer that is off by a swapped entry or a wrong unk."""
    text_tokens, merges = read_vocabulary("en")
    swapped = list(text_tokens)
    swapped[1], swapped[2] = swapped[2], swapped[1]  # "Ġthe" <-> ","
    broken_en = tokenization._english_backend(tokenization.ofa_tokens("en", swapped), merges)
    assert broken_en.encode(" what does the image describe?").ids != EN_PROMPT_IDS
    assert broken_en.encode(" what does the image describe?").ids != fairseq_en_ids(" what does the image describe?")

    cn_tokens, _ = read_vocabulary("cn")
    broken_cn = tokenization._chinese_backend(tokenization.ofa_tokens("cn", cn_tokens))
    broken_cn.model.unk_token = "<unk>"  # what HF ports configured: OOV -> 3 instead of 104
    assert broken_cn.encode("☃").ids != fairseq_cn_ids("☃")


# ---------------------------------------------------------------------------------------------
# Vocabulary sources


def _ofa_en_folder(tmp_path) -> Path:
    folder = tmp_path / "ofa_bpe"
    folder.mkdir()
    shutil.copyfile(DATA / "gpt2_encoder.json", folder / "encoder.json")
    shutil.copyfile(DATA / "gpt2_merges.txt", folder / "vocab.bpe")
    shutil.copyfile(DATA / "ofa_en_dict.txt", folder / "dict.txt")
    return folder


def _hf_en_folder(tmp_path, en) -> Path:
    folder = tmp_path / "hf_ofa"
    folder.mkdir()
    vocab = {token: index for token, index in en.get_vocab().items() if index <= 50264}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    shutil.copyfile(DATA / "gpt2_merges.txt", folder / "merges.txt")
    return folder


def test_english_sources_agree(tmp_path, en):
    from_ofa = build_tokenizer("en", source=_ofa_en_folder(tmp_path))
    from_hf = build_tokenizer("en", source=_hf_en_folder(tmp_path, en))
    assert from_ofa.get_vocab() == en.get_vocab() == from_hf.get_vocab()
    for text in EN_CORPUS:
        assert from_ofa(text)["input_ids"] == from_hf(text)["input_ids"] == en(text)["input_ids"]


def test_chinese_sources_agree(tmp_path, cn):
    bert = tmp_path / "bert"
    bert.mkdir()
    shutil.copyfile(DATA / "bert_chinese_vocab.txt", bert / "vocab.txt")
    ofa_chinese = tmp_path / "ofa_chinese"  # OFA-Chinese's 21133-line vocab.txt
    ofa_chinese.mkdir()
    body = (DATA / "bert_chinese_vocab.txt").read_text(encoding="utf-8")
    (ofa_chinese / "vocab.txt").write_text("<s>\n<pad>\n</s>\n<unk>\n" + body + "<mask>\n", encoding="utf-8")
    for folder in (bert, ofa_chinese):
        tok = build_tokenizer("cn", source=folder)
        assert tok.get_vocab() == cn.get_vocab()
        assert tok(CN_CORPUS[3])["input_ids"] == cn(CN_CORPUS[3])["input_ids"]


def test_hub_source_uses_snapshot_download(tmp_path, monkeypatch, en):
    import huggingface_hub

    folder = _hf_en_folder(tmp_path, en)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    tok = build_tokenizer("en", source="OFA-Sys/ofa-tiny")
    assert calls and calls[0][0] == "OFA-Sys/ofa-tiny" and "vocab.json" in calls[0][1]
    assert tok(" what does the image describe?")["input_ids"] == EN_PROMPT_IDS


def test_hub_source_offline_is_one_line_error():
    with pytest.raises(OfaconvError, match="OFA-Sys/ofa-tiny"):
        build_tokenizer("en", source="OFA-Sys/ofa-tiny")  # tests run with HF_HUB_OFFLINE=1


def test_bad_sources(tmp_path):
    with pytest.raises(OfaconvError, match="unknown OFA tokenizer family"):
        build_tokenizer("fr")
    with pytest.raises(OfaconvError, match="neither a folder"):
        build_tokenizer("en", source=tmp_path / "missing" / "dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OfaconvError, match="no English OFA vocabulary"):
        build_tokenizer("en", source=empty)
    with pytest.raises(OfaconvError, match="no vocab.txt"):
        build_tokenizer("cn", source=empty)

    short = tmp_path / "short"
    short.mkdir()
    (short / "vocab.txt").write_text("[PAD]\n[UNK]\n", encoding="utf-8")
    with pytest.raises(OfaconvError, match=r"vocab.txt: has 2 WordPiece entries"):
        build_tokenizer("cn", source=short)

    bad_dict = _ofa_en_folder(tmp_path)
    lines = (bad_dict / "dict.txt").read_text(encoding="utf-8").split("\n")
    lines[5] = "no-count-here"
    (bad_dict / "dict.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(OfaconvError, match=r"dict.txt: line 6"):
        build_tokenizer("en", source=bad_dict)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "vocab.json").write_text("{not json", encoding="utf-8")
    (bad_json / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(OfaconvError, match=r"vocab.json: cannot read JSON"):
        build_tokenizer("en", source=bad_json)


# ---------------------------------------------------------------------------------------------
# Save / AutoTokenizer


@pytest.mark.parametrize("family", ["en", "cn"])
def test_save_and_autotokenizer_round_trip(tmp_path, family, tokenizers):
    from transformers import AutoTokenizer

    tok = tokenizers[family]
    save_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    (tmp_path / "config.json").write_text('{"model_type": "ofa"}', encoding="utf-8")
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) and loaded.get_vocab() == tok.get_vocab()
    assert loaded.unk_token_id == tok.unk_token_id
    assert loaded.model_input_names == ["input_ids", "attention_mask"]
    corpus = EN_CORPUS if family == "en" else CN_CORPUS
    for text in corpus:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    batch = loaded(corpus[:3], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"][0, -1].item() in (1, 2)  # right padding


@pytest.mark.parametrize("family, source", [("en", None), ("cn", None), ("en", "hf")])
def test_save_processing_writes_what_transformers_writes(tmp_path, family, source, en):
    """``ofaconv convert`` writes the tokenizer files without importing transformers: they must be
    byte-identical to the tokenizer's own save_pretrained output (with ofaconv's class names)."""
    source = _hf_en_folder(tmp_path, en) if source == "hf" else None
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    tokenization.save_processing(ours, family, 64, tokenizer_source=source)
    save_tokenizer(build_tokenizer(family, source), theirs, processor_class="OFAProcessor")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize(
    "spaced, joined",
    [
        ("红 色 的 iphone 13 手 机", "红色的iphone 13手机"),
        ("一 只 猫 , 很 可 爱 。", "一只猫,很可爱。"),
        ("apple iphone 13 pro max 手 机", "apple iphone 13 pro max手机"),
        ("「 新 品 」 5g 手 机", "「新品」5g手机"),
        ("no chinese here", "no chinese here"),
    ],
)
def test_join_cjk_spaces(spaced, joined):
    assert join_cjk_spaces(spaced) == joined


def test_decode_caption_chinese(cn):
    caption = "红色的iPhone 13手机，很好。"
    ids = cn(caption)["input_ids"]
    generated = [0, *ids[1:], 1, 1]  # decoder start, tokens, </s>, padding
    assert decode_caption(cn, generated, "cn") == "红色的iphone 13手机，很好。"
    # The saved tokenizer's own decoder applies the same rule for plain-transformers users.
    assert cn.decode(ids, skip_special_tokens=True) == "红色的iphone 13手机，很好。"
    for text in CN_CORPUS[:6]:
        ids = cn(text)["input_ids"]
        assert cn.decode(ids, skip_special_tokens=True) == decode_caption(cn, ids, "cn")
    # WordPiece continuation pieces are merged, as BertBPE.decode does.
    assert decode_caption(cn, cn("unaffordable 手机")["input_ids"], "cn") == "unaffordable手机"


def test_decode_caption_english(en):
    ids = en(" a man riding a wave on top of a surfboard")["input_ids"]
    assert decode_caption(en, ids, "en") == "a man riding a wave on top of a surfboard"
    generated = [2, 0, *ids[1:-1], 2, 1, 1, 1]  # eos as decoder start, then bos, eos, pads
    assert decode_caption(en, generated, "en") == "a man riding a wave on top of a surfboard"
    import torch

    batch = torch.tensor([[0, *ids[1:-1], 2], [0, 10, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]][:1] * 2)
    assert decode_captions(en, batch, "en") == ["a man riding a wave on top of a surfboard"] * 2
    with pytest.raises(ValueError, match="decode_captions"):
        decode_caption(en, batch, "en")
    with pytest.raises(ValueError, match="unknown OFA family"):
        decode_caption(en, ids, "de")
