"""The family registry: what the core, the CLI and the publisher know of a model family.

A family (``ofaconv.ofa``, ``ofaconv.clip``, ...) declares one :class:`Family` object and names it
under the ``ofaconv.families`` entry point in ``pyproject.toml``. The core never imports a family
by name: the CLI finds a family's commands here, ``verify`` and ``push`` find the family of a
folder from its ``config.json`` / report and call the family's hooks module, which is imported
only when a folder of that family is handled (the registry itself imports nothing heavy, so
``ofaconv --help`` stays fast).

Hooks module (``Family.hooks``) protocol:

``verify_folder(folder, against=None, *, ema=None) -> (checks, passed)``
    The family's checks of a folder whose manifest :mod:`ofaconv.core.verify` has already checked
    (loading, probe forward; with ``against`` the full parity check against the source), as report
    check rows ``{"name", "passed", "metric", "value", "gate", "detail"}``.
``card(folder, config, report) -> dict``
    The family's part of the model card (:mod:`ofaconv.hub.card` fills in the rest from the
    report): ``pipeline_tag``, ``tags``, ``language``, ``library_name``, ``description``, ``usage``
    (``{repo}`` stands for the repo id), and optionally ``title`` and ``details`` rows.
``export_onnx(folder, out, **options)``
    ``ofaconv export onnx`` for the family's folders.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType

from .errors import OfaconvError

ENTRY_POINT_GROUP = "ofaconv.families"
CARD_ENTRY_POINT_GROUP = "ofaconv.card"  # the model-card writer, ``write_model_card(folder, **kwargs)``


@dataclass(frozen=True)
class Family:
    """One model family: its name, the folders it owns and the commands it adds to the CLI."""

    name: str
    description: str
    hooks: str  # module path of the family's hooks (imported lazily)
    model_types: tuple[str, ...] = ()  # config.json ``model_type`` values of its folders
    commands: dict[str, str] = field(default_factory=dict)  # CLI command -> module with add_parser
    auto_register: str = ""  # "module:function" run at ``import ofaconv`` (must import nothing heavy)
    order: int = 100  # position of the family's commands in ``ofaconv --help``

    def load_hooks(self) -> ModuleType:
        return importlib.import_module(self.hooks)


@functools.lru_cache(maxsize=None)
def families() -> tuple[Family, ...]:
    """Every installed family, in entry-point name order."""
    found = []
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        family = entry.load()
        if not isinstance(family, Family):
            raise OfaconvError(f"entry point {entry.value} is not an ofaconv Family", path="pyproject.toml")
        found.append(family)
    names = [f.name for f in found]
    if len(set(names)) != len(names):
        raise OfaconvError(f"two families share a name: {sorted(names)}", path="pyproject.toml")
    return tuple(sorted(found, key=lambda f: (f.order, f.name)))


def card_writer():
    """The model-card writer named by the ``ofaconv.card`` entry point (the publisher's), or None
    when none is installed or it cannot be imported. Output folders get their card through it, so
    a family never imports the publisher."""
    for entry in metadata.entry_points(group=CARD_ENTRY_POINT_GROUP, name="card"):
        try:
            return entry.load()
        except ImportError:
            return None
    return None


def register_auto_classes() -> None:
    """Run every family's ``auto_register`` (``import ofaconv`` does this)."""
    for fam in families():
        if fam.auto_register:
            module, _, function = fam.auto_register.partition(":")
            getattr(importlib.import_module(module), function)()


def family(name: str) -> Family:
    for candidate in families():
        if candidate.name == name:
            return candidate
    raise OfaconvError(f"unknown model family {name!r} (installed: {', '.join(f.name for f in families())})")


def commands() -> dict[str, str]:
    """CLI command -> module, over every family; a command two families claim is an error."""
    merged: dict[str, str] = {}
    for fam in families():
        for command, module in fam.commands.items():
            if command in merged:
                raise OfaconvError(f"families both define the command {command!r}", path="pyproject.toml")
            merged[command] = module
    return merged


def family_of_folder(folder: str | os.PathLike) -> Family:
    """The family that owns a model folder: the report's ``family_name`` first, else ``config.json``'s
    ``model_type``."""
    root = Path(folder)
    for name in ("conversion_report.json",):
        report = _read_json(root / name)
        if isinstance(report, dict) and isinstance(report.get("model_family"), str):
            return family(report["model_family"])
    config = _read_json(root / "config.json")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    for fam in families():
        if model_type in fam.model_types:
            return fam
    if config is None:
        raise OfaconvError("no config.json: not a model folder written by ofaconv", path=root)
    raise OfaconvError(
        f"model_type {model_type!r} belongs to no ofaconv family "
        f"(known: {', '.join(t for f in families() for t in f.model_types)})", path=root / "config.json")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise OfaconvError(f"unreadable JSON ({detail}); restore the file or convert again", path=path) from None
