"""ofaconv: fairseq OFA checkpoints on current transformers, with proof of parity."""

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModel*``/``AutoProcessor`` know ``model_type: ofa`` without trust_remote_code."""
    from .modeling.register import register_lazily

    register_lazily()


_register_auto_classes()
