"""The OFA model family on transformers 5 (files here are self-contained and are copied into
converted folders for ``trust_remote_code``)."""

from .configuration_ofa import OFAConfig
from .modeling_ofa import (
    OFADecoderCache,
    OFAEncoderOutput,
    OFAForConditionalGeneration,
    OFAModel,
    OFAPreTrainedModel,
)
from .register import register

__all__ = [
    "OFAConfig",
    "OFADecoderCache",
    "OFAEncoderOutput",
    "OFAForConditionalGeneration",
    "OFAModel",
    "OFAPreTrainedModel",
    "register",
]
