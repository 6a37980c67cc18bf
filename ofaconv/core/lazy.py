"""Lazy package attributes: ``from pkg import Name`` imports the module that defines ``Name`` only
when it is first asked for, so importing a package (``import ofaconv`` reaches every family's
package) never pays for torch or transformers."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` resolving ``exports`` (name -> submodule of ``package``) on demand."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{module}", package), name)

    return __getattr__
