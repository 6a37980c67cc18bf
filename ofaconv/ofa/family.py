"""The OFA family's registry entry (see :mod:`ofaconv.core.registry`)."""

from ofaconv.core.registry import Family

FAMILY = Family(
    name="ofa",
    description="OFA / OFA-CN (fairseq OFA-Sys checkpoints) as a transformers seq2seq model",
    hooks="ofaconv.ofa.hooks",
    model_types=("ofa",),
    auto_register="ofaconv.ofa.modeling.register:register_lazily",
    order=0,
    commands={
        "convert": "ofaconv.ofa.convert",
        "inspect": "ofaconv.ofa.inspection",
        "synth": "ofaconv.ofa.synth",
        "caption": "ofaconv.ofa.caption",
        "predict": "ofaconv.ofa.predict",
        "upgrade": "ofaconv.ofa.upgrade",
        "finetune": "ofaconv.ofa.finetune.cli",
    },
)
