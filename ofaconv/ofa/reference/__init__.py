"""Independent fairseq OFA reference: the forward pass and SequenceGenerator that parity checks
measure the converted model against. Reads raw fairseq state dicts; shares no code with
``ofaconv.ofa.modeling``."""

from ofaconv.ofa.reference.forward import FairseqReference, model_args_from_checkpoint
from ofaconv.ofa.reference.generator import SequenceGenerator

__all__ = ["FairseqReference", "SequenceGenerator", "model_args_from_checkpoint"]
