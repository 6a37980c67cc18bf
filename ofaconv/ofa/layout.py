"""The fairseq OFA state-dict layout (``mappings/fairseq_layout.yaml``) expanded for one config.

``expected_keys(config)`` gives every key fairseq's ``state_dict()`` would write for a model of
that shape and structure, in fairseq's order, with shapes, kinds and tied aliases. The synthetic
checkpoint writer builds from it and ``checkpoint.validate_state_dict`` checks real files against it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.resources import files

import yaml

from ofaconv.core.errors import OfaconvError

LAYOUT_FILE = "ofa/fairseq_layout.yaml"

# Kinds stored as int64 in fairseq checkpoints; every other kind is floating point.
INTEGER_KINDS = frozenset({"token_rp_bucket", "image_rp_bucket", "image_position_idx", "bn_count"})

# Kinds that fairseq registers as buffers (not parameters: no optimizer state).
BUFFER_KINDS = frozenset({"version", "token_rp_bucket", "image_rp_bucket", "image_position_idx", "bn_mean", "bn_var", "bn_count"})

# Structural flags the layout's `if:` conditions read, with fairseq's values for the released
# models (ofa.md §A.1). infer_config derives each from key presence.
STRUCTURAL_FLAGS = {
    "layernorm_embedding": True,
    "patch_layernorm_embedding": True,
    "code_layernorm_embedding": True,
    "add_type_embedding": True,
    "encoder_normalize_before": True,
    "decoder_normalize_before": True,
    "scale_attn": True,
    "scale_fc": True,
    "scale_heads": True,
    "scale_resids": False,
    "share_all_embeddings": True,
    "share_decoder_input_output_embed": True,
    "bn_tracks_batches": True,
}

# fairseq builds the token bucket table with its default max_position, whatever max_source_positions is.
TOKEN_RP_SIZE = 1024
RESNET_OUT_CHANNELS = 1024


@dataclass(frozen=True)
class KeySpec:
    name: str
    shape: tuple[int, ...]
    kind: str
    tie: str | None = None  # the key whose storage this one shares (the root of the alias chain)

    @property
    def is_integer(self) -> bool:
        return self.kind in INTEGER_KINDS

    @property
    def is_buffer(self) -> bool:
        return self.kind in BUFFER_KINDS


@functools.lru_cache(maxsize=None)
def _layout() -> dict:
    text = files("ofaconv.mappings").joinpath(LAYOUT_FILE).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or data.get("schema") != "ofaconv/fairseq-layout@1":
        raise OfaconvError("unsupported schema (expected ofaconv/fairseq-layout@1)", path=f"ofaconv/mappings/{LAYOUT_FILE}")
    return data


def symbols(config: dict) -> dict:
    """Shape symbols of the layout from an infer_config-style dict."""
    tb = config.get("token_bucket_size", 256)
    ib = config.get("image_bucket_size", 42)
    return {
        "vocab": config["vocab_size"],
        "d_model": config["d_model"],
        "encoder_ffn": config["encoder_ffn_dim"],
        "decoder_ffn": config["decoder_ffn_dim"],
        "encoder_heads": config["encoder_attention_heads"],
        "decoder_heads": config["decoder_attention_heads"],
        "encoder_layers": config["encoder_layers"],
        "decoder_layers": config["decoder_layers"],
        "src_positions": config.get("max_source_positions", 1024) + 2,
        "tgt_positions": config.get("max_target_positions", 1024) + 2,
        "token_rp": TOKEN_RP_SIZE,
        "token_rel": 2 * tb - 1,
        "image_rel": (2 * ib - 1) ** 2 + 3,
        "image_positions": ib * ib + 1,
        "image_position_idx": config.get("image_position_idx_length") or 1026,
        "resnet_out": RESNET_OUT_CHANNELS,
    }


def expected_keys(config: dict) -> dict[str, KeySpec]:
    """Every key of a fairseq OFA state dict for ``config``, in fairseq's order."""
    layout = _layout()
    flags = {name: bool(config.get(name, default)) for name, default in STRUCTURAL_FLAGS.items()}
    scope = {**symbols(config), **flags}
    resnet_layers = list(config["resnet_layers"])
    if len(resnet_layers) != len(layout["resnet_stages"]):
        raise OfaconvError(f"resnet_layers must have {len(layout['resnet_stages'])} stages, got {resnet_layers}")
    out: dict[str, KeySpec] = {}
    _expand(layout["keys"], "", scope, layout, resnet_layers, out)
    return out


def _resolve(value, scope: dict):
    while isinstance(value, str):
        if value not in scope:
            raise OfaconvError(f"layout symbol {value!r} is not defined", path=f"ofaconv/mappings/{LAYOUT_FILE}")
        value = scope[value]
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _expand(entries: list, prefix: str, scope: dict, layout: dict, resnet_layers: list, out: dict) -> None:
    for entry in entries:
        if "if" in entry and not _resolve(entry["if"], scope):
            continue
        if "for" in entry:
            body = {k: v for k, v in entry.items() if k not in ("for", "if")}
            for i in range(_resolve(entry["for"], scope)):
                item = dict(body)
                for field in ("key", "at"):
                    if field in item:
                        item[field] = item[field].replace("{i}", str(i))
                _expand([item], prefix, scope, layout, resnet_layers, out)
        elif "use" in entry:
            bindings = {k: _resolve(v, scope) for k, v in entry.items() if k not in ("use", "at", "if")}
            block = layout["blocks"][entry["use"]]
            _expand(block, _join(prefix, entry["at"]), {**scope, **bindings}, layout, resnet_layers, out)
        elif "resnet" in entry:
            trunk = _join(prefix, entry["resnet"])
            for stage, blocks in zip(layout["resnet_stages"], resnet_layers):
                planes = stage["planes"]
                for b in range(blocks):
                    bindings = {
                        "planes": planes,
                        "out": 4 * planes,
                        "c_in": stage["first_in"] if b == 0 else 4 * planes,
                        "first_block": b == 0,
                    }
                    _expand(layout["blocks"]["bottleneck"], f"{trunk}.{stage['name']}.{b}", {**scope, **bindings}, layout, resnet_layers, out)
        else:
            name = _join(prefix, entry["key"])
            shape = tuple(int(_resolve(dim, scope)) for dim in entry["shape"])
            tie = None
            if "tie" in entry and _resolve(entry["tie"]["if"], scope):
                target = entry["tie"]["to"]
                tie = out[target].tie or target
            if name in out:
                raise OfaconvError(f"layout produces {name} twice", path=f"ofaconv/mappings/{LAYOUT_FILE}")
            out[name] = KeySpec(name, shape, entry["kind"], tie)
