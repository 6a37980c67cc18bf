"""OFA tokenizers in fairseq dictionary order, as stock `tokenizers` pipelines.

OFA's fairseq `Dictionary` (ofa.md §B.2) is: `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3, the lines of the
family's `dict.txt` (text tokens), `<mask>`, `<code_0..8191>`, `<bin_0..999>`.

- English: GPT-2 byte-level BPE; `dict.txt` line k names GPT-2 id g, so GPT-2 token g gets id 4 + k
  (the RoBERTa/BART ordering). V = 59457.
- Chinese: bert-base-chinese WordPiece (lower-casing, CJK character splitting); vocab line k gets
  id 4 + k. V = 30325. fairseq's `BertBPE` emits the vocab's own `[UNK]` for out-of-vocabulary
  words, which its dictionary maps to id 104; the WordPiece model here uses `[UNK]` as its unknown
  token too, so OOV text encodes to 104 exactly as in fairseq (not to `<unk>`=3).

The tokenizers are `PreTrainedTokenizerFast` objects backed by one `tokenizer.json`, so a saved
folder loads with `AutoTokenizer.from_pretrained` from plain transformers, without remote code.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import yaml

from ofaconv.core.errors import OfaconvError
from .modeling.tokenization_ofa import CJK_CHARACTERS, decode_caption, decode_captions

FAMILIES = ("en", "cn")
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"
# OFATask.setup_task appends code_dict_size image codes and num_bins location bins.
NUM_CODES = 8192
NUM_BINS = 1000
# BertTokenizer keeps its own special tokens intact in text; fairseq then maps them to dict ids.
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BERT_UNK = "[UNK]"
# Text positions of the OFA encoder (max_source_positions).
MODEL_MAX_LENGTH = 1024

_DATA = "ofaconv.data"
_EN_FAIRSEQ_FILES = {"encoder": "encoder.json", "merges": "vocab.bpe", "dict": "dict.txt"}
_EN_HF_FILES = {"vocab": "vocab.json", "merges": "merges.txt"}
_HUB_PATTERNS = ["vocab.json", "merges.txt", "encoder.json", "vocab.bpe", "dict.txt", "vocab.txt"]


@dataclass(frozen=True)
class VocabLayout:
    """Id layout of one family's fairseq dictionary."""

    family: str
    text_start: int
    text_end: int  # inclusive

    @property
    def num_text_tokens(self) -> int:
        return self.text_end - self.text_start + 1

    @property
    def mask_id(self) -> int:
        return self.text_end + 1

    @property
    def code_ids(self) -> range:
        return range(self.mask_id + 1, self.mask_id + 1 + NUM_CODES)

    @property
    def bin_ids(self) -> range:
        return range(self.code_ids.stop, self.code_ids.stop + NUM_BINS)

    @property
    def vocab_size(self) -> int:
        return self.bin_ids.stop

    @property
    def non_text_ids(self) -> range:
        """`<mask>`, `<code_*>` and `<bin_*>`: what a text-only decoder must never emit."""
        return range(self.mask_id, self.vocab_size)


@functools.lru_cache(maxsize=None)
def _families() -> dict:
    text = files("ofaconv.mappings").joinpath("ofa/variants.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)["families"]


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise OfaconvError(f"unknown OFA tokenizer family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


@functools.lru_cache(maxsize=None)
def vocab_layout(family: str) -> VocabLayout:
    """The id layout of `family`, from `text_token_range` in mappings/variants.yaml."""
    entry = _families()[_check_family(family)]
    start, end = entry["text_token_range"]
    layout = VocabLayout(family, int(start), int(end))
    if layout.text_start != len(SPECIAL_TOKENS) or layout.vocab_size != entry["vocab_size"]:
        raise OfaconvError(
            f"family {family}: text_token_range {start}..{end} + <mask> + {NUM_CODES} codes + {NUM_BINS} bins "
            f"gives {layout.vocab_size} ids, but vocab_size is {entry['vocab_size']}",
            path="ofaconv/mappings/ofa/variants.yaml",
        )
    return layout


def non_text_token_ids(family: str) -> list[int]:
    """Ids of `<mask>`, `<code_*>`, `<bin_*>` (for `generation_config.suppress_tokens` in --text-only)."""
    return list(vocab_layout(family).non_text_ids)


def text_token_mask(family: str, vocab_size: int | None = None):
    """Bool tensor [V]: True for ids a text-only caption may contain (specials and text tokens).

    False for `<mask>`, `<code_*>`, `<bin_*>`. `vocab_size` pads a larger output layer (False).
    """
    import torch

    layout = vocab_layout(family)
    size = layout.vocab_size if vocab_size is None else int(vocab_size)
    if size < layout.mask_id:
        raise OfaconvError(f"vocab_size {size} is smaller than the {family} text vocabulary ({layout.mask_id})")
    mask = torch.zeros(size, dtype=torch.bool)
    mask[: layout.mask_id] = True
    return mask


def ofa_tokens(family: str, text_tokens: list[str]) -> list[str]:
    """The whole dictionary, in id order, around the family's text tokens."""
    layout = vocab_layout(family)
    if len(text_tokens) != layout.num_text_tokens:
        raise OfaconvError(
            f"{family} vocabulary has {len(text_tokens)} text tokens, OFA expects {layout.num_text_tokens}"
        )
    tokens = [
        *SPECIAL_TOKENS,
        *text_tokens,
        MASK_TOKEN,
        *(f"<code_{i}>" for i in range(NUM_CODES)),
        *(f"<bin_{i}>" for i in range(NUM_BINS)),
    ]
    if len(set(tokens)) != len(tokens):
        dupes = [token for token, count in Counter(tokens).items() if count > 1]
        raise OfaconvError(f"{family} vocabulary repeats tokens: {dupes[:5]}")
    return tokens


# --------------------------------------------------------------------------------------------
# Vocabulary sources


def _read_lines(path: Path) -> list[str]:
    # "\n" only: bert-base-chinese has entries containing U+2028, which str.splitlines() splits.
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OfaconvError(f"cannot read vocabulary file ({exc})", path=path) from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OfaconvError(f"cannot read JSON vocabulary ({exc})", path=path) from None
    if not isinstance(data, dict):
        raise OfaconvError("expected a JSON object mapping tokens to ids", path=path)
    return data


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise OfaconvError(f"line {number} is not a BPE merge 'a b': {line!r}", path=path)
        merges.append((parts[0], parts[1]))
    return merges


def _read_fairseq_dict(path: Path) -> list[str]:
    words = []
    for number, line in enumerate(_read_lines(path), start=1):
        word, sep, count = line.rstrip().rpartition(" ")
        if not sep or not count.lstrip("-").isdigit():
            raise OfaconvError(f"line {number} is not '<symbol> <count>': {line!r}", path=path)
        words.append(word)
    return words


def english_from_fairseq(encoder_json: Path, vocab_bpe: Path, dict_txt: Path) -> tuple[list[str], list]:
    """Text tokens in fairseq order from OFA's `encoder.json` + `vocab.bpe` + `dict.txt`."""
    encoder = _read_json(encoder_json)
    by_gpt2_id = {int(v): k for k, v in encoder.items()}
    text_tokens = []
    for number, word in enumerate(_read_fairseq_dict(dict_txt), start=1):
        if word.isdigit():
            if int(word) not in by_gpt2_id:
                raise OfaconvError(f"line {number} names GPT-2 id {word}, absent from {encoder_json.name}", path=dict_txt)
            text_tokens.append(by_gpt2_id[int(word)])
        else:  # madeupword0000..0002: fairseq pads the dictionary to a multiple of 8
            text_tokens.append(word)
    return text_tokens, _read_merges(vocab_bpe)


def english_from_hf(vocab_json: Path, merges_txt: Path) -> tuple[list[str], list]:
    """Text tokens in fairseq order from an HF OFA/BART `vocab.json` (ids already fairseq's)."""
    vocab = _read_json(vocab_json)
    layout = vocab_layout("en")
    by_id = {}
    for token, index in vocab.items():
        if not isinstance(index, int):
            raise OfaconvError(f"id of {token!r} is not an integer", path=vocab_json)
        by_id[index] = token
    for index, token in enumerate(SPECIAL_TOKENS):
        if by_id.get(index) != token:
            raise OfaconvError(f"id {index} is {by_id.get(index)!r}, expected {token!r}", path=vocab_json)
    if by_id.get(layout.mask_id, MASK_TOKEN) != MASK_TOKEN:
        raise OfaconvError(f"id {layout.mask_id} is {by_id[layout.mask_id]!r}, expected {MASK_TOKEN!r}", path=vocab_json)
    missing = [i for i in range(layout.text_start, layout.text_end + 1) if i not in by_id]
    if missing:
        raise OfaconvError(
            f"text ids {missing[0]}..{missing[-1]} missing ({len(missing)} ids); not an OFA/BART vocabulary",
            path=vocab_json,
        )
    text_tokens = [by_id[i] for i in range(layout.text_start, layout.text_end + 1)]
    return text_tokens, _read_merges(merges_txt)


def chinese_from_vocab(vocab_txt: Path) -> list[str]:
    """Text tokens from a bert-base-chinese `vocab.txt` (21128 lines), or OFA-Chinese's 21133-line
    variant that already starts with `<s> <pad> </s> <unk>` and ends with `<mask>`."""
    lines = _read_lines(vocab_txt)
    if tuple(lines[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS:
        lines = lines[len(SPECIAL_TOKENS) :]
        if lines and lines[-1] == MASK_TOKEN:
            lines.pop()
    expected = vocab_layout("cn").num_text_tokens
    if len(lines) != expected:
        raise OfaconvError(f"has {len(lines)} WordPiece entries, bert-base-chinese has {expected}", path=vocab_txt)
    if BERT_UNK not in lines:
        raise OfaconvError(f"no {BERT_UNK} entry; not a BERT vocabulary", path=vocab_txt)
    return lines


def _packaged(name: str) -> Path:
    return Path(str(files(_DATA).joinpath(name)))


def _resolve_folder(source) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not path.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id=text, allow_patterns=_HUB_PATTERNS))
        except Exception as exc:  # offline, missing repo, auth: one line naming the repo
            raise OfaconvError(f"cannot fetch tokenizer files from the Hub ({type(exc).__name__}: {exc})", path=text) from None
    raise OfaconvError("tokenizer source is neither a folder nor a Hub repo id", path=text)


def read_vocabulary(family: str, source=None) -> tuple[list[str], list | None]:
    """(text tokens in fairseq order, BPE merges or None) for `family` from `source`.

    `source`: None (the files shipped in ofaconv/data), a folder, or a Hub repo id. English folders
    hold OFA's `encoder.json` + `vocab.bpe` + `dict.txt` (OFA `utils/BPE/`) or an HF OFA/BART
    `vocab.json` + `merges.txt`; Chinese folders hold a BERT `vocab.txt`.
    """
    _check_family(family)
    if family == "en":
        if source is None:
            return english_from_fairseq(
                _packaged("gpt2_encoder.json"), _packaged("gpt2_merges.txt"), _packaged("ofa_en_dict.txt")
            )
        folder = _resolve_folder(source)
        if (folder / "dict.txt").is_file() and (folder / "encoder.json").is_file():
            merges = folder / "vocab.bpe" if (folder / "vocab.bpe").is_file() else folder / "merges.txt"
            if not merges.is_file():
                raise OfaconvError("has dict.txt and encoder.json but no vocab.bpe / merges.txt", path=folder)
            return english_from_fairseq(folder / "encoder.json", merges, folder / "dict.txt")
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return english_from_hf(folder / "vocab.json", folder / "merges.txt")
        raise OfaconvError(
            "no English OFA vocabulary here (need encoder.json + vocab.bpe + dict.txt, or vocab.json + merges.txt)",
            path=folder,
        )
    if source is None:
        return chinese_from_vocab(_packaged("bert_chinese_vocab.txt")), None
    folder = _resolve_folder(source)
    if not (folder / "vocab.txt").is_file():
        raise OfaconvError("no vocab.txt (bert-base-chinese WordPiece vocabulary) here", path=folder)
    return chinese_from_vocab(folder / "vocab.txt"), None


# --------------------------------------------------------------------------------------------
# Tokenizers


def _cjk_space_regex() -> str:
    # Same rule as tokenization_ofa.join_cjk_spaces, for the tokenizer.json decoder (Oniguruma).
    return f"(?<=[{CJK_CHARACTERS}]) +| +(?=[{CJK_CHARACTERS}])"


def _english_backend(tokens: list[str], merges: list):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return backend


def _chinese_backend(tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    backend = Tokenizer(
        models.WordPiece(
            vocab={t: i for i, t in enumerate(tokens)},
            unk_token=BERT_UNK,
            continuing_subword_prefix="##",
            max_input_chars_per_word=100,
        )
    )
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.Sequence(
        [
            decoders.WordPiece(prefix="##", cleanup=True),
            decoders.Fuse(),
            decoders.Replace(Regex(_cjk_space_regex()), ""),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return backend


def build_backend(family: str = "en", source=None, vocabulary=None):
    """The OFA tokenizer of `family` ("en" | "cn") as a stock `tokenizers.Tokenizer` (what
    `tokenizer.json` holds), built without importing transformers.

    `source`: see `read_vocabulary` (default: the vocabulary files shipped with ofaconv; a Hub id
    is downloaded with huggingface_hub only when given); `vocabulary`: what `read_vocabulary`
    returned, where it was read already.
    """
    from tokenizers import AddedToken

    text_tokens, merges = vocabulary if vocabulary is not None else read_vocabulary(family, source)
    tokens = ofa_tokens(family, text_tokens)
    layout = vocab_layout(family)
    backend = _english_backend(tokens, merges) if family == "en" else _chinese_backend(tokens)

    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    specials.append(AddedToken(MASK_TOKEN, special=True, normalized=False, lstrip=family == "en"))
    if family == "cn":
        specials.append(AddedToken(BERT_UNK, special=True, normalized=False))
    backend.add_special_tokens(specials)
    plain = [AddedToken(tokens[i], special=False, normalized=False) for i in (*layout.code_ids, *layout.bin_ids)]
    if family == "cn":
        plain += [AddedToken(t, special=False, normalized=False) for t in BERT_SPECIAL_TOKENS if t != BERT_UNK]
    backend.add_tokens(plain)
    _check_layout(backend, family)
    return backend


def tokenizer_settings(family: str) -> dict:
    """The `PreTrainedTokenizerFast` arguments of `family`'s tokenizer."""
    return {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>" if _check_family(family) == "en" else BERT_UNK,
        "mask_token": MASK_TOKEN,
        "cls_token": "<s>",
        "sep_token": "</s>",
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def build_tokenizer(family: str = "en", source=None):
    """The OFA tokenizer of `family` ("en" | "cn") as a `PreTrainedTokenizerFast` (see `build_backend`)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_backend(family, source), **tokenizer_settings(family))


def _check_layout(backend, family: str) -> None:
    layout = vocab_layout(family)
    expected = {
        "<s>": 0,
        "<pad>": 1,
        "</s>": 2,
        "<unk>": 3,
        MASK_TOKEN: layout.mask_id,
        "<code_0>": layout.code_ids.start,
        f"<bin_{NUM_BINS - 1}>": layout.bin_ids.stop - 1,
    }
    got = {t: backend.token_to_id(t) for t in expected}
    size = backend.get_vocab_size(with_added_tokens=True)
    if got != expected or size != layout.vocab_size:
        raise OfaconvError(f"{family} tokenizer layout is off: {got} (size {size}), expected {expected}")


# transformers 5 names the class "TokenizersBackend"; 4.x only knows the old name of the same class.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def tokenizer_config_dict(family: str, processor_class: str | None = None) -> dict:
    """``tokenizer_config.json`` as `save_tokenizer` writes it (tests/test_tokenization.py holds the
    two equal), with a `tokenizer_class` every transformers release resolves."""
    config = {"backend": "tokenizers", **tokenizer_settings(family), "tokenizer_class": TOKENIZER_CLASS}
    config = dict(sorted(config.items()))
    if processor_class is not None:
        config["processor_class"] = processor_class
    return config


def save_tokenizer(tokenizer, folder, processor_class: str | None = None) -> None:
    """`save_pretrained` plus a `tokenizer_class` every transformers release resolves (and the
    `processor_class` a processor's `save_pretrained` records)."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = TOKENIZER_CLASS
    if processor_class is not None:
        config["processor_class"] = processor_class
    config_path.write_text(_tokenizer_config_text(config), encoding="utf-8")


def _tokenizer_config_text(config: dict) -> str:
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


# The processing files of a converted folder, written as the classes' own ``save_pretrained`` would
# write them (tests/test_image_processing.py holds the two equal): building OFAImageProcessor and
# OFAProcessor here would import transformers' image and processor machinery (and torchvision),
# seconds that ``ofaconv convert`` otherwise never pays.
IMAGE_PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_ofa.OFAImageProcessor",
    "AutoProcessor": "processing_ofa.OFAProcessor",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_ofa.OFAProcessor"}
PROCESSING_CODE = ("image_processing_ofa.py", "processing_ofa.py", "tokenization_ofa.py")


def image_processor_dict(image_size: int, image_mean=None, image_std=None) -> dict:
    """``preprocessor_config.json``: fairseq's caption transform (bicubic resize, mean = std = 0.5
    unless the source normalised otherwise)."""
    return {
        "auto_map": dict(IMAGE_PROCESSOR_AUTO_MAP),
        "image_mean": [float(v) for v in (image_mean if image_mean is not None else (0.5, 0.5, 0.5))],
        "image_processor_type": "OFAImageProcessor",
        "image_std": [float(v) for v in (image_std if image_std is not None else (0.5, 0.5, 0.5))],
        "resample": 3,  # PIL.Image.BICUBIC
        "size": {"height": int(image_size), "width": int(image_size)},
    }


def processor_dict(family: str, image_size: int, prompt: str, image_mean=None, image_std=None) -> dict:
    """``processor_config.json``: the caption prompt and family, with the image processor nested."""
    return {
        "auto_map": dict(PROCESSOR_AUTO_MAP),
        "family": family,
        "image_processor": image_processor_dict(image_size, image_mean, image_std),
        "processor_class": "OFAProcessor",
        "prompt": prompt,
    }


def config_file_text(data: dict) -> str:
    """A ``*_config.json`` as transformers' ``save_pretrained`` writes one."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def processing_files(family: str, image_size: int, tokenizer_source=None, prompt: str | None = None,
                     image_mean=None, image_std=None, vocabulary=None) -> dict[str, bytes]:
    """The tokenizer, image processor and processor files of an OFA checkpoint, by file name.

    Also the code files `image_processing_ofa.py`, `processing_ofa.py` and `tokenization_ofa.py`,
    which `auto_map` names, so `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` works
    without ofaconv. `prompt` defaults to the family's fairseq caption prompt
    (mappings/variants.yaml); `image_mean` / `image_std` to fairseq's 0.5 / 0.5. Every file is what
    the classes' own ``save_pretrained`` writes, built without importing transformers (about a
    second of a conversion) and without writing anything, so a converter can build them on a worker
    thread beside its weights. `vocabulary`: see `build_backend`.
    """
    _check_family(family)
    prompt = prompt if prompt is not None else _families()[family]["prompt"]
    backend = build_backend(family, tokenizer_source, vocabulary)
    texts = {
        "preprocessor_config.json": config_file_text(image_processor_dict(image_size, image_mean, image_std)),
        "processor_config.json": config_file_text(processor_dict(family, image_size, prompt, image_mean, image_std)),
        "tokenizer.json": backend.to_str(pretty=True),
        "tokenizer_config.json": _tokenizer_config_text(tokenizer_config_dict(family, "OFAProcessor")),
    }
    code = files("ofaconv.ofa.modeling")
    return {**{name: text.encode("utf-8") for name, text in texts.items()},
            **{name: code.joinpath(name).read_bytes() for name in PROCESSING_CODE}}


def save_processing(folder, family: str, image_size: int, tokenizer_source=None, prompt: str | None = None,
                    image_mean=None, image_std=None) -> None:
    """Write :func:`processing_files` into `folder`: an ``OutputFolder`` (the files go into its
    manifest; it makes the whole folder appear at once) or a plain directory."""
    from ofaconv.core.writer import OutputFolder

    built = processing_files(family, image_size, tokenizer_source, prompt, image_mean, image_std)
    if isinstance(folder, OutputFolder):
        for name, data in built.items():
            folder.write_bytes(name, data)
        return
    root = Path(folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for name, data in built.items():
            (root / name).write_bytes(data)
    except OSError as exc:
        raise OfaconvError(f"cannot write the processing files ({exc})", path=root) from None


__all__ = [
    "FAMILIES",
    "NUM_BINS",
    "NUM_CODES",
    "VocabLayout",
    "build_backend",
    "build_tokenizer",
    "config_file_text",
    "decode_caption",
    "decode_captions",
    "non_text_token_ids",
    "ofa_tokens",
    "processing_files",
    "read_vocabulary",
    "save_processing",
    "save_tokenizer",
    "tokenizer_config_dict",
    "tokenizer_settings",
    "text_token_mask",
    "vocab_layout",
]
