"""The OFA model family on transformers 5 (files here are self-contained and are copied into
converted folders for ``trust_remote_code``).

Names resolve lazily: ``from ofaconv.modeling.configuration_ofa import OFAConfig`` must not pay for
importing the transformers model machinery (seconds), which the converter never needs.
"""

from ofaconv.core.lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, _EXPORTS)
