"""``ofaconv clip init``: a new BertCLIP from a CLIP checkpoint (vision tower, visual projection,
logit_scale) and a BERT checkpoint; the text projection is freshly initialised (normal, std
H^-0.5, the CLIP convention). Unlike ``VisionTextDualEncoderModel.from_vision_text_pretrained``,
the CLIP projection and temperature are kept."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ofaconv.core.errors import CheckpointError
from ofaconv.core.loader import check_finite, read_config, read_folder_state_dict
from ofaconv.core.digest import file_sha256
from ofaconv.core.writer import OutputFolder
from .convert import _clip_processor_from_dict, _load_tokenizer, vtde_config
from .architectures import apply_map, clip_tables
from .convert import source_entry, source_weights
from .package import ClipPackage, check_package, clip_report, reload_check, text_length, write_package

__all__ = ["init_bertclip"]


def init_bertclip(vision: str | os.PathLike, text: str | os.PathLike, out: str | os.PathLike, *,
                  max_length: int | None = None, seed: int = 0, force: bool = False) -> dict:
    vision, text = Path(vision), Path(text)
    vcfg = read_config(vision)
    if vcfg.get("model_type") == "clip":
        vision_config = vcfg.get("vision_config") or {}
        proj = vcfg.get("projection_dim", 512)
    elif vcfg.get("model_type") == "clip_vision_model":
        vision_config, proj = vcfg, vcfg.get("projection_dim", 512)
    else:
        raise CheckpointError("expected an OpenAI-style CLIPModel or CLIPVisionModelWithProjection folder",
                              path=vision / "config.json", key="model_type")
    vstate = read_folder_state_dict(vision)
    check_finite(vstate, path=vision)
    state = apply_map("clip/clip_to_vtde_vision", vstate, path=vision)
    if "visual_projection.weight" not in state:
        raise CheckpointError("the CLIP checkpoint has no visual projection", path=vision, key="visual_projection.weight")
    proj = state["visual_projection.weight"].shape[0]
    notes = []
    if "logit_scale" not in state:
        state["logit_scale"] = torch.tensor(math.log(100.0))
        notes.append("logit_scale absent from the vision checkpoint; set to ln(100)")

    tcfg = read_config(text)
    if tcfg.get("model_type") != "bert":
        raise CheckpointError("expected a BERT checkpoint", path=text / "config.json", key="model_type")
    tstate = read_folder_state_dict(text)
    check_finite(tstate, path=text)
    tmapped = apply_map(("clip/bert_to_vtde_text", "clip/bert_mlm_to_vtde_text"), tstate, path=text)
    hidden = tcfg["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    if "text_model.pooler.dense.weight" not in tmapped:  # MLM checkpoints often ship without the pooler
        tmapped["text_model.pooler.dense.weight"] = torch.randn(hidden, hidden, generator=g) * tcfg.get("initializer_range", 0.02)
        tmapped["text_model.pooler.dense.bias"] = torch.zeros(hidden)
        notes.append("BERT checkpoint has no pooler; initialised fresh (normal, std initializer_range)")
    state.update(tmapped)
    state["text_projection.weight"] = torch.randn(proj, hidden, generator=g) * hidden**-0.5
    config = vtde_config(vision_config, tcfg, proj, 2.6592, where=text / "config.json")
    pp_path = vision / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text()) if pp_path.is_file() else {}
    pkg = ClipPackage(kind="vtde", config=config, state=state,
                      image_processor=_clip_processor_from_dict(pp, config.vision_config.image_size),
                      tokenizer=_load_tokenizer(text, config.text_config.vocab_size),
                      max_length=text_length(config, max_length, clip_tables()["bertclip_max_length"],
                                             text / "config.json"),
                      extra={"source_format": "init", "vision_source": str(vision), "text_source": str(text),
                             "notes": notes})
    with OutputFolder(out, force=force, protect=[vision, text]) as folder:
        write_package(pkg, folder)
        checks = [reload_check(check_package(pkg, folder.path))]
        source = {"file": f"{vision.name} + {text.name}",
                  **{role: source_entry(path, file_sha256(path))
                     for role, path in (("vision", source_weights(vision)), ("text", source_weights(text)))}}
        folder.commit(clip_report(pkg, kind="conversion", source=source, checks=checks))
    return {"output": str(out), "projection_dim": proj, "logit_scale": float(state["logit_scale"]), "notes": notes}
