"""ofaconv: fairseq OFA checkpoints and the Chinese CLIP towers on current transformers, with proof
of parity.

The Python API mirrors the command line one to one (``docs/python-api.md``)::

    import ofaconv

    result = ofaconv.convert("ofa_cn_base.pt", "out/", verify=True)       # ofaconv convert
    checks, passed = ofaconv.verify("out/", against="ofa_cn_base.pt")     # ofaconv verify
    records = ofaconv.caption("out/", ["photos/"], out="captions.jsonl")  # ofaconv caption
    ofaconv.push("out/", "owner/name")                                    # ofaconv push
    ofaconv.export_onnx("out/", "out-onnx/")                              # ofaconv export onnx
    ofaconv.clip.convert("clip_cn_vit-b-16.pt", "cnclip/")                # ofaconv clip convert

Each name is imported on first use: ``import ofaconv`` costs milliseconds and pulls in neither
torch nor transformers.
"""

from .core.lazy import lazy_exports

__version__ = "0.1.0"

_API = {  # module -> "public name:name there"
    "ofa.convert": ["convert:convert_checkpoint"],
    "ofa.inspection": ["inspect:inspect_checkpoint"],
    "ofa.upgrade": ["upgrade:upgrade_folder"],
    "ofa.finetune": ["finetune"],
    "ofa.caption": ["caption"],
    "ofa.predict": ["predict"],
    "ofa.synth": ["synth:write_synthetic_checkpoint"],
    "core.verify": ["verify"],
    "core.export": ["export_onnx"],
    "hub.push": ["push:push_folder"],
}
__all__ = sorted(name.partition(":")[0] for names in _API.values() for name in names) + ["clip"]
__getattr__ = lazy_exports(__name__, _API)


def _register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModel*``/``AutoProcessor`` know every family's ``model_type``
    without trust_remote_code (each family's registration is lazy: it imports nothing heavy)."""
    from .core.registry import register_auto_classes

    register_auto_classes()


_register_auto_classes()
