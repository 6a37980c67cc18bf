"""Lazy package attributes: ``from pkg import Name`` imports the module that defines ``Name`` only
when it is first asked for, so importing a package (``import ofaconv`` reaches every family's
package) never pays for torch or transformers."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, list[str]]) -> Callable[[str], object]:
    """A module ``__getattr__`` resolving the names of ``exports`` (submodule of ``package`` -> the
    names it defines) on demand."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{module}", package), name)

    return __getattr__
