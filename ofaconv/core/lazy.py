"""Lazy package attributes: ``from pkg import Name`` imports the module that defines ``Name`` only
when it is first asked for, so importing a package (``import ofaconv`` reaches every family's
package) never pays for torch or transformers."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, list[str]]) -> Callable[[str], object]:
    """A module ``__getattr__`` resolving the names of ``exports`` (submodule of ``package`` -> the
    names it defines; ``"public:defined"`` exports a name under another one) on demand."""
    where = {}
    for module, names in exports.items():
        for name in names:
            public, _, defined = name.partition(":")
            where[public] = (module, defined or public)

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, defined = where[name]
        return getattr(importlib.import_module(f".{module}", package), defined)

    return __getattr__
