"""Lazy package attributes: ``from pkg import Name`` imports the module that defines ``Name`` only
when it is first asked for, so importing a package (``import ofaconv`` reaches every family's
package) never pays for torch or transformers."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Callable


class _Package(types.ModuleType):
    """A package whose public names win over its submodules' names: importing the submodule
    ``pkg.convert`` would otherwise make ``pkg.convert`` that module instead of the function
    ``convert`` it defines (``from pkg.convert import x`` still finds the module in sys.modules)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_lazy_public", ()):
            return
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: dict[str, list[str]]) -> Callable[[str], object]:
    """A module ``__getattr__`` resolving the names of ``exports`` (submodule of ``package`` -> the
    names it defines; ``"public:defined"`` exports a name under another one) on demand."""
    where = {}
    for module, names in exports.items():
        for name in names:
            public, _, defined = name.partition(":")
            where[public] = (module, defined or public)
    pkg = sys.modules[package]
    pkg._lazy_public = frozenset(where)
    pkg.__class__ = _Package

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, defined = where[name]
        return getattr(importlib.import_module(f".{module}", package), defined)

    return __getattr__
