"""CLIP towers: BertCLIP (VisionTextDualEncoderModel) and Chinese-CLIP (ChineseCLIPModel) packages.

    from ofaconv.clip import ClipTowers, similarity, convert
    towers = ClipTowers.from_pretrained("bertclip-package/")
    img = towers.encode_images(["a.jpg"]); txt = towers.encode_texts(["一只猫"])
"""

from .convert import convert, detect_source, load_package
from .evaluate import evaluate_retrieval, recall_at_k
from .export import export_bert
from .similarity import MODES, SimilarityResult, similarity
from .towers import ClipTowers, load_image

__all__ = [
    "ClipTowers",
    "load_image",
    "convert",
    "detect_source",
    "load_package",
    "similarity",
    "SimilarityResult",
    "MODES",
    "export_bert",
    "evaluate_retrieval",
    "recall_at_k",
]
