"""CLIP towers: BertCLIP (VisionTextDualEncoderModel) and Chinese-CLIP (ChineseCLIPModel) packages.

    from ofaconv.clip import ClipTowers, similarity, convert
    towers = ClipTowers.from_pretrained("bertclip-package/")
    img = towers.encode_images(["a.jpg"]); txt = towers.encode_texts(["一只猫"])

Names resolve lazily: the registry imports ``ofaconv.clip.family`` at ``import ofaconv``, which must
not pay for torch or transformers.
"""

from ofaconv.core.lazy import lazy_exports

_EXPORTS = {
    "towers": ["ClipTowers", "load_image"],
    "convert": ["convert", "detect_source", "load_package"],
    "similarity": ["similarity", "SimilarityResult", "MODES"],
    "embed": ["embed"],
    "export": ["export_bert"],
    "evaluate": ["evaluate_retrieval", "recall_at_k"],
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)


__getattr__ = lazy_exports(__name__, _EXPORTS)
