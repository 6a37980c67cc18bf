"""Apply the declarative key maps of ``mappings/clip.yaml`` to state dicts.

The first rule whose source pattern matches a key decides its fate; keys matched by ``drop`` are
discarded, and a key that nothing matches is an error (never silently ignored).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from importlib import resources
from typing import Mapping

import torch
import yaml

from ..errors import KeyMapError

__all__ = ["clip_mappings", "apply_map", "KeyMap"]

_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "rest": r"(?P<rest>.+)"}


@functools.lru_cache(maxsize=None)
def clip_mappings() -> dict:
    text = resources.files("ofaconv.mappings").joinpath("clip.yaml").read_text()
    data = yaml.safe_load(text)
    if data.get("schema") != "ofaconv/clip-mappings@1":
        raise KeyMapError("unexpected schema", path="mappings/clip.yaml")
    return data


def _compile(pattern: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        if m.group(1) not in _PLACEHOLDERS:
            raise KeyMapError(f"unknown placeholder {{{m.group(1)}}} in {pattern!r}", path="mappings/clip.yaml")
        out.append(_PLACEHOLDERS[m.group(1)])
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


class KeyMap:
    def __init__(self, name: str, spec: Mapping):
        self.name = name
        self.drop = list(spec.get("drop", []))
        self.rules = []
        for rule in spec["rules"]:
            op = rule.get("op", "copy")
            dst = rule["dst"] if isinstance(rule["dst"], list) else [rule["dst"]]
            if op not in ("copy", "transpose", "chunk3") or (op == "chunk3") != (len(dst) == 3):
                raise KeyMapError(f"map {name}: bad rule {rule}", path="mappings/clip.yaml")
            self.rules.append((_compile(rule["src"]), op, dst))

    def dropped(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pat) for pat in self.drop)

    def __call__(self, state: Mapping[str, torch.Tensor], *, path=None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if self.dropped(key):
                continue
            for regex, op, dst in self.rules:
                m = regex.match(key)
                if m:
                    break
            else:
                raise KeyMapError(f"unexpected key (no rule in map {self.name})", path=path, key=key)
            names = [d.format(**m.groupdict()) for d in dst]
            if op == "transpose":
                if tensor.dim() != 2:
                    raise KeyMapError(f"expected a 2-D tensor, got shape {list(tensor.shape)}", path=path, key=key)
                values = [tensor.t().contiguous()]
            elif op == "chunk3":
                if tensor.shape[0] % 3:
                    raise KeyMapError(f"dim 0 of shape {list(tensor.shape)} is not divisible by 3", path=path, key=key)
                values = [c.contiguous() for c in tensor.chunk(3, dim=0)]
            else:
                values = [tensor]
            for name, value in zip(names, values):
                if name in out:
                    raise KeyMapError(f"two source keys map to {name!r}", path=path, key=key)
                out[name] = value
        return out


def apply_map(name: str, state: Mapping[str, torch.Tensor], *, path=None) -> dict[str, torch.Tensor]:
    maps = clip_mappings()["maps"]
    if name not in maps:
        raise KeyMapError(f"no map named {name!r}", path="mappings/clip.yaml")
    return KeyMap(name, maps[name])(state, path=path)
