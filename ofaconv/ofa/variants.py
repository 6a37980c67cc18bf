"""The released OFA variants and their micro fixtures, read from ``mappings/variants.yaml``.

Shapes are never taken from here when converting (the converter infers them from the state
dict); this table names variants, drives ``ofaconv synth`` and holds per-family defaults a
checkpoint cannot tell (tokenizer, prompt, generation settings).
"""

from __future__ import annotations

import copy
import functools
from importlib.resources import files

import yaml

from ofaconv.core.errors import OfaconvError

SIZES = ("full", "micro")

# Shape fields of a variant's `model:` / `micro:` entries, compared by detect_variant.
SHAPE_FIELDS = ("d_model", "ffn_dim", "encoder_layers", "decoder_layers", "heads", "resnet_type")


@functools.lru_cache(maxsize=None)
def _load() -> dict:
    text = files("ofaconv.mappings").joinpath("ofa/variants.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or data.get("schema") != "ofaconv/variants@1":
        raise OfaconvError("unsupported schema (expected ofaconv/variants@1)", path="ofaconv/mappings/ofa/variants.yaml")
    for name, variant in data["variants"].items():
        if variant["family"] not in data["families"]:
            raise OfaconvError(f"variant {name} names unknown family {variant['family']!r}", path="ofaconv/mappings/ofa/variants.yaml")
        for section in ("model", "micro"):
            if variant[section]["resnet_type"] not in data["resnets"]:
                raise OfaconvError(
                    f"variant {name} ({section}) names unknown resnet {variant[section]['resnet_type']!r}",
                    path="ofaconv/mappings/ofa/variants.yaml",
                )
    return data


def load_variants() -> dict:
    """The whole parsed variants.yaml (a deep copy: callers may mutate it)."""
    return copy.deepcopy(_load())


def variant_names() -> list[str]:
    return list(_load()["variants"])


def get_variant(name: str) -> dict:
    variants = _load()["variants"]
    if name not in variants:
        raise OfaconvError(f"unknown OFA variant {name!r}; known: {', '.join(variants)}")
    return copy.deepcopy(variants[name])


def family(name: str) -> str:
    """Family ("en" / "cn") of a variant."""
    return get_variant(name)["family"]


def family_info(family_name: str) -> dict:
    families = _load()["families"]
    if family_name not in families:
        raise OfaconvError(f"unknown OFA family {family_name!r}; known: {', '.join(families)}")
    return copy.deepcopy(families[family_name])


def family_from_vocab_size(vocab_size: int | None) -> str | None:
    for name, info in _load()["families"].items():
        if info["vocab_size"] == vocab_size:
            return name
    return None


def family_from_bpe(bpe: str | None) -> str | None:
    for name, info in _load()["families"].items():
        if info["bpe"] == bpe:
            return name
    return None


def resnet_layers(resnet_type: str) -> list[int]:
    """Bottleneck blocks in layer1..layer3 for an OFA resnet name (OFA's resnet18/34 are Bottleneck too)."""
    resnets = _load()["resnets"]
    if resnet_type not in resnets:
        raise OfaconvError(f"unknown resnet type {resnet_type!r}; known: {', '.join(resnets)}")
    return list(resnets[resnet_type])


def resnet_type_for_layers(layers: list[int]) -> str | None:
    """Name for a block-count triple; a name used by a released variant wins a tie (resnet50 over resnet34)."""
    data = _load()
    candidates = [name for name, blocks in data["resnets"].items() if list(blocks) == list(layers)]
    used = {v["model"]["resnet_type"] for v in data["variants"].values()}
    for name in candidates:
        if name in used:
            return name
    return candidates[0] if candidates else None


def shape_config(name: str, size: str = "full") -> dict:
    """Everything needed to build a checkpoint of a variant at ``size`` ("full" or "micro").

    Keys: variant, family, arch, size, vocab_size, bpe, d_model, ffn_dim, encoder_layers,
    decoder_layers, heads, resnet_type, resnet_layers, patch_image_size, interpolate_position,
    orig_patch_image_size. Micro fixtures keep the family's vocabulary and the variant's flags.
    """
    if size not in SIZES:
        raise OfaconvError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    variant = get_variant(name)
    fam = family_info(variant["family"])
    task = dict(variant.get("task", {}))
    dims = dict(variant["model"] if size == "full" else variant["micro"])
    config = {
        "variant": name,
        "family": variant["family"],
        "arch": variant["arch"],
        "size": size,
        "vocab_size": fam["vocab_size"],
        "bpe": fam["bpe"],
        "d_model": dims["d_model"],
        "ffn_dim": dims["ffn_dim"],
        "encoder_layers": dims["encoder_layers"],
        "decoder_layers": dims["decoder_layers"],
        "heads": dims["heads"],
        "resnet_type": dims["resnet_type"],
        "resnet_layers": resnet_layers(dims["resnet_type"]),
        "patch_image_size": dims.get("patch_image_size", task.get("patch_image_size", 480)),
        "interpolate_position": bool(task.get("interpolate_position", False)),
        "orig_patch_image_size": dims.get("orig_patch_image_size", task.get("orig_patch_image_size", 256)),
    }
    if config["d_model"] % config["heads"]:
        raise OfaconvError(f"variant {name} ({size}): heads {config['heads']} do not divide d_model {config['d_model']}")
    return config


def generation_defaults(name: str) -> dict:
    """The family's generation settings with the variant's overrides (e.g. huge: beam 10, lenpen 0.98)."""
    variant = get_variant(name)
    settings = family_info(variant["family"])["generation"]
    settings.update(variant.get("generation", {}))
    return settings
