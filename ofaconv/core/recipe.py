"""Recipes: YAML files read into a dataclass schema, with ``base:`` inheritance and overrides.

Every recipe of every family is read the same way:

* YAML 1.2 core schema: ``5e-5`` and ``1e-3`` are floats; only ``true`` / ``false`` are booleans
  (``no``, ``yes``, ``on``, ``off`` stay strings); ``null`` / ``~`` / empty are null; no dates.
* ``base: other.yaml`` starts from another recipe (relative to the file naming it); mappings merge
  key by key, the naming file wins.
* Overrides ``a.b.c=value`` (``--override`` on the command line), the value read by the same rules.
* Fields marked with ``path_field()`` are resolved against the folder of the file that sets them
  (values from overrides or from a mapping: against the working directory).
* The schema is a tree of dataclasses: unknown keys, missing required keys (fields without a
  default) and values of the wrong type are one-line ``RecipeError``s naming the file and key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from ofaconv.core.errors import OfaconvError

__all__ = ["RecipeError", "RecipeSource", "load", "read_yaml", "path_field", "check_fields"]

T = TypeVar("T")
OVERRIDE = "--override"


class RecipeError(OfaconvError):
    """A recipe file or override that does not follow the schema."""


def path_field(default=None, **kwargs):
    """A schema field holding a path, resolved against the folder of the recipe file that sets it."""
    return dataclasses.field(default=default, metadata={"path": True}, **kwargs)


# ---------------------------------------------------------------------------------------------
# YAML 1.2 core schema
# ---------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers: dict = {}


def _resolver(tag: str, pattern: str, first) -> None:
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(pattern), list(first))


_resolver("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF")
_resolver("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789")
_resolver("float", r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$", "-+0123456789.")
_resolver("float", r"^(?:[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.")
_resolver("null", r"^(?:~|null|Null|NULL|)$", [*"~nN", ""])
_resolver("merge", r"^<<$", "<")


def _int(loader, node):
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)  # YAML 1.2: a leading zero is still decimal


def _float(loader, node):
    text = loader.construct_scalar(node).lower()
    if text.endswith(".nan"):
        return float("nan")
    return float(text.replace(".inf", "inf"))


_Loader.add_constructor("tag:yaml.org,2002:int", _int)
_Loader.add_constructor("tag:yaml.org,2002:float", _float)


def read_yaml(text: str) -> Any:
    """Parse YAML text with the recipe rules (YAML 1.2 core schema)."""
    return yaml.load(text, Loader=_Loader)


# ---------------------------------------------------------------------------------------------
# Schema introspection
# ---------------------------------------------------------------------------------------------


def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation is checked by the consumer instead
        return {}


def _fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _members(tp) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _section(tp):
    """The dataclass of a section field (``Spec`` or ``Spec | None``), else None."""
    found = [m for m in _members(tp) if dataclasses.is_dataclass(m)]
    return found[0] if found else None


def _conforms(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, member) for member in typing.get_args(tp))
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or any(value == m.value for m in tp)
    if dataclasses.is_dataclass(tp) or tp in (dict, Mapping) or origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if tp in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return True  # a construct this checker does not know: the consumer validates it


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(member) for member in typing.get_args(tp)))
    if origin is Literal:
        return " or ".join(repr(choice) for choice in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " or ".join(repr(m.value) for m in tp)
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping", list: "a list", tuple: "a list"}
    if dataclasses.is_dataclass(tp) or origin in (dict, Mapping) or tp is Mapping:
        return "a mapping"
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(values: Mapping, cls, prefix: str, *, reserved: Mapping[str, str] | None = None) -> None:
    """Check a plain mapping (e.g. ``training:``) against a dataclass's fields and their types.

    Unknown names (with the closest one suggested), names listed in ``reserved`` (name -> what to
    do instead) and values of the wrong type are ``RecipeError``s keyed ``prefix.name``.
    """
    hints, names = _hints(cls), _fields(cls)
    for key, value in values.items():
        dotted = f"{prefix}.{key}"
        if reserved and key in reserved:
            raise RecipeError(f"not settable here: {reserved[key]}", key=dotted)
        if key not in names:
            hint = difflib.get_close_matches(str(key), sorted(names), n=1)
            suggestion = f"; did you mean '{prefix}.{hint[0]}'?" if hint else ""
            raise RecipeError(f"not a {cls.__name__} field{suggestion}", key=dotted)
        tp = hints.get(key, Any)
        if not _conforms(value, tp):
            raise RecipeError(f"expected {_describe(tp)}, found {_short(value)}", key=dotted)


# ---------------------------------------------------------------------------------------------
# Reading, merging, overriding
# ---------------------------------------------------------------------------------------------


def _stamp(data, origin, prefix: tuple = ()) -> dict:
    out = {prefix: origin} if prefix else {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(_stamp(value, origin, prefix + (str(key),)))
    return out


def _merge(cls, base: dict, top: Mapping) -> dict:
    out = copy.deepcopy(base)
    fields, hints = (_fields(cls), _hints(cls)) if cls is not None else ({}, {})
    for key, value in top.items():
        field = fields.get(key)
        merge = field is None or field.metadata.get("merge", True)
        if merge and isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(_section(hints.get(key)), out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_paths(cls, data, folder: Path) -> None:
    """Make the relative paths of one file's mapping relative to that file's folder (in place)."""
    if cls is None or not isinstance(data, dict):
        return
    fields, hints = _fields(cls), _hints(cls)
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            continue
        if field.metadata.get("path") and isinstance(value, str) and value and not os.path.isabs(value):
            data[key] = os.path.abspath(os.path.join(folder, os.path.expanduser(value)))
        elif isinstance(value, dict):
            _resolve_paths(_section(hints.get(key)), value, folder)


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RecipeError("recipe not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe ({getattr(exc, 'strerror', None) or exc})", path=path) from None
    try:
        data = read_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = str(getattr(exc, "problem", None) or exc).replace("\n", " ")
        raise RecipeError(f"not valid YAML{where}: {problem}", path=path) from None
    except RecursionError:
        raise RecipeError("YAML nested too deeply to be a recipe", path=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping, found {type(data).__name__}", path=path)
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep:
        raise RecipeError(f"override {item!r} is not key=value", key=key or None)
    if not key:
        raise RecipeError(f"override {item!r} has an empty key")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = raw  # not YAML (e.g. an unbalanced bracket): the text as given
    return key, value


class RecipeSource:
    """A recipe mapping on its way to the schema, remembering which file set each key."""

    def __init__(self, schema, data: Mapping | None = None, origin=None):
        self.schema = schema
        self.data: dict = {}
        self.origins: dict = {}
        self.top = origin
        if data:
            self.merge(data, origin)

    @classmethod
    def open(cls, schema, recipe) -> RecipeSource:
        """From a YAML path (with its ``base:`` chain), a mapping, or a schema instance."""
        if isinstance(recipe, schema):
            data = {k: v for k, v in dataclasses.asdict(recipe).items() if k in _fields(schema)}
            return cls(schema, data, getattr(recipe, "source", None))
        if isinstance(recipe, Mapping):
            data = dict(recipe)
            data.pop("base", None)
            return cls(schema, data)
        source = cls(schema, origin=Path(recipe))
        source._read(Path(recipe), ())
        return source

    def _read(self, path: Path, seen: tuple) -> None:
        real = path.resolve()
        if real in seen:
            raise RecipeError("recipe inherits from itself (base: cycle)", path=path)
        data = _read_file(path)
        base = data.pop("base", None)
        if base is not None:
            if not isinstance(base, str):
                raise RecipeError("'base' must be a path to another recipe", path=path, key="base")
            self._read(Path(os.path.normpath(path.parent / base)), seen + (real,))
        _resolve_paths(self.schema, data, path.parent)
        self.merge(data, path)

    def merge(self, mapping: Mapping, origin=None) -> None:
        """Lay ``mapping`` over the recipe (its relative paths taken as they are)."""
        self.data = _merge(self.schema, self.data, mapping)
        self.origins.update(_stamp(mapping, origin))

    def pop(self, key: str, default=None):
        return self.data.pop(key, default)

    def override(self, overrides: Sequence[str] | Mapping[str, Any]) -> None:
        """Set dotted keys (``a.b.c=value`` strings or a mapping), creating sections as needed."""
        items = overrides.items() if isinstance(overrides, Mapping) else map(_parse_override, overrides)
        for key, value in items:
            node = self.data
            parts = key.split(".")
            for depth, part in enumerate(parts[:-1]):
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                if not isinstance(child, dict):
                    where = ".".join(parts[: depth + 1])
                    raise self.error(f"cannot set {key!r}: {where!r} is not a section", where)
                node = child
            node[parts[-1]] = value
            self.origins.update(_stamp(value, OVERRIDE, tuple(parts)))

    def origin(self, key: str | None):
        parts = tuple(key.split(".")) if key else ()
        for end in range(len(parts), 0, -1):
            if parts[:end] in self.origins:
                return self.origins[parts[:end]]
        return self.top

    def error(self, message: str, key: str | None) -> RecipeError:
        """A ``RecipeError`` naming the file that set ``key`` (or the recipe, for an override)."""
        origin = self.origin(key)
        if origin == OVERRIDE:
            return RecipeError(f"{message} (set with --override)", path=self.top, key=key)
        return RecipeError(message, path=origin, key=key)

    def build(self, validate: Callable[[Any], None] | None = None):
        """The schema instance: keys and types checked, then ``validate(instance)`` (cross-field rules)."""
        self._check_keys(self.schema, self.data, "")
        recipe = self._build(self.schema, self.data, "")
        if validate is not None:
            try:
                validate(recipe)
            except RecipeError as exc:
                if exc.path is not None:
                    raise
                raise self.error(exc.detail, exc.key) from None
        return recipe

    def _check_keys(self, cls, data: Mapping, prefix: str) -> None:
        fields, hints = _fields(cls), _hints(cls)
        for key, value in data.items():
            if key not in fields:
                hint = difflib.get_close_matches(str(key), sorted(fields), n=1)
                suggestion = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
                raise self.error(f"unknown recipe key '{prefix}{key}'{suggestion}", f"{prefix}{key}")
            section = _section(hints.get(key))
            if section is not None and isinstance(value, Mapping):
                self._check_keys(section, value, f"{prefix}{key}.")

    def _build(self, cls, data: Mapping, prefix: str):
        fields, hints = _fields(cls), _hints(cls)
        kwargs = {}
        for key, value in data.items():
            dotted, tp = f"{prefix}{key}", hints.get(key, Any)
            if not _conforms(value, tp):
                raise self.error(f"expected {_describe(tp)}, found {_short(value)}", dotted)
            section = _section(tp)
            if section is not None and isinstance(value, Mapping):
                value = self._build(section, value, f"{dotted}.")
            elif tp is float or (float in _members(tp) and int not in _members(tp)):
                value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
            kwargs[key] = value
        for name, field in fields.items():
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required and name not in kwargs:
                raise self.error("required, but not set", f"{prefix}{name}")
        return cls(**kwargs)


def load(schema: type[T], recipe, overrides: Sequence[str] | Mapping[str, Any] = (), *,
         validate: Callable[[T], None] | None = None) -> T:
    """Read a recipe (YAML path, mapping or schema instance), apply overrides, check, validate."""
    source = RecipeSource.open(schema, recipe)
    source.override(overrides)
    return source.build(validate)
