"""ofaconv: fairseq OFA checkpoints on current transformers, with proof of parity."""

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModel*``/``AutoProcessor`` know every family's ``model_type``
    without trust_remote_code (each family's registration is lazy: it imports nothing heavy)."""
    from .core.registry import register_auto_classes

    register_auto_classes()


_register_auto_classes()
