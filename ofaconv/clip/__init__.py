"""CLIP towers: BertCLIP (VisionTextDualEncoderModel) and Chinese-CLIP (ChineseCLIPModel) packages.

    from ofaconv.clip import ClipTowers, similarity, convert
    towers = ClipTowers.from_pretrained("bertclip-package/")
    img = towers.encode_images(["a.jpg"]); txt = towers.encode_texts(["一只猫"])

Names resolve lazily: the registry imports ``ofaconv.clip.family`` at ``import ofaconv``, which must
not pay for torch or transformers.
"""

from ofaconv.core.lazy import lazy_exports

_EXPORTS = {
    "ClipTowers": "towers",
    "load_image": "towers",
    "convert": "convert",
    "detect_source": "convert",
    "load_package": "convert",
    "similarity": "similarity",
    "SimilarityResult": "similarity",
    "MODES": "similarity",
    "export_bert": "export",
    "evaluate_retrieval": "evaluate",
    "recall_at_k": "evaluate",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
