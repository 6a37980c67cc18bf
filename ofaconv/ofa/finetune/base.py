"""The model a run starts from: a converted (or finetuned) folder, or a random initialisation.

A random initialisation (``model_init`` in a recipe: a config file or a variant of
mappings/variants.yaml) is written once as a folder in the converted format (weights, config,
tokenizer, processor, generation settings), so that the rest of the run treats both cases alike.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ofaconv.core.errors import OfaconvError
from ofaconv.core.report import REPORT_NAME, SCHEMA, load_report
from ofaconv.core.writer import OutputFolder, write_shards

__all__ = ["BaseModel", "load_base", "init_random_folder", "config_from_init", "save_model"]

# Files of a model folder that a finetune rewrites; everything else is carried over as is.
_REWRITTEN = {"config.json", "generation_config.json", REPORT_NAME, "README.md", "training_log.jsonl"}


@dataclass
class BaseModel:
    folder: Path
    model: torch.nn.Module
    processor: object
    family: str
    report: dict | None

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_size(self) -> int:
        size = self.processor.image_processor.size
        return int(size["height"]) if isinstance(size, dict) else int(size)


def _family(folder: Path, config, report: dict | None) -> str:
    from ofaconv.ofa.variants import family_from_vocab_size

    family = (report or {}).get("family") or family_from_vocab_size(getattr(config, "vocab_size", None))
    if family not in ("en", "cn"):
        raise OfaconvError("cannot tell the OFA family (en/cn) of this model: no report family and an unknown "
                           f"vocab_size {getattr(config, 'vocab_size', None)}", path=folder / "config.json")
    return family


def load_base(folder: str | os.PathLike) -> BaseModel:
    """Model (fp32), processor and family of a converted or finetuned folder."""
    import ofaconv  # noqa: F401  (registers the OFA Auto classes)
    from transformers import AutoProcessor

    from ofaconv.ofa.modeling import OFAForConditionalGeneration

    from ofaconv.ofa.caption import check_ofa_folder

    folder = check_ofa_folder(folder, "finetune")
    try:
        report = load_report(folder)
    except OfaconvError:
        report = None
    try:
        model = OFAForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise OfaconvError(f"cannot load the model ({str(exc).splitlines()[0]})", path=folder) from None
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise OfaconvError(f"cannot load the processor ({str(exc).splitlines()[0]}); the folder needs the "
                           "tokenizer and preprocessor files ofaconv convert writes", path=folder) from None
    family = _family(folder, model.config, report)
    return BaseModel(folder, model, processor, family, report)


def config_from_init(init) -> tuple[dict, str, str]:
    """(OFAConfig kwargs, family, description) for a recipe's ``model_init``."""
    if init.config is not None:
        path = Path(init.config)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OfaconvError("model_init config not found", path=path) from None
        except json.JSONDecodeError as exc:
            raise OfaconvError(f"not valid JSON ({exc})", path=path) from None
        family = raw.get("family")
        if family not in ("en", "cn"):
            raise OfaconvError("needs \"family\": \"en\" or \"cn\"", path=path, key="family")
        kwargs = {k: v for k, v in raw.items() if not k.startswith("_") and k not in ("family", "model_type")}
        return kwargs, family, f"random init from {path.name}"
    from ofaconv.ofa.variants import shape_config

    size = "micro" if init.micro else "full"
    shape = shape_config(init.variant, size)
    kwargs = {
        "vocab_size": shape["vocab_size"],
        "d_model": shape["d_model"],
        "encoder_layers": shape["encoder_layers"],
        "decoder_layers": shape["decoder_layers"],
        "encoder_attention_heads": shape["heads"],
        "decoder_attention_heads": shape["heads"],
        "encoder_ffn_dim": shape["ffn_dim"],
        "decoder_ffn_dim": shape["ffn_dim"],
        "resnet_type": shape["resnet_type"],
        "resnet_layers": shape["resnet_layers"],
        "patch_image_size": shape["patch_image_size"],
        "interpolate_position": shape["interpolate_position"],
        "orig_patch_image_size": shape["orig_patch_image_size"],
    }
    return kwargs, shape["family"], f"random init of {init.variant} ({size})"


def init_random_folder(init, folder: str | os.PathLike) -> Path:
    """Write a randomly initialised model in the converted-folder format (idempotent per settings)."""
    from ofaconv.ofa.convert import copy_remote_code
    from ofaconv.ofa.modeling import OFAConfig, OFAForConditionalGeneration
    from ofaconv.ofa.modeling.configuration_ofa import build_generation_config
    from ofaconv.ofa.modeling.settings_ofa import AUTO_MAP, CUSTOM_PIPELINES
    from ofaconv.ofa.tokenization import save_processing
    from ofaconv.ofa.variants import family_info

    folder = Path(folder)
    kwargs, family, description = config_from_init(init)
    stamp = json.loads(json.dumps({"config": kwargs, "family": family, "seed": init.seed}))  # as read back
    try:
        if load_report(folder).get("init") == stamp:
            return folder
    except OfaconvError:
        pass
    with OutputFolder(folder, force=True) as out:
        config = OFAConfig(
            **kwargs,
            architectures=["OFAForConditionalGeneration"],
            auto_map=dict(AUTO_MAP),
            custom_pipelines=copy.deepcopy(CUSTOM_PIPELINES),
        )
        with torch.random.fork_rng():
            torch.manual_seed(init.seed)
            model = OFAForConditionalGeneration(config)
        save_model(model, out)
        with out.recording():
            build_generation_config(family_info(family)["generation"], config).save_pretrained(out.path)
        save_processing(out, family, config.patch_image_size)
        copy_remote_code(out)
        out.commit({
            "schema": SCHEMA,
            "kind": "conversion",
            "model_family": "ofa",
            "source": {"file": description},
            "variant": getattr(init, "variant", None),
            "family": family,
            "init": stamp,
            "checks": [],
            "passed": False,
            "note": "randomly initialised; not converted from a checkpoint",
        })
    return folder


def save_model(model, folder: OutputFolder) -> None:
    """What ``model.save_pretrained`` writes (config, generation settings, safetensors without the
    tied copies), with the weights hashed as they are streamed out instead of read back."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    with folder.recording():
        model.config.save_pretrained(folder.path)
        if model.can_generate():
            model.generation_config.save_pretrained(folder.path)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    items = [(name, tuple(t.shape), t.dtype, functools.partial(_detached, t)) for name, t in state.items()]
    folder.add_entries(write_shards(folder.path, items).files)


def _detached(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach()


def carried_files(folder: Path) -> list[str]:
    """Files of the base folder copied unchanged into the finetuned one (tokenizer, processor,
    generation settings, modeling code for trust_remote_code)."""
    from ofaconv.core.report import folder_files, is_weight_file

    return [
        name for name in folder_files(folder)
        if "/" not in name and name not in _REWRITTEN and not is_weight_file(name)
    ]
