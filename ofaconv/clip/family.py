"""The CLIP towers' registry entry (see :mod:`ofaconv.core.registry`)."""

from ofaconv.core.registry import Family

FAMILY = Family(
    name="clip",
    description="Chinese CLIP towers: BertCLIP (VisionTextDualEncoderModel) and Chinese-CLIP (ChineseCLIPModel)",
    hooks="ofaconv.clip.hooks",
    model_types=("vision-text-dual-encoder", "chinese_clip"),
    commands={"clip": "ofaconv.clip.cli"},
    order=10,
)
