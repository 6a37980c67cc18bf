"""Register OFA with the transformers Auto* factories (``import ofaconv`` calls this)."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration_ofa import OFAConfig
from .modeling_ofa import OFAForConditionalGeneration, OFAModel


def register() -> None:
    AutoConfig.register("ofa", OFAConfig, exist_ok=True)
    AutoModel.register(OFAConfig, OFAModel, exist_ok=True)
    AutoModelForSeq2SeqLM.register(OFAConfig, OFAForConditionalGeneration, exist_ok=True)
    try:
        from .processing_ofa import register_processing
    except ImportError:  # processing not importable in this checkout
        return
    register_processing()
