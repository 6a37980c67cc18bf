"""ofaconv: fairseq OFA checkpoints on current transformers, with proof of parity."""

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModel*`` know ``model_type: ofa`` without trust_remote_code."""
    try:
        from .modeling import register
    except ImportError:  # modeling not importable (e.g. partial checkout): nothing to register
        return
    register()


_register_auto_classes()
