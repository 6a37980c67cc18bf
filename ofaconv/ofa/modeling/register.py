"""Register OFA with the transformers Auto* factories, each when its factory module is imported.

``import ofaconv`` calls ``register_lazily()``. Registering a model class means importing the
transformers model machinery (seconds, plus torchvision for the processors), which ``ofaconv
convert`` never needs; so each registration runs as a post-import hook on the transformers module
that defines the factory, or at once if that module is already imported. ``register()`` does all
of them now.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading


def _config(auto) -> None:
    from .configuration_ofa import OFAConfig

    auto.AutoConfig.register("ofa", OFAConfig, exist_ok=True)


def _models(auto) -> None:
    from .configuration_ofa import OFAConfig
    from .modeling_ofa import OFAForConditionalGeneration, OFAModel

    auto.AutoModel.register(OFAConfig, OFAModel, exist_ok=True)
    auto.AutoModelForSeq2SeqLM.register(OFAConfig, OFAForConditionalGeneration, exist_ok=True)
    # transformers 5's "image-text-to-text" pipeline (and its "image-to-text" alias) loads through this
    auto.AutoModelForImageTextToText.register(OFAConfig, OFAForConditionalGeneration, exist_ok=True)


def _image_processor(auto) -> None:
    from .configuration_ofa import OFAConfig
    from .image_processing_ofa import OFAImageProcessor

    auto.AutoImageProcessor.register(
        OFAConfig, image_processor_classes={"pil": OFAImageProcessor, "torchvision": OFAImageProcessor}, exist_ok=True
    )


def _processor(auto) -> None:
    from .configuration_ofa import OFAConfig
    from .processing_ofa import OFAProcessor

    auto.AutoProcessor.register(OFAConfig, OFAProcessor, exist_ok=True)


_AUTO = "transformers.models.auto."
# Every factory module imports configuration_auto first, so "ofa" is a known model_type before
# any other registration runs.
HOOKS = {
    _AUTO + "configuration_auto": _config,
    _AUTO + "modeling_auto": _models,
    _AUTO + "image_processing_auto": _image_processor,
    _AUTO + "processing_auto": _processor,
}


class _HookedLoader(importlib.abc.Loader):
    """The module's own loader, plus a callback once the module has executed."""

    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):  # get_source, get_resource_reader, ... of the real loader
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.pending = {}
        self._lock = threading.Lock()

    def find_spec(self, fullname, path, target=None):
        with self._lock:
            callback = self.pending.pop(fullname, None)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _HookedLoader(spec.loader, callback)
        return spec


_FINDER = _PostImportFinder()


def register_lazily() -> None:
    """Register now with every factory module already imported; hook the others."""
    for name, callback in HOOKS.items():
        module = sys.modules.get(name)
        if module is not None:
            callback(module)
        else:
            with _FINDER._lock:
                _FINDER.pending[name] = callback
    if _FINDER.pending and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def register() -> None:
    """Register OFA with AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoModelForImageTextToText,
    AutoImageProcessor and AutoProcessor."""
    for name, callback in HOOKS.items():
        callback(importlib.import_module(name))
