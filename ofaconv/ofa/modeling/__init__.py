"""The OFA model family on transformers 5 (files here are self-contained and are copied into
converted folders for ``trust_remote_code``).

Names resolve lazily: ``from ofaconv.modeling.configuration_ofa import OFAConfig`` must not pay for
importing the transformers model machinery (seconds), which the converter never needs.
"""

from ofaconv.core.lazy import lazy_exports

_EXPORTS = {
    "configuration_ofa": ["OFAConfig"],
    "modeling_ofa": ["OFADecoderCache", "OFAEncoderOutput", "OFAForConditionalGeneration", "OFAModel",
                     "OFAPreTrainedModel"],
    "register": ["register"],
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)


__getattr__ = lazy_exports(__name__, _EXPORTS)
