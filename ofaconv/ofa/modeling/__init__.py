"""The OFA model family on transformers 5 (files here are self-contained and are copied into
converted folders for ``trust_remote_code``).

Names resolve lazily: ``from ofaconv.modeling.configuration_ofa import OFAConfig`` must not pay for
importing the transformers model machinery (seconds), which the converter never needs.
"""

import importlib

_EXPORTS = {
    "OFAConfig": "configuration_ofa",
    "OFADecoderCache": "modeling_ofa",
    "OFAEncoderOutput": "modeling_ofa",
    "OFAForConditionalGeneration": "modeling_ofa",
    "OFAModel": "modeling_ofa",
    "OFAPreTrainedModel": "modeling_ofa",
    "register": "register",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
