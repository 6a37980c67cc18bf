"""``ofaconv upgrade OLD_FOLDER OUT/``: a folder published for the old OFA ports (OFA-Sys HF port,
OFA-Compress, OFA-Chinese, ModelScope: ``pytorch_model.bin`` or safetensors with persistent
rp-bucket tables) becomes an ofaconv folder (safetensors, processor, card, report).

The port's weights are checked against ``mappings/ofa/hf_port.yaml`` (every key accounted for,
derived tables equal to ours), then renamed back to fairseq names with ``ofa/fairseq.yaml`` in
reverse, so the same converter and the same independent fairseq reference verify the result.

Settings come from the folder itself, never from ofaconv's defaults where the folder has its own:
- ``config.json`` (the port's ``OFAConfig``) becomes fairseq model arguments through
  ``mappings/ofa/port_config.yaml`` (:func:`port_arguments`). Those arguments are what the parity
  reference computes with, so a setting lost on the way to the converted config.json fails
  ``--verify`` instead of being checked against itself.
- a ModelScope ``configuration.json`` names the task and carries the generator settings
  (``model.beam_search``), the prompt, the image size and mean/std (``mappings/ofa/modelscope.yaml``,
  :func:`read_modelscope`); they go into ``config.json`` (``task``, ``task_prompt``,
  ``task_settings``), ``generation_config.json`` and the processor.
- the vocabulary files the folder carries (``vocab.json`` + ``merges.txt``, ``vocab.txt``) build
  the tokenizer when they fit the embedding (:func:`choose_tokenizer`).
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from .checkpoint import FairseqCheckpoint, check_image_size
from ofaconv.core.errors import OfaconvError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
CONFIGURATION = "configuration.json"  # ModelScope's task-level configuration
# config.json patch_image_size of the non-ModelScope ports when absent (their demos' size)
PORT_IMAGE_SIZE = 256
# Vocabulary files a port folder may carry, per tokenizer family.
VOCAB_FILES = {"en": (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe", "dict.txt")),
               "cn": (("vocab.txt",),)}


@functools.lru_cache(maxsize=None)
def _table(name: str) -> dict:
    import yaml

    path = f"ofa/{name}.yaml"
    data = yaml.safe_load(files("ofaconv.mappings").joinpath(path).read_text(encoding="utf-8"))
    schema = {"port_config": "ofaconv/port-config@1", "modelscope": "ofaconv/modelscope@1"}[name]
    if not isinstance(data, dict) or data.get("schema") != schema:
        raise OfaconvError(f"unsupported schema (expected {schema})", path=f"ofaconv/mappings/{path}")
    return data


def load_port_weights(folder: Path) -> tuple[dict, Path]:
    """The port's state dict (single file or sharded index) and the file that identifies it."""
    from ofaconv.core.loader import load_safetensors, load_state_dict_file, read_sharded

    for name in WEIGHT_FILES:
        path = folder / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            return read_sharded(path), path
        return (load_safetensors(path) if name.endswith(".safetensors") else load_state_dict_file(path)), path
    raise OfaconvError(f"no weights found (looked for {', '.join(WEIGHT_FILES)})", path=folder)


def read_json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deeply
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise OfaconvError(f"not valid JSON ({detail}); restore the folder's {what}", path=path) from None
    except OSError as exc:
        raise OfaconvError(f"cannot read {what} ({exc.strerror})", path=path) from None
    if not isinstance(data, dict):
        raise OfaconvError(f"not a JSON object but {type(data).__name__}", path=path)
    return data


def _typed(value, default, *, path, key: str):
    """``value`` if it has the type of ``default`` (ints pass for floats, bools never for numbers)."""
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    allowed = kinds.get(type(default))
    if allowed is None or (isinstance(value, allowed) and (type(default) is bool or not isinstance(value, bool))):
        return float(value) if type(default) is float else value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(default)]
    raise OfaconvError(f"is {json.dumps(value)}, expected {expected}; restore the folder's "
                       f"{Path(path).name if path else 'config.json'}", path=path, key=key)


def port_arguments(old: dict, config_path=None) -> dict:
    """fairseq model arguments equivalent to a port's ``config.json`` (mappings/ofa/port_config.yaml).

    Every setting is read from ``old`` (absent: the port's own default); features ofaconv's model
    does not implement are refused naming the key. ``patch_image_size`` is not among them: the
    image size is the preprocessing's (:func:`image_size_of`).
    """
    table = _table("port_config")
    defaults = table["defaults"]

    def value(key):
        return _typed(old[key], defaults[key], path=config_path, key=key) if key in old else defaults[key]

    for key, rule in table["supported"].items():
        if value(key) != rule["value"]:
            raise OfaconvError(f"{key}={json.dumps(value(key))} ({rule['what']}) is not implemented by ofaconv's "
                               f"OFA model; only {json.dumps(rule['value'])} converts", path=config_path, key=key)
    args = {}
    for name, rule in table["arguments"].items():
        if "key" in rule:
            args[name] = (not value(rule["key"])) if rule.get("negate") else value(rule["key"])
        elif "false_when" in rule:
            args[name] = not all(value(key) == want for key, want in rule["false_when"].items())
        else:
            args[name] = rule["value"]
    args["arch"] = "hf-port"
    return args


# --------------------------------------------------------------------------------------------
# ModelScope's configuration.json


@dataclass
class ModelScopeSettings:
    """What a ModelScope folder's ``configuration.json`` says, in ofaconv's terms."""

    task: str  # ours: caption | vqa | grounding | matching | ocr
    modelscope_task: str
    family: str  # tokenizer family from model.language
    image_size: int
    image_mean: list
    image_std: list
    prompt: str | None  # the folder's own model.prompt, else ModelScope's default for the task
    own_prompt: bool
    generation: dict  # fairseq names, as build_generation_config takes them
    task_settings: dict = field(default_factory=dict)


def read_modelscope(folder: Path, *, bucket: int = 42) -> ModelScopeSettings | None:
    """The settings of ``folder/configuration.json`` (None when the folder has none)."""
    path = folder / CONFIGURATION
    if not path.exists():
        return None
    table = _table("modelscope")
    data = read_json_object(path, CONFIGURATION)
    name = data.get("task")
    if name in table["unsupported_tasks"]:
        raise OfaconvError(f"task {name!r} has no ofaconv task definition (supported: "
                           f"{', '.join(table['tasks'])})", path=path, key="task")
    if name not in table["tasks"]:
        raise OfaconvError(f"task {json.dumps(name)} is not a ModelScope OFA task ofaconv knows (supported: "
                           f"{', '.join(table['tasks'])}); restore the folder's configuration.json", path=path, key="task")
    task = table["tasks"][name]
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise OfaconvError(f"is {type(model).__name__}, expected an object", path=path, key="model")

    def setting(key, default):
        return _typed(model[key], default, path=path, key=f"model.{key}") if key in model else default

    kind = setting("multimodal_type", "default")
    if kind not in table["multimodal_types"]:
        raise OfaconvError(f"{kind!r} models change the vocabulary; ofaconv converts only the default OFA",
                           path=path, key="model.multimodal_type")
    language = setting("language", table["default_language"])
    if language not in table["languages"]:
        raise OfaconvError(f"{language!r} is not a language ModelScope's OFA has a tokenizer for "
                           f"({', '.join(table['languages'])})", path=path, key="model.language")
    size = check_image_size(setting("patch_image_size", table["patch_image_size"]), image_bucket_size=bucket,
                            path=path, key="model.patch_image_size")
    stats = table["mean_std"][setting("imagenet_default_mean_and_std", False)]
    own = "prompt" in model
    prompt = setting("prompt", "") if own else table["prompts"].get(task)
    settings = {key: setting(key, rule["default"]) for key, rule in table["task_settings"].items()
                if task in rule["tasks"]}
    answers = settings.pop("answer2label", None)
    if answers is not None:
        if not isinstance(answers, str):
            raise OfaconvError(f"is {json.dumps(answers)}, expected a file name", path=path, key="model.answer2label")
        settings["answers"] = _read_answers(folder, answers, path)
    return ModelScopeSettings(
        task=task, modelscope_task=name, family=table["languages"][language], image_size=size,
        image_mean=list(stats["mean"]), image_std=list(stats["std"]), prompt=prompt, own_prompt=own,
        generation=_generation(model.get("beam_search", {}), path), task_settings=settings)


def _read_answers(folder: Path, name: str, configuration: Path) -> list[str]:
    """The answer list of ``model.answer2label`` (ModelScope orders answers as the file lists them)."""
    target = (folder / name)
    if not target.is_file():
        raise OfaconvError(f"names {name!r}, which the folder lacks; restore it or remove model.answer2label",
                           path=configuration, key="model.answer2label")
    answers = read_json_object(target, name)
    if not answers or not all(isinstance(a, str) and a for a in answers):
        raise OfaconvError("expected an object of answer -> label with at least one non-empty answer", path=target)
    return list(answers)


def _generation(beam_search, path) -> dict:
    """ModelScope's generator settings (its defaults updated by model.beam_search), in fairseq names."""
    table = _table("modelscope")["beam_search"]
    if not isinstance(beam_search, dict):
        raise OfaconvError(f"is {type(beam_search).__name__}, expected an object", path=path, key="model.beam_search")
    settings = {**table["generator_defaults"], **table["defaults"]}
    for key, value in beam_search.items():
        where = f"model.beam_search.{key}"
        if key in table["supported"]:
            if value != table["supported"][key]:
                raise OfaconvError(f"{json.dumps(value)} is a ModelScope generator switch ofaconv's search does "
                                   f"not have (only {json.dumps(table['supported'][key])})", path=path, key=where)
            continue
        if key not in table["names"]:
            raise OfaconvError(f"not a setting of ModelScope's OFA generator (known: {', '.join(table['names'])})",
                               path=path, key=where)
        default = settings.get(key)
        settings[key] = value if default is None else _typed(value, default, path=path, key=where)
    out = {table["names"][key]: value for key, value in settings.items()}
    from .modeling.generation_ofa import parse_constraint_range
    from .modeling.settings_ofa import generation_fields

    try:
        parse_constraint_range(out["constraint_range"])
        generation_fields(out)
    except ValueError as exc:
        raise OfaconvError(f"{exc}; restore the folder's configuration.json", path=path,
                           key="model.beam_search") from None
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer


def vocabulary_files(folder: Path) -> dict[str, tuple[str, ...]]:
    """The complete vocabulary file sets ``folder`` carries, per family."""
    found = {}
    for fam, sets in VOCAB_FILES.items():
        for names in sets:
            if all((folder / n).is_file() for n in names):
                found[fam] = names
                break
    return found


def choose_tokenizer(folder: Path, vocab_size: int, language: str | None, option) -> tuple[str | None, object, str]:
    """(family, tokenizer source for ``build_tokenizer``, a note) for a port folder.

    The family comes from the embedding size (OFA's English and Chinese vocabularies have
    different sizes), checked against configuration.json's language. The source is ``--tokenizer``
    when given, else the vocabulary files the folder carries (when they fit the embedding), else
    ofaconv's shipped files. Family None: no OFA vocabulary fits the embedding (the note says so).
    """
    from . import variants
    from .tokenization import ofa_tokens, read_vocabulary

    by_size = variants.family_from_vocab_size(vocab_size)
    sizes = ", ".join(f"{fam} {variants.family_info(fam)['vocab_size']}" for fam in ("en", "cn"))
    if by_size is None:
        carried = vocabulary_files(folder)
        what = (f"it carries {', '.join(n for names in carried.values() for n in names)}" if carried
                else "it carries no vocabulary files")
        return None, None, (f"no tokenizer or processor written: the embedding has {vocab_size} rows and OFA's "
                            f"vocabularies have {sizes} ids ({what}); the folder converts, but caption/predict "
                            "need a tokenizer of exactly that size")
    if language is not None and language != by_size:
        raise OfaconvError(f"model.language says the {language} vocabulary, but the embedding has {vocab_size} rows, "
                           f"the {by_size} vocabulary's size; restore the folder's configuration.json",
                           path=folder / CONFIGURATION, key="model.language")
    family = by_size
    if option is not None:
        return family, option, f"tokenizer from {option}"
    carried = vocabulary_files(folder).get(family)
    if carried is None:
        return family, None, f"tokenizer: ofaconv's shipped {family} vocabulary (the folder carries none)"
    try:
        ofa_tokens(family, read_vocabulary(family, folder)[0])
    except OfaconvError as exc:
        raise OfaconvError(f"{exc.detail}; the {family} embedding has {vocab_size} rows, which this vocabulary "
                           f"does not fit: pass --tokenizer FOLDER with the vocabulary the weights were trained "
                           f"with ({' + '.join(carried)})", path=exc.path or folder / carried[0]) from None
    return family, folder, f"tokenizer from the folder's {' + '.join(carried)}"


# --------------------------------------------------------------------------------------------
# The folder


@dataclass
class PortFolder:
    checkpoint: FairseqCheckpoint
    modelscope: ModelScopeSettings | None
    family: str | None
    tokenizer: object
    tokenizer_note: str


def image_size_of(old: dict, modelscope: ModelScopeSettings | None, option: int | None, config_path) -> int:
    """--image-size, else ModelScope's model.patch_image_size, else config.json's, else 256."""
    bucket = old.get("image_bucket_size", 42)
    bucket = bucket if isinstance(bucket, int) and not isinstance(bucket, bool) and bucket > 0 else 42
    if option is not None:
        return check_image_size(option, image_bucket_size=bucket, path="--image-size")
    if modelscope is not None:
        return check_image_size(modelscope.image_size, image_bucket_size=bucket, path=config_path.parent / CONFIGURATION,
                                key="model.patch_image_size")
    return check_image_size(old.get("patch_image_size", PORT_IMAGE_SIZE), image_bucket_size=bucket, path=config_path,
                            key="patch_image_size")


def open_port_folder(folder, *, image_size: int | None = None, tokenizer=None) -> PortFolder:
    import torch

    from ofaconv.core.keymap import KeyMap

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise OfaconvError("not a model folder (no config.json)", path=folder)
    old = read_json_object(config_path, "config.json")
    if old.get("model_type") != "ofa":
        raise OfaconvError(f"model_type is {old.get('model_type')!r}, not 'ofa': not a folder of an old OFA port",
                           path=config_path, key="model_type")
    args = port_arguments(old, config_path)
    modelscope = read_modelscope(folder, bucket=args["image_bucket_size"])
    size = image_size_of(old, modelscope, image_size, config_path)
    state, weights = load_port_weights(folder)
    from .variants import resnet_layers

    resnet = old.get("resnet_layers") or resnet_layers(args["resnet_type"])
    counts = {
        "encoder_layers": _typed(old.get("encoder_layers", 4), 4, path=config_path, key="encoder_layers"),
        "decoder_layers": _typed(old.get("decoder_layers", 4), 4, path=config_path, key="decoder_layers"),
        "resnet_layers": list(resnet),
    }
    KeyMap.load("ofa/hf_port").plan(state, counts, source_path=weights)  # fail closed on the port layout
    back = KeyMap.load("ofa/fairseq").plan(state, counts, source_path=weights, reverse=True)
    fairseq_state = {fairseq: state[port] for fairseq, port in back.entries}
    for name in list(back.derived):  # buffers keep their names in both layouts
        if name in state:
            fairseq_state[name] = state[name]
    for name in back.dropped:  # fairseq bookkeeping the ports never stored (version = 3)
        fairseq_state[name] = torch.tensor([3.0])
    embed = fairseq_state["encoder.embed_tokens.weight"]
    for alias in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        fairseq_state[alias] = state.get(alias, embed)
    family, source, note = choose_tokenizer(folder, int(embed.shape[0]),
                                            modelscope.family if modelscope else None, tokenizer)
    task_args = {"patch_image_size": size}
    if family is not None:
        task_args["bpe"] = {"en": "gpt2", "cn": "bert"}[family]
    if modelscope is not None:
        task_args["imagenet_default_mean_and_std"] = modelscope.image_mean != [0.5, 0.5, 0.5]
    checkpoint = FairseqCheckpoint(
        path=weights,
        state_dict=fairseq_state,
        model_args={**args, "patch_image_size": size},
        task_args=task_args,
        layout="hf-port",
        has_optimizer_state=False,
        has_ema=False,
    )
    return PortFolder(checkpoint, modelscope, family, source, note)


def upgrade_folder(old_folder, out_dir, *, image_size: int | None = None, tokenizer=None, prompt=None, **options):
    from ofaconv.core.writer import check_output

    from .convert import convert_loaded

    check_output(out_dir, force=options.get("force", False), protect=[old_folder])
    port = open_port_folder(old_folder, image_size=image_size, tokenizer=tokenizer)
    extra = {}
    ms = port.modelscope
    if ms is not None:
        fields = {"task": ms.task, "task_settings": {"source": "modelscope", "modelscope_task": ms.modelscope_task,
                                                      **ms.task_settings}}
        if ms.prompt is not None:
            fields["task_prompt"] = ms.prompt
        extra = {"generation": ms.generation, "image_stats": (ms.image_mean, ms.image_std), "config_fields": fields}
        if prompt is None and ms.task == "caption":
            prompt = ms.prompt  # the caption prompt ModelScope encodes
    result = convert_loaded(port.checkpoint, out_dir, kind="upgrade", protect=[old_folder], family=port.family,
                            tokenizer=port.tokenizer, prompt=prompt, **extra, **options)
    result.lines.insert(0, port.tokenizer_note)
    if ms is not None:
        result.lines.insert(1, f"task {ms.task} (ModelScope {ms.modelscope_task}), image size "
                               f"{port.checkpoint.model_args['patch_image_size']}, generation from "
                               f"configuration.json (beam {ms.generation['num_beams']}, max_len_b "
                               f"{ms.generation['max_len_b']})")
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("upgrade", help="turn a folder made for the old OFA ports into an ofaconv folder")
    p.add_argument("old_folder", help="OFA-Sys / OFA-Chinese / ModelScope style folder (pytorch_model.bin)")
    p.add_argument("out")
    p.add_argument("--image-size", type=int,
                   help="processor resolution (default: configuration.json's model.patch_image_size, "
                        "else config.json's patch_image_size, else 256)")
    p.add_argument("--verify", action="store_true", help="run the parity checker on the result")
    p.add_argument("--force", action="store_true")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--tokenizer", metavar="FOLDER",
                   help="vocabulary files (vocab.json + merges.txt or encoder.json + vocab.bpe + dict.txt for "
                        "English, vocab.txt for Chinese; default: the folder's own, else ofaconv's shipped)")
    p.add_argument("--prompt", help="caption prompt (default: configuration.json's, else the family's)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    result = upgrade_folder(
        args.old_folder, args.out, image_size=args.image_size, verify=args.verify, force=args.force,
        dtype=args.dtype, tokenizer=args.tokenizer, prompt=args.prompt,
    )
    report = result.report
    variant = report["variant"] or "unknown: its shapes match no released OFA"
    print(f"wrote {result.out_dir} (variant {variant}, family {report['family'] or 'unknown'})")
    for line in result.lines:
        print(line)
    if not result.passed:
        failed = ", ".join(c["name"] for c in report["checks"] if not c["passed"])
        print(f"ofaconv: error: verification failed ({failed}); see {result.out_dir}/conversion_report.json",
              file=sys.stderr)
        return 3
    return 0
