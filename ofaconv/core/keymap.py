"""Declarative key maps: YAML files that name every key of a checkpoint layout, and the plans they give.

A map (``mappings/*.yaml``, schema ``ofaconv/keymap@1``) lists rules over key *templates*. Typed
placeholders are expanded eagerly from the counts the converter infers, so the complete expected key
set is known before any tensor is read:

- ``{i:encoder_layers}`` 0..n-1 for an integer count (for a list count: its length);
- ``{s:1..resnet_layers}`` the same, starting at 1 (torchvision's ``layer1``..``layer3``);
- ``{k:resnet_layers[s]}`` 0..n-1 with n = ``resnet_layers[ordinal of s]`` (blocks per stage);
- ``{p:q_proj|k_proj|v_proj|out_proj}`` an alternation;
- ``{i}`` in a ``to`` template refers back to a placeholder of the ``from`` template.

Sections: ``keep`` (same name on both sides), ``rename`` (``from`` -> ``to``), ``drop`` (consumed,
never copied), ``derived`` (buffers the model computes itself: the source tensor is consumed only
for a one-time equality check), ``tied`` (an alias of a ``canonical`` target: stored once, the
source alias is checked equal to the canonical source), ``convert`` (``from`` -> ``to`` through an
``op`` of a closed vocabulary, each with a declared inverse, so reverse plans invert it bit-exactly:

- ``transpose``: one 2-D source -> one target;
- ``chunk``: one source split along dim 0 into n equal parts, one per target, in order;
- ``concat``: n sources of one shape joined along dim 0 -> one target (the inverse of ``chunk``)),
and ``include`` (``{map: NAME, from_prefix: .., to_prefix: .., drop: false}``: every rule of another
key map, with the prefixes put in front of its source and target templates; ``drop: true`` drops
what the included map would read). Any entry may say ``optional: true``.

Invariants of a plan (fail closed): every source key is consumed exactly once; every expected
source key is present unless optional; a key claimed by two rules is an "ambiguous rule"; a rule
none of whose keys are present is a "dead rule"; with expected shapes given, every tensor has the
shape its target expects; an op's input shapes fit the op. A plan can be made in reverse
(target layout back to source names). Plans never touch tensor data: ``Plan.materialize(state)``
(or ``Plan.thunks``) applies the ops when a tensor is asked for.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import re
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import yaml

from .errors import KeyMapError

SCHEMA = "ofaconv/keymap@1"

_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^{}]*))?\}")
_COUNT_SPEC = re.compile(r"(?:(\d+)\.\.)?(\w+)(?:\[(\w+)\])?")
_ALTERNATIVE = re.compile(r"[\w.\-]+")
_TOP_FIELDS = {"schema", "description", "source", "target", "include", "keep", "rename", "drop", "derived", "tied",
               "convert"}
_ENTRY_FIELDS = {
    "keep": ({"key"}, {"optional"}),
    "drop": ({"key"}, {"optional"}),
    "derived": ({"key"}, {"optional"}),
    "rename": ({"from", "to"}, {"optional"}),
    "tied": ({"alias", "canonical"}, {"optional"}),
}
_CONVERT_FIELDS = {"from", "to", "op", "optional"}
_INCLUDE_FIELDS = {"map", "from_prefix", "to_prefix", "drop", "optional"}
_MAX_LISTED = 12  # groups of keys named in one error line


# -- ops: (inverse, arity check, output shapes from input shapes, tensors -> tensors) ---------------
def _transpose_shapes(shapes, n_out):
    if len(shapes[0]) != 2:
        raise ValueError(f"transpose needs a 2-D tensor, got shape {shapes[0]}")
    return [shapes[0][::-1]]


def _chunk_shapes(shapes, n_out):
    if not shapes[0] or shapes[0][0] % n_out:
        raise ValueError(f"chunk: dim 0 of shape {shapes[0]} does not split into {n_out} equal parts")
    return [(shapes[0][0] // n_out, *shapes[0][1:])] * n_out


def _concat_shapes(shapes, n_out):
    if any(not s or s != shapes[0] for s in shapes):  # equal parts, so that chunk inverts it exactly
        raise ValueError(f"concat needs equal shapes, got {', '.join(map(str, shapes))}")
    return [(sum(s[0] for s in shapes), *shapes[0][1:])]


def _concat(tensors, n_out):
    import torch

    return [torch.cat(tensors, dim=0)]


class Op(NamedTuple):
    inverse: str
    arity: Callable[[int, int], bool]  # (n inputs, n outputs) -> allowed
    shapes: Callable[[list, int], list]  # raises ValueError naming the problem
    apply: Callable[[list, int], list]


OPS = {
    "transpose": Op("transpose", lambda i, o: i == o == 1, _transpose_shapes, lambda t, n: [t[0].t().contiguous()]),
    "chunk": Op("concat", lambda i, o: i == 1 and o >= 2, _chunk_shapes,
                lambda t, n: [c.contiguous() for c in t[0].split(t[0].shape[0] // n, dim=0)]),
    "concat": Op("chunk", lambda i, o: i >= 2 and o == 1, _concat_shapes, _concat),
}


class Conversion(NamedTuple):
    """Outputs computed from inputs by one op (names of the plan's direction)."""

    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    op: str


class TensorMeta(NamedTuple):
    """Name-less description of a tensor (what a key fixture or a checkpoint header holds)."""

    shape: tuple[int, ...]
    dtype: str


def read_key_list(path) -> dict[str, TensorMeta]:
    """Read a key fixture: one ``name<TAB>d0,d1,..<TAB>dtype`` line per tensor (empty shape = scalar)."""
    metas = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            name, shape, dtype = line.split("\t")
            metas[name] = TensorMeta(tuple(int(d) for d in shape.split(",") if d), dtype)
    return metas


def natural_key(key: str):
    """Sort key treating numeric dot-segments as integers (``layers.2`` before ``layers.10``)."""
    return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in key.split("."))


def _ranges(values: list[int]) -> str:
    runs: list[list[int]] = []
    for v in values:  # sorted, unique
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    if len(values) == 1:
        return str(values[0])
    shown = (f"{a}..{b}" if b > a + 1 else (f"{a},{b}" if b > a else str(a)) for a, b in runs)
    return "{" + ",".join(shown) + "}"


def _product_cover(tuples: list[tuple[int, ...]]) -> list[list[str]]:
    """Split unique index tuples into full products (one range per column), so nothing is overstated."""
    if not tuples[0]:
        return [[]]
    columns = [sorted({t[i] for t in tuples}) for i in range(len(tuples[0]))]
    if len(tuples) == math.prod(map(len, columns)):
        return [[_ranges(c) for c in columns]]
    firsts: dict[tuple[str, ...], list[int]] = {}  # split on the first index, merge equal remainders
    for v in columns[0]:
        for rest in _product_cover([t[1:] for t in tuples if t[0] == v]):
            firsts.setdefault(tuple(rest), []).append(v)
    return [[_ranges(vs), *rest] for rest, vs in firsts.items()]


def collapse_keys(keys) -> list[str]:
    """Collapse numeric segments exactly: ``encoder.layers.{0..11}.fc1.weight``."""
    groups: dict[tuple, set[tuple[int, ...]]] = {}
    for key in keys:
        parts = key.split(".")
        shape = tuple(None if p.isdigit() else p for p in parts)
        groups.setdefault(shape, set()).add(tuple(int(p) for p in parts if p.isdigit()))
    lines = []
    for shape, tuples in groups.items():
        for columns in _product_cover(sorted(tuples)):
            shown = iter(columns)
            lines.append(".".join(p if p is not None else next(shown) for p in shape))
    return sorted(lines, key=lambda s: natural_key(re.sub(r"\{(\d+)[^}]*\}", r"\1", s)))


def _listing(keys) -> str:
    lines = collapse_keys(keys)
    more = f" (and {len(lines) - _MAX_LISTED} more)" if len(lines) > _MAX_LISTED else ""
    return ", ".join(lines[:_MAX_LISTED]) + more


def _render(template: str, bindings: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: bindings[m.group(1)], template)


def _pattern(template: str) -> re.Pattern:
    """Regex matching the template's keys *and* their collapsed forms (``layers.{0..11}``)."""
    parts, last, seen = [], 0, set()
    for m in _PLACEHOLDER.finditer(template):
        name = m.group(1)
        parts.append(re.escape(template[last : m.start()]))
        parts.append(f"(?P={name})" if name in seen else rf"(?P<{name}>\{{[^}}]*\}}|[^.{{}}]+)")
        seen.add(name)
        last = m.end()
    return re.compile("".join(parts) + re.escape(template[last:]))


def _index_pattern(template: str, name: str) -> re.Pattern:
    """Regex for the keys of ``template`` capturing placeholder ``name`` as digits."""
    parts, last = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[last : m.start()]))
        if m.group(1) != name:
            parts.append(r".+?")
        else:
            parts.append(rf"(?P<{name}>\d+)" if f"(?P<{name}>" not in "".join(parts) else f"(?P={name})")
        last = m.end()
    return re.compile("".join(parts) + re.escape(template[last:]))


@dataclass(frozen=True)
class Rule:
    kind: str  # rename (keep is a rename to the same name) | drop | derived | tied | convert
    source: str  # template in the source layout; defines the placeholders
    target: str | None  # template in the target layout (None for drop)
    canonical: str | None = None  # tied: the target the alias shares storage with
    optional: bool = False
    op: str | None = None  # convert: the op, in the forward direction
    sources: tuple[str, ...] = ()  # convert: all source templates (source is the first)
    targets: tuple[str, ...] = ()  # convert: all target templates (target is the first)

    def __str__(self):
        if self.kind == "convert":
            return f"convert {self.op} {list(self.sources)} -> {list(self.targets)}"
        arrow = f" -> '{self.target}'" if self.target not in (None, self.source) else ""
        return f"{self.kind} '{self.source}'{arrow}"

    def sides(self, reverse: bool) -> tuple[str | None, str | None]:
        """(input template, output template) for the direction of a plan."""
        return (self.target, self.source) if reverse else (self.source, self.target)

    def converts(self, reverse: bool) -> tuple[tuple[str, ...], tuple[str, ...], str]:
        """(input templates, output templates, op) of a convert rule for the direction of a plan."""
        if reverse:
            return self.targets, self.sources, OPS[self.op].inverse
        return self.sources, self.targets, self.op

    def prefixed(self, src: str, dst: str) -> "Rule":
        add = lambda prefix, t: None if t is None else prefix + t  # noqa: E731
        return Rule(self.kind, add(src, self.source), add(dst, self.target), add(dst, self.canonical), self.optional,
                    self.op, tuple(src + t for t in self.sources), tuple(dst + t for t in self.targets))


@dataclass
class Plan:
    """What happens to every key. Names are (output, input): (target, source), or the reverse."""

    keymap: "KeyMap"
    reverse: bool = False
    entries: list[tuple[str, str]] = field(default_factory=list)  # (output, input), natural order
    dropped: list[str] = field(default_factory=list)  # forward: input keys discarded; reverse: output names with no data
    derived: dict[str, str] = field(default_factory=dict)  # buffer the model computes -> input key to check it against
    tied: dict[str, str] = field(default_factory=dict)  # output alias -> output canonical (always recorded)
    tied_sources: dict[str, str] = field(default_factory=dict)  # input alias present -> input key of its canonical
    absent: list[tuple[str, str]] = field(default_factory=list)  # optional (output, input) whose input is absent
    matches: dict[str, Rule] = field(default_factory=dict, repr=False)  # input key -> the rule consuming it
    converted: list[Conversion] = field(default_factory=list)  # outputs computed by an op, natural order

    @property
    def targets(self) -> list[str]:
        return sorted([out for out, _ in self.entries] + [o for c in self.converted for o in c.outputs], key=natural_key)

    def rename(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The output state dict (the same objects, no copies) in plan order; aliases not repeated."""
        if self.converted:
            raise KeyMapError(f"key map {self.keymap.name} has ops; use Plan.materialize", key=self.converted[0].inputs[0])
        return {out: state[key] for out, key in self.entries}

    def thunks(self, state: Mapping[str, Any]) -> dict[str, Callable[[], Any]]:
        """Output name -> function giving its tensor (a renamed tensor as is, an op applied on call)."""
        out: dict[str, Callable[[], Any]] = {name: (lambda key=key: state[key]) for name, key in self.entries}
        for conv in self.converted:
            for i, name in enumerate(conv.outputs):
                out[name] = lambda conv=conv, i=i: OPS[conv.op].apply([state[k] for k in conv.inputs], len(conv.outputs))[i]
        return {name: out[name] for name in sorted(out, key=natural_key)}

    def materialize(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The output state dict in plan order; ops applied now (each op once), renamed tensors not copied."""
        out = {name: state[key] for name, key in self.entries}
        for conv in self.converted:
            out.update(zip(conv.outputs, OPS[conv.op].apply([state[k] for k in conv.inputs], len(conv.outputs))))
        return {name: out[name] for name in sorted(out, key=natural_key)}

    def summary_lines(self, verbose: bool = False) -> list[str]:
        """Report for ``ofaconv inspect``: what happens to each key, layer indices collapsed."""
        lines = [
            f"key map {self.keymap.name}{' (reverse)' if self.reverse else ''}, sha256 {self.keymap.sha256[:12]}: "
            f"{len(self.matches)} input keys -> {len(self.targets)} tensors; "
            f"{len(self.tied)} tied, {len(self.derived)} derived, {len(self.dropped)} dropped"
        ]
        by_rule: dict[Rule, list[str]] = {}
        for key, rule in self.matches.items():
            by_rule.setdefault(rule, []).append(key)
        kept = 0
        for rule in self.keymap.rules:
            if rule.kind == "rename" and rule.source == rule.target and not verbose:
                kept += len(by_rule.get(rule, []))
            elif rule.kind == "rename":
                into, out = rule.sides(self.reverse)
                for shown in collapse_keys(by_rule.get(rule, [])):
                    if rule.source == rule.target:
                        lines.append(f"  keep     {shown}")
                    else:
                        lines.append(f"  rename   {shown} -> {_render(out, _pattern(into).fullmatch(shown).groupdict())}")
            elif rule.kind == "convert":
                ins, outs, op = rule.converts(self.reverse)
                firsts = [k for k in by_rule.get(rule, []) if _pattern(ins[0]).fullmatch(k)]
                for shown in collapse_keys(firsts):
                    b = _pattern(ins[0]).fullmatch(shown).groupdict()
                    lines.append(f"  {op:<8} {', '.join(_render(t, b) for t in ins)} -> {', '.join(_render(t, b) for t in outs)}")
        if kept:
            lines.append(f"  keep     {kept} keys unchanged")
        lines += [f"  tied     {alias} = {canonical}" for alias, canonical in self.tied.items()]
        lines += [f"  derived  {out} (computed by the model, checked against {key})" for out, key in self.derived.items()]
        lines += [f"  drop     {key}" for key in collapse_keys(self.dropped)]
        lines += [f"  absent   {key} (optional)" for key in collapse_keys(k for _, k in self.absent)]
        return lines


class KeyMap:
    """A validated key map: ``KeyMap.load("ofa/fairseq")`` (shipped, ``mappings/<family>/<name>.yaml``)
    or ``KeyMap.load(path)``."""

    def __init__(self, data: Any, *, path: str, sha256: str, name: str | None = None):
        self.path, self.sha256 = path, sha256
        self.name = name or Path(path).stem
        self.description = ""
        self.rules: list[Rule] = []
        self.includes: list["KeyMap"] = []
        self._parse(data)
        if self.includes:  # the identity of a map covers what it includes
            self.sha256 = hashlib.sha256(" ".join([sha256, *(m.sha256 for m in self.includes)]).encode()).hexdigest()

    @staticmethod
    def available() -> list[str]:
        """Names of the key maps shipped in ``ofaconv.mappings``."""
        root = importlib.resources.files("ofaconv.mappings")
        return sorted(f"{family.name}/{p.name[:-5]}" for family in root.iterdir() if family.is_dir()
                      for p in family.iterdir() if p.name.endswith(".yaml") and _is_keymap(p))

    @classmethod
    def load(cls, name_or_path) -> "KeyMap":
        path, name = Path(name_or_path), None
        if not path.is_file():
            resource = importlib.resources.files("ofaconv.mappings").joinpath(f"{name_or_path}.yaml")
            if not resource.is_file():
                raise KeyMapError(f"no such key map (shipped: {', '.join(cls.available())})", path=name_or_path)
            path, name = Path(str(resource)), str(name_or_path)
        raw = path.read_bytes()
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise KeyMapError(f"not valid YAML: {' '.join(str(exc).split())}", path=path) from None
        except RecursionError:
            raise KeyMapError("YAML nested too deeply to be a key map", path=path) from None
        return cls(data, path=str(path), sha256=hashlib.sha256(raw).hexdigest(), name=name)

    # -- validation ------------------------------------------------------------------------------

    def _fail(self, message: str):
        raise KeyMapError(message, path=self.path)

    def _parse(self, data):
        if not isinstance(data, dict):
            self._fail("a key map must be a YAML mapping")
        unknown = sorted(set(data) - _TOP_FIELDS)
        if unknown:
            self._fail(f"unknown field '{unknown[0]}' (allowed: {', '.join(sorted(_TOP_FIELDS))})")
        if data.get("schema") != SCHEMA:
            self._fail(f"field 'schema' must be '{SCHEMA}', got {data.get('schema')!r}")
        for text_field in ("description", "source", "target"):
            if not isinstance(data.get(text_field, ""), str):
                self._fail(f"field '{text_field}' must be a string")
        self.description = data.get("description", "")
        for n, entry in enumerate(self._entries(data, "include")):
            self._include(entry, f"include[{n}]")
        for section, (required, optional) in _ENTRY_FIELDS.items():
            entries = data.get(section) or []
            if not isinstance(entries, list):
                self._fail(f"field '{section}' must be a list")
            for n, entry in enumerate(entries):
                where = f"{section}[{n}]"
                if isinstance(entry, str) and required == {"key"}:
                    entry = {"key": entry}
                if not isinstance(entry, dict):
                    self._fail(f"{where} must be a mapping with fields {', '.join(sorted(required | optional))}")
                if set(entry) - required - optional:
                    self._fail(f"unknown field '{sorted(set(entry) - required - optional)[0]}' in {where}")
                if required - set(entry):
                    self._fail(f"{where} lacks field '{sorted(required - set(entry))[0]}'")
                if not isinstance(entry.get("optional", False), bool):
                    self._fail(f"{where}: field 'optional' must be true or false")
                if any(not isinstance(entry[f], str) or not entry[f] for f in required):
                    self._fail(f"{where}: fields {', '.join(sorted(required))} must be non-empty strings")
                self.rules.append(self._rule(section, entry, where))
        for n, entry in enumerate(self._entries(data, "convert")):
            self.rules.append(self._convert_rule(entry, f"convert[{n}]"))

    def _entries(self, data, section: str) -> list[dict]:
        entries = data.get(section) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            self._fail(f"field '{section}' must be a list of mappings")
        return entries

    def _include(self, entry: dict, where: str):
        if set(entry) - _INCLUDE_FIELDS or "map" not in entry:
            self._fail(f"{where}: want fields map, from_prefix, to_prefix, drop, optional (map required)")
        prefixes = [entry.get("from_prefix", ""), entry.get("to_prefix", "")]
        if not all(isinstance(p, str) and "{" not in p and "}" not in p for p in prefixes):
            self._fail(f"{where}: prefixes must be plain strings without placeholders")
        if not all(isinstance(entry.get(f, False), bool) for f in ("drop", "optional")):
            self._fail(f"{where}: fields drop and optional must be true or false")
        name = entry["map"]
        local = Path(self.path).parent / f"{name}.yaml"
        included = KeyMap.load(local if local.is_file() else name)
        self.includes.append(included)
        for rule in included.rules:
            rule = rule.prefixed(*prefixes)
            optional = rule.optional or entry.get("optional", False)
            if entry.get("drop"):
                self.rules += [Rule("drop", s, None, optional=optional) for s in (rule.sources or (rule.source,))]
            else:
                self.rules.append(dataclasses.replace(rule, optional=optional))

    def _convert_rule(self, entry: dict, where: str) -> Rule:
        if set(entry) - _CONVERT_FIELDS or {"from", "to", "op"} - set(entry):
            self._fail(f"{where}: want fields from, to, op (optional: optional)")
        op = entry["op"]
        if op not in OPS:
            self._fail(f"{where}: unknown op {op!r} (known: {', '.join(OPS)})")
        sources, targets = ([x] if isinstance(x, str) else x for x in (entry["from"], entry["to"]))
        if not all(isinstance(t, str) and t for t in (*sources, *targets)):
            self._fail(f"{where}: from and to must be non-empty strings or lists of them")
        if not OPS[op].arity(len(sources), len(targets)):
            self._fail(f"{where}: op {op} cannot map {len(sources)} sources to {len(targets)} targets")
        if len(set(sources)) < len(sources) or len(set(targets)) < len(targets):
            self._fail(f"{where}: a template is listed twice")
        first = self._rule("rename", {"from": sources[0], "to": targets[0], "optional": entry.get("optional", False)}, where)
        for template in (*sources[1:], *targets[1:]):  # placeholders are typed in the first source only
            self._rule("rename", {"from": sources[0], "to": template}, where)
        if not isinstance(entry.get("optional", False), bool):
            self._fail(f"{where}: field 'optional' must be true or false")
        return Rule("convert", sources[0], targets[0], None, first.optional, op, tuple(sources), tuple(targets))

    def _rule(self, section: str, entry: dict, where: str) -> Rule:
        source = entry.get("from") or entry.get("key") or entry.get("alias")
        defined: list[str] = []
        for m in _PLACEHOLDER.finditer(source):
            name, spec = m.groups()
            if spec is None or name in defined:
                self._fail(f"{where}: placeholder '{name}' in '{source}' must be typed exactly once, e.g. {{{name}:encoder_layers}}")
            count = _COUNT_SPEC.fullmatch(spec)
            if not ("|" in spec and all(_ALTERNATIVE.fullmatch(a) for a in spec.split("|"))) and not (
                count and count.group(3) in (None, *defined)
            ):
                self._fail(f"{where}: bad placeholder '{{{name}:{spec}}}' (want count, N..count, count[placeholder] or a|b)")
            defined.append(name)
        target = entry["to"] if section == "rename" else None
        for template in (target, entry.get("canonical")):
            if template is None:
                continue
            used = [m.group(1) for m in _PLACEHOLDER.finditer(template)]
            if any(m.group(2) is not None for m in _PLACEHOLDER.finditer(template)) or set(used) - set(defined):
                self._fail(f"{where}: '{template}' may only refer to placeholders of '{source}', as {{name}}")
            if template is target and set(defined) - set(used):
                self._fail(f"{where}: '{target}' leaves out placeholder '{sorted(set(defined) - set(used))[0]}'")
        if section != "drop" and target is None:
            target = source  # keep, derived and tied entries have the same name on both sides
        kind = "rename" if section == "keep" else section
        return Rule(kind, source, target, entry.get("canonical"), entry.get("optional", False))

    # -- expansion and planning ------------------------------------------------------------------

    def _expand(self, rule: Rule, counts: Mapping[str, Any]) -> list[dict[str, str]]:
        combos: list[tuple[dict, dict]] = [({}, {})]  # (bindings, ordinal of each bound value)
        for m in _PLACEHOLDER.finditer(rule.source):
            name, spec = m.groups()
            combos = [
                ({**bindings, name: value}, {**ordinals, name: ordinal})
                for bindings, ordinals in combos
                for ordinal, value in enumerate(self._values(spec, counts, ordinals, rule))
            ]
        return [bindings for bindings, _ in combos]

    def _values(self, spec: str, counts, ordinals, rule) -> list[str]:
        if "|" in spec:
            return spec.split("|")
        start, count, index = _COUNT_SPEC.fullmatch(spec).groups()
        if count not in counts:
            self._fail(f"{rule}: count '{count}' was not given (given: {', '.join(sorted(counts)) or 'none'})")
        n = counts[count]
        if index is not None:
            if not isinstance(n, (list, tuple)) or ordinals[index] >= len(n):
                self._fail(f"{rule}: count '{count}' must be a list with an entry per '{index}', got {n!r}")
            n = n[ordinals[index]]
        elif isinstance(n, (list, tuple)):
            n = len(n)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            self._fail(f"{rule}: count '{count}' must be a non-negative integer, got {n!r}")
        return [str(i) for i in range(int(start or 0), int(start or 0) + n)]

    def infer_counts(self, state: Mapping[str, Any], *, reverse: bool = False) -> dict[str, int]:
        """Plain counts (``{i:count}``) read off the keys present: one more than the largest index, 0 if none.

        For layouts whose config is not at hand; a gap in the indices still fails the plan as missing keys.
        """
        counts: dict[str, int] = {}
        for rule in self.rules:
            templates = rule.converts(reverse)[0] if rule.kind == "convert" else [rule.sides(reverse)[0]]
            for m in _PLACEHOLDER.finditer(rule.source):
                name, spec = m.groups()
                count = None if "|" in spec else _COUNT_SPEC.fullmatch(spec)
                if count is None or count.group(1) or count.group(3):
                    continue
                n = counts.setdefault(count.group(2), 0)
                for template in filter(None, templates):
                    pattern = _index_pattern(template, name)
                    found = [int(hit.group(name)) for hit in map(pattern.fullmatch, state) if hit]
                    n = max([n, *(i + 1 for i in found)])
                counts[count.group(2)] = n
        return counts

    def plan(
        self,
        state: Mapping[str, Any],
        counts: Mapping[str, Any],
        *,
        source_path=None,
        reverse: bool = False,
        expected_shapes: Mapping[str, Sequence[int]] | Callable[[str], Sequence[int] | None] | None = None,
    ) -> Plan:
        """Plan ``state`` (name -> tensor, or anything with ``.shape``) without touching tensor data.

        ``reverse=True`` maps a target-layout state dict back to source names; derived buffers and
        tied aliases may then be absent, and ``dropped`` lists source names that have no data.
        ``expected_shapes`` (output name -> shape, or a function returning None for "unknown") adds
        shape checks; a mapping (e.g. a meta-device model's state dict) is also taken as the complete
        output key set, so coverage is checked both ways.
        """
        where = source_path if source_path is not None else "state dict"
        plan = Plan(self, reverse)
        expected: dict[str, tuple[Rule, dict, str]] = {}  # input key -> (rule, bindings, output name)
        renamed: dict[str, tuple[str, str]] = {}  # target name -> (input key, output name) of renames
        produced: dict[str, Rule] = {}
        groups: list[tuple[Rule, Conversion]] = []
        for rule in self.rules:
            if rule.kind == "convert":
                ins, outs, op = rule.converts(reverse)
                for bindings in self._expand(rule, counts):
                    conv = Conversion(tuple(_render(t, bindings) for t in outs), tuple(_render(t, bindings) for t in ins), op)
                    for key in conv.inputs:
                        if key in expected:
                            raise KeyMapError(f"ambiguous rule: claimed by both {expected[key][0]} and {rule} ({self.name})", path=where, key=key)
                        expected[key] = (rule, bindings, None)
                    for out in conv.outputs:
                        if out in produced:
                            raise KeyMapError(f"ambiguous rule: {produced[out]} and {rule} both produce '{out}' ({self.name})", path=where, key=conv.inputs[0])
                        produced[out] = rule
                    groups.append((rule, conv))
                continue
            into, out_template = rule.sides(reverse)
            for bindings in self._expand(rule, counts):
                out = _render(out_template, bindings) if out_template is not None else None
                if into is None:  # a drop, in reverse: a source name nothing can fill
                    plan.dropped.append(out)
                    continue
                key = _render(into, bindings)
                if key in expected:
                    raise KeyMapError(f"ambiguous rule: claimed by both {expected[key][0]} and {rule} ({self.name})", path=where, key=key)
                if out is not None and out in produced:
                    raise KeyMapError(f"ambiguous rule: {produced[out]} and {rule} both produce '{out}' ({self.name})", path=where, key=key)
                expected[key] = (rule, bindings, out)
                if out is not None:
                    produced[out] = rule
                if rule.kind == "rename":
                    renamed[_render(rule.target, bindings)] = (key, out)

        hits: dict[Rule, int] = {}
        missing = []
        for key, (rule, bindings, out) in expected.items():
            hits.setdefault(rule, 0)
            if rule.kind == "tied":
                canonical = _render(rule.canonical, bindings)
                if canonical not in renamed:
                    self._fail(f"{rule}: canonical '{canonical}' is not produced by any rename")
                plan.tied[out] = renamed[canonical][1]
                if key in state:
                    plan.tied_sources[key] = renamed[canonical][0]
            if key not in state:
                if rule.optional or (reverse and rule.kind in ("derived", "tied")):
                    if rule.kind == "rename":
                        plan.absent.append((out, key))
                else:
                    missing.append(key)
                continue
            hits[rule] += 1
            plan.matches[key] = rule
            if rule.kind == "rename":
                plan.entries.append((out, key))
            elif rule.kind == "drop":
                plan.dropped.append(key)
            elif rule.kind == "derived":
                plan.derived[out] = key
        for rule, conv in groups:
            present = [k in state for k in conv.inputs]
            if all(present):
                plan.converted.append(conv)
            elif any(present) and rule.optional:  # an optional group is all there or all absent
                missing += [k for k, p in zip(conv.inputs, present) if not p]

        dead = [r for r, n in hits.items() if n == 0 and not r.optional and not (reverse and r.kind not in ("rename", "convert"))]
        missing = [k for k in missing if expected[k][0] not in dead]
        unexpected = sorted((k for k in state if k not in expected), key=natural_key)
        problems = []
        if unexpected:
            problems.append(f"{len(unexpected)} keys not consumed by any rule: {_listing(unexpected)}")
        if missing:
            problems.append(f"{len(missing)} expected keys missing: {_listing(missing)}")
        if dead:
            problems.append(f"dead rule (matches no key): {'; '.join(map(str, dead))}")
        if problems:
            first = (unexpected or missing or [None])[0]
            raise KeyMapError(f"does not follow key map {self.name} ({'; '.join(problems)})", path=where, key=first)

        self._check_shapes(plan, state, expected_shapes, where)
        plan.entries.sort(key=lambda e: natural_key(e[0]))
        plan.converted.sort(key=lambda c: natural_key(c.outputs[0]))
        plan.dropped.sort(key=natural_key)
        plan.absent.sort(key=lambda e: natural_key(e[0]))
        plan.derived = dict(sorted(plan.derived.items(), key=lambda kv: natural_key(kv[0])))
        plan.tied = dict(sorted(plan.tied.items(), key=lambda kv: natural_key(kv[0])))
        return plan

    def _check_shapes(self, plan: Plan, state, expected_shapes, where):
        def shape_of(value):
            shape = getattr(value, "shape", None)
            return None if shape is None else tuple(shape)

        bad = []
        out_shapes: dict[str, tuple[int, ...] | None] = {out: shape_of(state[key]) for out, key in plan.entries}
        for conv in plan.converted:
            shapes = [shape_of(state[k]) for k in conv.inputs]
            if None in shapes:
                out_shapes.update(dict.fromkeys(conv.outputs))
                continue
            try:
                out_shapes.update(zip(conv.outputs, OPS[conv.op].shapes(shapes, len(conv.outputs))))
            except ValueError as exc:
                raise KeyMapError(f"{exc} ({self.name})", path=where, key=conv.inputs[0]) from None
        for alias, canonical in plan.tied_sources.items():
            if shape_of(state[alias]) != shape_of(state[canonical]):
                bad.append((alias, shape_of(state[alias]), f"{shape_of(state[canonical])} of its canonical '{canonical}'"))
        if expected_shapes is not None:
            lookup = expected_shapes.get if isinstance(expected_shapes, Mapping) else expected_shapes
            inputs = {out: key for out, key in plan.entries}
            inputs.update((out, c.inputs[0]) for c in plan.converted for out in c.outputs)
            for out, have in out_shapes.items():
                want = lookup(out)
                if want is not None and have is not None and tuple(want) != have:
                    via = "" if out in dict(plan.entries) else " after its op"
                    bad.append((inputs[out], have, f"{tuple(want)} expected for '{out}'{via}"))
        if bad:
            key, have, want = bad[0]
            more = f" (and {len(bad) - 1} more mis-shaped keys)" if len(bad) > 1 else ""
            raise KeyMapError(f"shape {have} does not match {want}{more}", path=where, key=key)
        if isinstance(expected_shapes, Mapping):
            covered = set(plan.targets) | set(plan.tied) | set(plan.derived)
            lacking = [k for k in expected_shapes if k not in covered]
            extra = [k for k in plan.targets if k not in expected_shapes]
            if lacking or extra:
                parts = [f"{len(lacking)} model keys not produced: {_listing(lacking)}"] if lacking else []
                parts += [f"{len(extra)} produced keys the model lacks: {_listing(extra)}"] if extra else []
                raise KeyMapError(f"key map {self.name} does not cover the model ({'; '.join(parts)})", path=where, key=(lacking or extra)[0])


def _is_keymap(resource) -> bool:
    try:
        data = yaml.safe_load(resource.read_bytes())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA
